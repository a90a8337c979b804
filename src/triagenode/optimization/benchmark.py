"""Side-by-side comparison of every image-encoder backend this machine can run.

For each backend: batch-1 latency (p50, p95), throughput at the best of several batch sizes,
peak memory (host RSS high-water mark, reset between backends; device memory from
``torch.cuda.max_memory_allocated``, which sees only torch's allocations), and agreement with
PyTorch fp32 on the same images (top-1 label over a label set's text embeddings, largest
probability change, embedding cosine). PyTorch fp32 always runs first, in the same process
and run, so every ratio compares like with like.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.inference.backends.base import ImageEncoder
from triagenode.optimization import parity
from triagenode.optimization.machine import EncoderFactory, machine_info

__all__ = [
    "BackendResult",
    "BenchmarkReport",
    "EncoderFactory",
    "benchmark_backends",
    "format_table",
]

log = logging.getLogger(__name__)


@dataclass
class BackendResult:
    """Figures for one backend; ratios are filled in against the PyTorch fp32 row."""

    name: str
    backend: str
    device: str
    precision: str
    open_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_ips: float  # images per second at best_batch
    best_batch: int
    throughput_by_batch: dict[int, float]
    peak_host_mib: float  # process RSS peak while this backend was open and running
    host_increase_mib: float  # that peak minus the RSS before it was opened
    peak_device_mib: float | None
    top1_agreement: float
    max_prob_diff: float
    cosine_min: float
    reference_top1_labels: int
    centred_top1_agreement: float
    speedup_vs_torch_fp32: float = 1.0
    latency_ratio_vs_torch_fp32: float = 1.0
    error: str | None = None


@dataclass
class BenchmarkReport:
    """All rows plus what they were measured on."""

    model: str
    n_agreement_images: int
    n_labels: int
    machine: dict[str, Any]
    results: list[BackendResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row in data["results"]:
            row["throughput_by_batch"] = {str(k): v for k, v in row["throughput_by_batch"].items()}
        return data


class _RssSampler:
    """Largest resident set size seen while the block runs, sampled every 5 ms.

    The kernel's own high-water mark (VmHWM) is process-wide and cannot be reset on every
    kernel, so a sampler gives each backend its own peak.
    """

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _chunk(images: np.ndarray, batch: int) -> np.ndarray:
    if len(images) >= batch:
        return images[:batch]
    return np.resize(images, (batch, *images.shape[1:]))


def _interleaved(encoders: list[ImageEncoder], chunk: np.ndarray, runs: int) -> list[list[float]]:
    """Seconds per call for each encoder, taking turns call by call.

    On a shared machine the load changes from second to second; taking turns exposes every
    backend to the same load, so the ratios between them hold even when absolute figures
    wander.
    """
    for encoder in encoders:
        encoder.encode(chunk)  # warm-up: allocations, CUDA graph capture, kernel selection
    times: list[list[float]] = [[] for _ in encoders]
    for _ in range(runs):
        for i, encoder in enumerate(encoders):
            started = time.perf_counter()
            encoder.encode(chunk)
            times[i].append(time.perf_counter() - started)
    return times


@dataclass
class _Opened:
    name: str
    encoder: ImageEncoder
    open_s: float
    peak: int
    increase: int
    device_peak: float | None
    embeds: np.ndarray


def _open_and_embed(name: str, factory: EncoderFactory, images: np.ndarray, step: int) -> _Opened:
    import torch

    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _RssSampler() as sampler:
        baseline = sampler.peak
        started = time.perf_counter()
        encoder = factory()
        open_s = time.perf_counter() - started
        embeds = np.concatenate(
            [encoder.encode(images[i : i + step]) for i in range(0, len(images), step)]
        )
    device_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return _Opened(
        name, encoder, open_s, sampler.peak, sampler.peak - baseline, device_peak, embeds
    )


def benchmark_backends(
    backends: Sequence[tuple[str, EncoderFactory]],
    images: np.ndarray,
    text_embeds: np.ndarray,
    logit_scale: float,
    *,
    model_name: str,
    batch_sizes: Sequence[int] = (1, 8, 32),
    latency_runs: int = 20,
    throughput_images: int = 64,
) -> BenchmarkReport:
    """Measure each backend; the first must be the PyTorch fp32 reference.

    Each backend is opened in turn and encodes all ``images`` (agreement, and its memory
    peak while opening and encoding); then the open backends take turns for the timed
    batch-1 latency and throughput runs.

    Parameters
    ----------
    backends : sequence of (name, factory)
        Factories open the encoder (timed as ``open_s``); the first is the reference.
    images : numpy.ndarray
        Preprocessed images ``(N,3,S,S)``; all are used for agreement.
    text_embeds : numpy.ndarray
        Label embeddings ``(L, D)``.
    logit_scale : float
        Zero-shot temperature.
    model_name : str
        Recorded in the report.
    batch_sizes : sequence of int
        Throughput is measured at each; the best is reported.
    latency_runs : int
        Batch-1 repetitions for p50/p95.
    throughput_images : int
        Roughly how many images each throughput measurement encodes per backend.

    Returns
    -------
    BenchmarkReport
    """
    report = BenchmarkReport(model_name, len(images), len(text_embeds), machine_info())
    opened: list[_Opened] = []
    try:
        for name, factory in backends:
            try:
                opened.append(_open_and_embed(name, factory, images, max(batch_sizes)))
            except Exception as exc:
                report.skipped[name] = f"{type(exc).__name__}: {exc}"
                log.warning("benchmark: %s cannot be opened: %s", name, exc)
        encoders = [o.encoder for o in opened]
        if not encoders:
            return report
        latency = _interleaved(encoders, _chunk(images, 1), latency_runs)
        by_batch: list[dict[int, float]] = [{} for _ in opened]
        for batch in batch_sizes:
            runs = max(2, throughput_images // batch)
            for i, times in enumerate(_interleaved(encoders, _chunk(images, batch), runs)):
                by_batch[i][batch] = float(batch / np.median(times))
    finally:
        for o in opened:
            o.encoder.close()
        report.machine["load_average_end"] = list(os.getloadavg())
    for o, lat_s, rates in zip(opened, latency, by_batch, strict=True):
        lat = np.asarray(lat_s) * 1000
        agreement = parity.compare_embeddings(opened[0].embeds, o.embeds, text_embeds, logit_scale)
        best = max(rates, key=lambda b: rates[b])
        row = BackendResult(
            name=o.name,
            backend=o.encoder.backend,
            device=o.encoder.device,
            precision=o.encoder.precision,
            open_s=round(o.open_s, 3),
            latency_p50_ms=float(np.percentile(lat, 50)),
            latency_p95_ms=float(np.percentile(lat, 95)),
            throughput_ips=rates[best],
            best_batch=best,
            throughput_by_batch=rates,
            peak_host_mib=round(o.peak / 2**20, 1),
            host_increase_mib=round(o.increase / 2**20, 1),
            peak_device_mib=None if o.device_peak is None else round(o.device_peak, 1),
            top1_agreement=agreement.top1_agreement,
            max_prob_diff=agreement.max_prob_diff,
            cosine_min=agreement.cosine_min,
            reference_top1_labels=agreement.reference_top1_labels,
            centred_top1_agreement=agreement.centred_top1_agreement,
        )
        base = report.results[0] if report.results else row
        row.speedup_vs_torch_fp32 = row.throughput_ips / base.throughput_ips
        row.latency_ratio_vs_torch_fp32 = row.latency_p50_ms / base.latency_p50_ms
        report.results.append(row)
        log.info(
            "benchmark %s: p50 %.1f ms, %.1f img/s (batch %d), top-1 %.3f",
            o.name,
            row.latency_p50_ms,
            row.throughput_ips,
            best,
            row.top1_agreement,
        )
    return report


def format_table(report: BenchmarkReport) -> str:
    """The report as a fixed-width table, one row per backend."""
    head = (
        "backend",
        "p50 ms",
        "p95 ms",
        "img/s",
        "batch",
        "x fp32",
        "host MiB",
        "+MiB",
        "dev MiB",
        "top-1",
        "ctr top-1",
        "max dP",
        "cos min",
    )
    rows: list[tuple[str, ...]] = [head]
    for r in report.results:
        rows.append(
            (
                r.name,
                f"{r.latency_p50_ms:.1f}",
                f"{r.latency_p95_ms:.1f}",
                f"{r.throughput_ips:.1f}",
                str(r.best_batch),
                f"{r.speedup_vs_torch_fp32:.2f}",
                f"{r.peak_host_mib:.0f}",
                f"{r.host_increase_mib:.0f}",
                "-" if r.peak_device_mib is None else f"{r.peak_device_mib:.0f}",
                f"{r.top1_agreement:.3f}",
                f"{r.centred_top1_agreement:.3f}",
                f"{r.max_prob_diff:.4f}",
                f"{r.cosine_min:.5f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"model {report.model}; agreement on {report.n_agreement_images} images x "
        f"{report.n_labels} labels vs {report.results[0].name if report.results else '-'}"
        + (
            f" ({report.results[0].reference_top1_labels} distinct top-1 labels)"
            if report.results
            else ""
        )
        + f"; {report.machine.get('cpu')} x{report.machine.get('cpu_count')}"
        + f", load {report.machine.get('load_average_start', ['?'])[0]}"
        + (f"; GPU {report.machine['gpu']}" if report.machine.get("gpu") else "")
    )
    for name, why in report.skipped.items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)
