"""Inference benchmark: the real BiomedCLIP architecture with random weights, offline.

Measures, for every device/precision/batch size available on this machine:

- throughput (images/s) through the ``ImageEncoder`` interface at each batch size,
- batch-1 latency (median and p90, ms),
- on CUDA both eager and CUDA-graph variants of the PyTorch backend,

and DICOM preprocessing images/s per core for uncompressed 512x512 16-bit CT (read, decode,
rescale, window, resize to 224, normalise), single process, plus all cores with a process
pool. Prints a table and writes JSON with ``--json-out``.

    python benchmarks/inference.py                 # CPU: short run
    python benchmarks/inference.py --json-out cpu.json --batch-sizes 1,8 --iterations 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.factory builds the CT files

from tests.factory import ct_slice, write  # noqa: E402

from triagenode.inference.backends.torch import TorchImageEncoder  # noqa: E402
from triagenode.inference.model import build_biomedclip  # noqa: E402
from triagenode.inference.preprocess import PreprocessConfig, preprocess_file  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_encoder(
    encoder: TorchImageEncoder, batch_sizes: list[int], iterations: int, warmup: int
) -> list[dict[str, Any]]:
    """Throughput per batch size, and batch-1 latency, for one encoder configuration."""
    rows = []
    size = encoder.image_size
    for batch in batch_sizes:
        images = np.random.default_rng(0).standard_normal((batch, 3, size, size), np.float32)
        for _ in range(warmup):
            encoder.encode(images)
        _sync(encoder.device)
        times = []
        for _ in range(iterations):
            started = time.perf_counter()
            encoder.encode(images)  # returns numpy: includes host transfer, as in service
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        row: dict[str, Any] = {
            "batch": batch,
            "images_per_s": round(batch / median, 2),
            "batch_ms_median": round(median * 1000, 3),
        }
        if batch == 1:
            ordered = sorted(times)
            row["latency_ms_median"] = round(median * 1000, 3)
            row["latency_ms_p90"] = round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 3)
        rows.append(row)
    return rows


def _configurations(devices: list[str]) -> list[tuple[str, str, bool, int]]:
    """(device, precision, CUDA graphs, CPU threads: 1 or 0 for all cores)."""
    configs = []
    for device in devices:
        if device == "cpu":
            # one thread as well: on a shared machine all-core runs suffer from neighbours
            configs.append(("cpu", "fp32", False, 0))
            if (os.cpu_count() or 1) > 1:
                configs.append(("cpu", "fp32", False, 1))
        else:
            for precision in ("fp16", "bf16", "fp32"):
                configs.append((device, precision, False, 0))
                configs.append((device, precision, True, 0))
    return configs


def _ct_files(folder: Path, count: int) -> list[Path]:
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    return [
        write(ct_slice(study, series, i, size=512, seed=i), folder / f"ct{i:04d}.dcm")
        for i in range(count)
    ]


def _preprocess_chunk(args: tuple[list[str], int]) -> int:
    paths, size = args
    config = PreprocessConfig(image_size=size)
    for path in paths:
        preprocess_file(path, config)
    return len(paths)


def measure_preprocessing(count: int, repeats: int, size: int = 224) -> dict[str, Any]:
    """Preprocessing images/s for uncompressed 512x512 CT: one core, then all cores."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="triagenode-bench-") as folder:
        paths = _ct_files(Path(folder), count)
        config = PreprocessConfig(image_size=size)
        for path in paths[:4]:
            preprocess_file(path, config)  # warm the page cache and imports
        rates, cpu_rates = [], []
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            for path in paths:
                preprocess_file(path, config)
            rates.append(count / (time.perf_counter() - started))
            # CPU time of this process: the per-core rate even while other work shares cores
            cpu_rates.append(count / (time.process_time() - cpu_started))
        workers = os.cpu_count() or 1
        chunks = [([str(p) for p in paths[i::workers]], size) for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_preprocess_chunk, chunks))  # start the workers
            started = time.perf_counter()
            done = sum(pool.map(_preprocess_chunk, chunks))
            pooled = done / (time.perf_counter() - started)
    return {
        "image": "CT 512x512 16-bit signed, Explicit VR Little Endian (uncompressed)",
        "output": f"3x{size}x{size} float32",
        "images": count,
        "per_core_images_per_s_median": round(statistics.median(rates), 1),
        "per_core_images_per_s_best": round(max(rates), 1),
        "per_core_images_per_s_cpu_time": round(statistics.median(cpu_rates), 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "all_cores_images_per_s": round(pooled, 1),
        "cores": workers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=None, help="comma list (default by device)")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--devices", default=None, help="cpu,cuda (default: what is present)")
    parser.add_argument("--preprocess-images", type=int, default=64)
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    devices = args.devices.split(",") if args.devices else (["cuda"] if cuda else ["cpu"])
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
        },
        "model": "BiomedCLIP architecture (timm ViT-B/16 224 + BiomedBERT-base), random weights",
        "encoder": [],
    }
    print(f"machine: {report['machine']}", flush=True)
    preprocessing = measure_preprocessing(args.preprocess_images, repeats=3)
    report["preprocessing"] = preprocessing
    print(
        f"preprocessing 512x512 CT -> 224: {preprocessing['per_core_images_per_s_median']} "
        f"images/s per core wall (best {preprocessing['per_core_images_per_s_best']}, "
        f"{preprocessing['per_core_images_per_s_cpu_time']} by CPU time, load "
        f"{preprocessing['load_average_1m']}), "
        f"{preprocessing['all_cores_images_per_s']} images/s on {preprocessing['cores']} cores",
        flush=True,
    )
    if not args.skip_encoder:
        torch.set_num_threads(os.cpu_count() or 1)
        report["load_average_1m_before_encoder"] = round(os.getloadavg()[0], 2)
        started = time.perf_counter()
        model = build_biomedclip(random_weights=True)
        print(f"built BiomedCLIP architecture in {time.perf_counter() - started:.1f} s")
        for device, precision, graphs, variant_threads in _configurations(devices):
            default_batches = "1,4" if device == "cpu" else "1,8,32,64,128,256,512"
            batches = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
            iterations = args.iterations or (3 if device == "cpu" else 30)
            warmup = args.warmup if args.warmup is not None else (1 if device == "cpu" else 5)
            threads = 1 if variant_threads == 1 else (os.cpu_count() or 1)
            torch.set_num_threads(threads)
            encoder = TorchImageEncoder(
                model,
                device=device,
                precision=precision,
                max_batch=max(batches),
                cuda_graphs=graphs,
            )
            rows = measure_encoder(encoder, batches, iterations, warmup)
            encoder.close()
            variant = "cuda-graphs" if graphs else "eager"
            if device == "cpu":
                variant = f"eager-{threads}t"
            entry = {
                "backend": "torch",
                "device": device,
                "precision": precision,
                "variant": variant,
                "threads": threads,
                "results": rows,
            }
            report["encoder"].append(entry)
            for row in rows:
                latency = f"  latency {row['latency_ms_median']} ms" if row["batch"] == 1 else ""
                print(
                    f"torch {device} {precision} {variant:11} batch {row['batch']:4}: "
                    f"{row['images_per_s']:10.1f} images/s{latency}",
                    flush=True,
                )
            del encoder
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    text = json.dumps(report, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
