"""One script for every GPU measurement of issue 7; run it once on a lent GPU machine.

Measures the BiomedCLIP image tower (ViT-B/16, 224 px; random weights) with:

- PyTorch eager fp32, fp16 and bf16 at batch 1, 64 and 256;
- the node's own ``TorchImageEncoder`` (bf16, fp16; buckets and CUDA graphs) at those batches;
- CUDA graphs (bf16, fp16) at the same batches;
- ``torch.compile`` (bf16) at the same batches;
- ONNX export on that machine, and ONNX Runtime with every provider it offers there;
- TensorRT fp16 when the ``tensorrt`` package imports.

Results go to ``$OUT/gpu_suite.json`` (``./gpu_suite.json`` without ``$OUT``), rewritten after
every section, so a run cut short by its time limit still leaves what it measured::

    PYTHONPATH=src python benchmarks/gpu_suite.py [--budget-s 480] [--quick]
    python benchmarks/gpu_suite.py --smoke     # check it on a CPU first (demo model)

The model comes from ``triagenode.inference.model.build_biomedclip`` when open_clip is
installed there, else from ``timm.create_model("vit_base_patch16_224", num_classes=512)``
(the same trunk with a 768->512 projection; the FLOPs differ by the head only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

BATCHES: tuple[int, ...] = (1, 64, 256)
DEVICE = "cuda"
SIZE = 224  # the model's input size; the demo model's in --smoke
RESULTS: dict[str, Any] = {"sections": {}}
STARTED = time.perf_counter()


def out_file() -> Path:
    return Path(os.environ.get("OUT", ".")) / "gpu_suite.json"


def save() -> None:
    RESULTS["elapsed_s"] = round(time.perf_counter() - STARTED, 1)
    out_file().write_text(json.dumps(RESULTS, indent=2, default=str))


def image_tower(smoke: bool) -> tuple[Any, torch.nn.Module, str]:
    """(LoadedModel or None, image tower, where it came from)."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from triagenode.inference.model import build_biomedclip, build_demo_model

        if smoke:
            loaded = build_demo_model()
            return loaded, loaded.visual.eval(), "triagenode.build_demo_model (smoke)"
        loaded = build_biomedclip(random_weights=True)
        return loaded, loaded.visual.eval(), "triagenode.build_biomedclip"
    except Exception as exc:  # open_clip or triagenode's dependencies missing there
        import timm

        RESULTS["model_fallback_reason"] = f"{type(exc).__name__}: {exc}"
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=512)
        return None, model.eval(), "timm vit_base_patch16_224 num_classes=512"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    """p50/p95 milliseconds of ``fn`` (synchronised), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95))}


def record(section: str, name: str, batch: int, stats: dict[str, float]) -> None:
    stats["images_per_s"] = batch / (stats["p50_ms"] / 1000)
    RESULTS["sections"].setdefault(section, {})[f"{name}@{batch}"] = stats
    print(
        f"{section:10s} {name:22s} batch {batch:4d}: p50 {stats['p50_ms']:8.2f} ms "
        f"{stats['images_per_s']:10.0f} img/s",
        flush=True,
    )
    save()


def runs_for(batch: int, quick: bool) -> int:
    return (5 if quick else 20) if batch > 1 else (20 if quick else 100)


def eager(model: torch.nn.Module, quick: bool) -> None:
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        module = model.to(dtype)
        for batch in BATCHES:
            x = torch.randn(batch, 3, SIZE, SIZE, device=DEVICE, dtype=dtype)
            with torch.inference_mode():
                record(
                    "eager", name, batch, timed(lambda m=module, x=x: m(x), runs_for(batch, quick))
                )
    model.float()


def cuda_graphs(model: torch.nn.Module, quick: bool) -> None:
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        module = model.to(dtype)
        for batch in BATCHES:
            static = torch.randn(batch, 3, SIZE, SIZE, device=DEVICE, dtype=dtype)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):
                    module(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                module(static)
            record("cuda_graph", name, batch, timed(graph.replay, runs_for(batch, quick)))
    model.float()


def compiled(model: torch.nn.Module, quick: bool) -> None:
    module = model.to(torch.bfloat16)
    for mode in ("default", "max-autotune"):
        fn = torch.compile(module, mode=mode, dynamic=False)
        for batch in BATCHES:
            x = torch.randn(batch, 3, SIZE, SIZE, device=DEVICE, dtype=torch.bfloat16)
            start = time.perf_counter()
            with torch.inference_mode():
                fn(x)
                sync()
                compile_s = time.perf_counter() - start
                stats = timed(lambda fn=fn, x=x: fn(x), runs_for(batch, quick))
            stats["compile_s"] = compile_s
            record("compile", f"bf16-{mode}", batch, stats)
        if quick:
            break
    model.float()


def onnx_and_ort(model: torch.nn.Module, quick: bool, folder: Path) -> None:
    import onnxruntime as ort

    path = folder / "image.onnx"
    start = time.perf_counter()
    torch.onnx.export(
        model.float().cpu().eval(),
        (torch.randn(2, 3, SIZE, SIZE),),
        str(path),
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
        opset_version=18,
        dynamo=False,
    )
    RESULTS["onnx_export"] = {"seconds": time.perf_counter() - start, "bytes": path.stat().st_size}
    RESULTS["ort_providers"] = ort.get_available_providers()
    save()
    model.to(DEVICE)
    for provider in ort.get_available_providers():
        if provider in ("AzureExecutionProvider",):
            continue
        session = ort.InferenceSession(str(path), providers=[provider])
        for batch in BATCHES[:2] if provider == "CPUExecutionProvider" else BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), np.float32)
            runs = 3 if provider == "CPUExecutionProvider" else runs_for(batch, quick)
            record(
                "onnxruntime",
                provider,
                batch,
                timed(lambda s=session, x=x: s.run(None, {"pixel_values": x}), runs),
            )


def image_encoder(loaded: Any, quick: bool) -> None:
    """Through the node's own ``TorchImageEncoder`` (numpy in, unit embeddings out, padded
    batch buckets and CUDA graphs on a GPU): the figure the issues' goals are about."""
    from triagenode.inference.backends.torch import TorchImageEncoder

    if loaded is None:
        raise RuntimeError("triagenode's model builder is not importable here")
    for precision in ("bf16", "fp16") if DEVICE == "cuda" else ("fp32",):
        encoder = TorchImageEncoder(
            loaded, device=DEVICE, precision=precision, max_batch=max(BATCHES)
        )
        for batch in BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), np.float32)
            record(
                "image_encoder",
                f"torch-{precision}",
                batch,
                timed(lambda e=encoder, x=x: e.encode(x), runs_for(batch, quick)),
            )
        encoder.close()


