"""``triagenode benchmark backends``: every backend this machine has, side by side."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from triagenode.cli.common import settings_from_args
from triagenode.cli.optimize import add_model_choice, model_from_args

__all__ = ["register", "run_backends_benchmark"]


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser("benchmark", parents=[parent], help="measure backends")
    actions = parser.add_subparsers(dest="action", required=True)
    backends = actions.add_parser(
        "backends",
        parents=[parent],
        help="latency, throughput, memory and agreement with PyTorch fp32 per backend",
    )
    backends.add_argument("--json-out", type=Path, default=None, metavar="FILE")
    backends.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    backends.add_argument(
        "--images",
        type=int,
        default=100,
        help="agreement sample size (synthetic DICOM-like phantoms)",
    )
    backends.add_argument("--latency-runs", type=int, default=20)
    backends.add_argument("--throughput-images", type=int, default=64)
    backends.add_argument("--threads", type=int, default=None, help="default model.threads")
    backends.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="ONNX folder (default: artifacts_dir; a temp folder with --demo-model or "
        "--random-biomedclip)",
    )
    backends.add_argument(
        "--no-prepare",
        action="store_true",
        help="do not export/quantise missing ONNX artefacts first",
    )
    add_model_choice(backends)
    backends.set_defaults(handler=_backends)


def run_backends_benchmark(
    loaded: Any,
    artifacts: Path,
    *,
    prepare: bool = True,
    n_images: int = 100,
    batch_sizes: list[int] | None = None,
    latency_runs: int = 20,
    throughput_images: int = 64,
    threads: int = 0,
) -> Any:
    """Prepare missing artefacts, then measure every backend.

    Prepared: fp32 ONNX, dynamic INT8 ONNX and, with OpenVINO installed, its fp32, bf16
    (where the CPU has it) and INT8 models, each parity-checked; built beforehand so that a
    row's memory figure is the backend serving, not its one-time build. A model refused for
    parity is listed under "skipped" with its figures.

    Returns
    -------
    triagenode.optimization.benchmark.BenchmarkReport
    """
    import numpy as np

    from triagenode.inference.backends.artifacts import IMAGE_FP32, IMAGE_INT8_DYNAMIC
    from triagenode.optimization import parity
    from triagenode.optimization.benchmark import benchmark_backends
    from triagenode.optimization.machine import machine_backends
    from triagenode.optimization.onnx_export import export_onnx, label_prompts
    from triagenode.optimization.parity import ParityError
    from triagenode.optimization.quantize import quantize_image_tower

    pre = loaded.preprocess
    text_embeds = np.asarray(loaded.encode_text(label_prompts()))
    scale = float(loaded.logit_scale)
    images = parity.synthetic_images(n_images, pre.image_size, pre.mean, pre.std, seed=2)
    artifacts = Path(artifacts)
    if prepare and not (artifacts / IMAGE_FP32).is_file():
        export_onnx(loaded, artifacts, text=False)
    refused: dict[str, str] = {}
    if prepare and not (artifacts / IMAGE_INT8_DYNAMIC).is_file():
        try:
            quantize_image_tower(
                artifacts / IMAGE_FP32,
                "dynamic",
                images=images,
                text_embeds=text_embeds,
                logit_scale=scale,
            )
        except ParityError as exc:
            refused["onnxruntime-cpu-int8-dynamic"] = str(exc)
    if prepare:
        refused.update(_prepare_openvino(loaded, artifacts, threads))
    report = benchmark_backends(
        machine_backends(loaded, artifacts, threads=threads, max_batch=max(batch_sizes or [32])),
        images,
        text_embeds,
        scale,
        model_name=loaded.identity.display_name,
        batch_sizes=batch_sizes or [1, 8, 32],
        latency_runs=latency_runs,
        throughput_images=throughput_images,
    )
    report.skipped.update(refused)
    return report


def _prepare_openvino(loaded: Any, artifacts: Path, threads: int) -> dict[str, str]:
    """Build the OpenVINO models the benchmark rows open; returns the refused ones' reasons."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return {}
    from triagenode.inference.backends.artifacts import IMAGE_FP32, openvino_dir
    from triagenode.inference.backends.cpu import detect_cpu
    from triagenode.optimization.openvino_build import ensure_openvino_model
    from triagenode.optimization.parity import ParityError

    refused = {}
    onnx = artifacts / IMAGE_FP32
    for precision in ("fp32", "bf16", "int8"):
        if precision == "bf16" and not detect_cpu().bf16:
            continue
        try:
            ensure_openvino_model(
                loaded,
                openvino_dir(artifacts),
                precision=precision,
                source_onnx=onnx if onnx.is_file() else None,
                threads=threads,
            )
        except (ParityError, RuntimeError) as exc:
            refused[f"openvino-cpu-{precision}"] = str(exc)
    return refused


def _backends(args: argparse.Namespace) -> int:
    from triagenode.optimization.benchmark import format_table

    settings = settings_from_args(args)
    loaded = model_from_args(args, settings)
    threads = settings.model.threads if args.threads is None else args.threads
    with tempfile.TemporaryDirectory(prefix="triagenode-bench-") as scratch:
        artifacts = args.artifacts
        if artifacts is None:
            synthetic = args.demo_model or args.random_biomedclip
            artifacts = Path(scratch) if synthetic else settings.artifacts_dir
        report = run_backends_benchmark(
            loaded,
            artifacts,
            prepare=not args.no_prepare,
            n_images=args.images,
            batch_sizes=args.batch_sizes,
            latency_runs=args.latency_runs,
            throughput_images=args.throughput_images,
            threads=threads,
        )
    print(format_table(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report.to_dict(), indent=2))
    return 0