def tensorrt_engine(folder: Path, quick: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from triagenode.inference.backends.tensorrt import TensorRTImageEncoder
    from triagenode.optimization.tensorrt_build import ensure_engine

    start = time.perf_counter()
    largest = max(BATCHES)
    engine = ensure_engine(
        folder / "image.onnx",
        folder / "trt",
        precision="fp16",
        max_batch=largest,
        image_size=SIZE,
    )
    RESULTS["tensorrt_build_s"] = time.perf_counter() - start
    encoder = TensorRTImageEncoder(
        engine, precision="fp16", max_batch=largest, image_size=SIZE, cuda_graphs=True
    )
    for batch in BATCHES:
        x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE), np.float32)
        # Includes the host->device copy and the device->host result: what the node pays.
        record(
            "tensorrt",
            "fp16-graphs",
            batch,
            timed(lambda x=x: encoder.encode(x), runs_for(batch, quick)),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run every section that can on the CPU with the demo model and tiny batches, to "
        "check the script before spending GPU time on it",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="skip the remaining sections after this many seconds",
    )
    args = parser.parse_args()
    global DEVICE, BATCHES, SIZE
    if args.smoke:
        DEVICE, BATCHES = "cpu", (1, 2)
    elif not torch.cuda.is_available():
        print(
            "no CUDA device: this script is for a GPU machine (--smoke checks it on a CPU)",
            file=sys.stderr,
        )
        return 2
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    RESULTS.update(
        {
            "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke)",
            "capability": torch.cuda.get_device_capability(0) if DEVICE == "cuda" else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "batches": BATCHES,
        }
    )
    loaded, model, source = image_tower(args.smoke)
    if loaded is not None:
        SIZE = loaded.preprocess.image_size
    RESULTS["model"] = source
    model = model.to(DEVICE)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    save()
    folder = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    sections: list[tuple[str, Callable[[], None]]] = [
        ("eager", lambda: eager(model, args.quick)),
        ("image_encoder", lambda: image_encoder(loaded, args.quick)),
        ("cuda_graph", lambda: cuda_graphs(model, args.quick)),
        ("onnx", lambda: onnx_and_ort(model, args.quick, folder)),
        ("tensorrt", lambda: tensorrt_engine(folder, args.quick)),
        ("compile", lambda: compiled(model, args.quick)),
    ]
    if DEVICE == "cpu":  # CUDA graphs need a GPU; compiling for the CPU only costs time
        sections = [(n, f) for n, f in sections if n not in ("cuda_graph", "compile")]
    for name, run in sections:
        if time.perf_counter() - STARTED > args.budget_s:
            RESULTS.setdefault("skipped", {})[name] = "time budget spent"
            continue
        try:
            run()
        except Exception as exc:
            RESULTS.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        save()
    print(f"wrote {out_file()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
