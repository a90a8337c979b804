"""``triagenode optimize``: ONNX export, INT8 quantisation, TensorRT engines, Triton repository.

Artefacts go to ``model.artifacts_dir`` (default ``<data_dir>/engines``) unless ``--out``
names another folder; each is written only after its parity with PyTorch fp32 passes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from triagenode.cli.common import settings_from_args

__all__ = ["add_model_choice", "model_from_args", "register"]


def add_model_choice(parser: argparse.ArgumentParser) -> None:
    """``--demo-model`` / ``--random-biomedclip``: which model instead of ``model.source``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--demo-model",
        action="store_true",
        help="the built-in tiny demo model (DEMO, NOT FOR CLINICAL USE)",
    )
    group.add_argument(
        "--random-biomedclip",
        action="store_true",
        help="the BiomedCLIP architecture (ViT-B/16 + BERT-base), random weights",
    )


def model_from_args(args: argparse.Namespace, settings: Any) -> Any:
    """The model the arguments ask for, else the one ``model.source`` names."""
    from triagenode.inference import model

    cache = settings.node.data_dir / "cache"
    if getattr(args, "demo_model", False):
        return model.build_demo_model(cache)
    if getattr(args, "random_biomedclip", False):
        return model.build_biomedclip(random_weights=True, cache_dir=cache)
    return model.load_model(settings.model, cache)


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "optimize", parents=[parent], help="ONNX export, INT8 quantisation, TensorRT engines"
    )
    actions = parser.add_subparsers(dest="action", required=True)

    export = actions.add_parser(
        "export-onnx", parents=[parent], help="image and text towers to ONNX, parity-checked"
    )
    export.add_argument("--out", type=Path, default=None, help="folder (default artifacts_dir)")
    export.add_argument("--opset", type=int, default=18)
    export.add_argument("--parity-images", type=int, default=16)
    export.add_argument("--no-text", action="store_true", help="image tower only")
    export.add_argument("--fp16", action="store_true", help="also write image.fp16.onnx (GPUs)")
    add_model_choice(export)
    export.set_defaults(handler=_export)

    quant = actions.add_parser("quantize", parents=[parent], help="INT8 image tower for CPUs")
    quant.add_argument("--mode", choices=["dynamic", "static"], default="dynamic")
    quant.add_argument(
        "--calibration", type=Path, default=None, help="folder of DICOM files (static mode)"
    )
    quant.add_argument("--calibration-limit", type=int, default=128)
    quant.add_argument(
        "--calibrate-method", choices=["minmax", "percentile", "entropy"], default="minmax"
    )
    quant.add_argument(
        "--keep-fp32",
        choices=["none", "edges"],
        default="none",
        help="edges: the first and last transformer block and the head stay fp32 "
        "(slower; default none: every MatMul/Gemm is quantised)",
    )
    quant.add_argument(
        "--per-tensor",
        action="store_true",
        help="one weight scale per tensor (default: per output channel)",
    )
    quant.add_argument(
        "--out", type=Path, default=None, help="folder holding image.onnx (default artifacts_dir)"
    )
    quant.add_argument("--parity-images", type=int, default=100)
    add_model_choice(quant)
    quant.set_defaults(handler=_quantize)

    trt = actions.add_parser("build-trt", parents=[parent], help="TensorRT engine (needs a GPU)")
    trt.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    trt.add_argument("--max-batch", type=int, default=None, help="default model.max_batch")
    trt.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder holding the ONNX models (default artifacts_dir)",
    )
    trt.set_defaults(handler=_build_trt)

    triton = actions.add_parser(
        "export-triton",
        parents=[parent],
        help="a Triton Inference Server model repository of the image tower",
    )
    triton.add_argument("dir", type=Path, help="model repository folder (created)")
    triton.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="folder holding image.onnx from export-onnx (default artifacts_dir)",
    )
    triton.add_argument(
        "--name", default=None, help="Triton model name (default model.triton.model_name)"
    )
    triton.add_argument(
        "--kind",
        choices=["cpu", "gpu"],
        default="cpu",
        help="instance kind: gpu uses a TensorRT plan from build-trt when one matches",
    )
    triton.add_argument("--instances", type=int, default=1, help="model instances (per GPU)")
    triton.add_argument(
        "--max-batch", type=int, default=None, help="max_batch_size (default model.max_batch)"
    )
    triton.add_argument(
        "--preferred-batch",
        type=int,
        action="append",
        default=None,
        help="preferred batch size of the dynamic batcher (repeatable; default the max batch)",
    )
    triton.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=None,
        help="longest wait for a fuller batch on the server (default model.max_wait_ms)",
    )
    triton.add_argument(
        "--onnx-only", action="store_true", help="ONNX even when a TensorRT plan is present"
    )
    triton.set_defaults(handler=_export_triton)


def _export(args: argparse.Namespace) -> int:
    from triagenode.optimization.onnx_export import export_onnx, make_fp16_variant

    settings = settings_from_args(args)
    loaded = model_from_args(args, settings)
    out = args.out or settings.artifacts_dir
    result = export_onnx(
        loaded, out, n_images=args.parity_images, opset=args.opset, text=not args.no_text
    )
    data = result.to_dict()
    if args.fp16:
        import numpy as np

        from triagenode.optimization import parity
        from triagenode.optimization.onnx_export import label_prompts

        pre = loaded.preprocess
        fp16_path, report = make_fp16_variant(
            result.image_path,
            images=parity.synthetic_images(args.parity_images, pre.image_size, pre.mean, pre.std),
            text_embeds=np.asarray(loaded.encode_text(label_prompts())),
            logit_scale=float(loaded.logit_scale),
        )
        data["fp16_path"] = str(fp16_path)
        data["fp16_parity"] = report.to_dict() if report else None
    print(json.dumps(data, indent=2))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from triagenode.errors import ConfigError
    from triagenode.inference.backends.artifacts import IMAGE_FP32
    from triagenode.optimization import parity
    from triagenode.optimization.onnx_export import ImageTower, label_prompts
    from triagenode.optimization.quantize import DicomCalibrationReader, quantize_image_tower

    settings = settings_from_args(args)
    folder = args.out or settings.artifacts_dir
    fp32 = Path(folder) / IMAGE_FP32
    if not fp32.is_file():
        raise ConfigError(f"{fp32}: not found; run `triagenode optimize export-onnx` first")
    if args.mode == "static" and args.calibration is None:
        raise ConfigError("--mode static needs --calibration DIR (a folder of DICOM files)")
    loaded = model_from_args(args, settings)
    pre = loaded.preprocess
    images = parity.synthetic_images(args.parity_images, pre.image_size, pre.mean, pre.std, seed=1)
    with torch.no_grad():
        reference = ImageTower(loaded.clip.eval())(torch.from_numpy(images)).numpy()
    calibration = None
    if args.mode == "static":
        from triagenode.inference.preprocess import preprocess_file

        calibration = DicomCalibrationReader(
            args.calibration,
            lambda p: preprocess_file(p, pre, frames=[1])[0],
            limit=args.calibration_limit,
        )
    result = quantize_image_tower(
        fp32,
        args.mode,
        images=images,
        reference=reference,
        text_embeds=np.asarray(loaded.encode_text(label_prompts())),
        logit_scale=float(loaded.logit_scale),
        calibration=calibration,
        per_channel=not args.per_tensor,
        keep_fp32=args.keep_fp32,
        calibrate_method=args.calibrate_method,
    )
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def _build_trt(args: argparse.Namespace) -> int:
    import importlib.util

    from triagenode.errors import ConfigError
    from triagenode.inference.backends.artifacts import (
        IMAGE_FP32,
        IMAGE_INT8_STATIC,
        engines_dir,
        read_onnx_metadata,
    )
    from triagenode.optimization.tensorrt_build import ensure_engine

    if importlib.util.find_spec("tensorrt") is None:
        raise ConfigError("build-trt needs the 'tensorrt' package (pip install tensorrt) and a GPU")
    settings = settings_from_args(args)
    folder = Path(args.out or settings.artifacts_dir)
    source = folder / (IMAGE_INT8_STATIC if args.precision == "int8" else IMAGE_FP32)
    if not source.is_file():
        step = "quantize --mode static" if args.precision == "int8" else "export-onnx"
        raise ConfigError(f"{source}: not found; run `triagenode optimize {step}` first")
    size = int(read_onnx_metadata(source).get("preprocess", {}).get("image_size", 224))
    engine = ensure_engine(
        source,
        engines_dir(folder),
        precision=args.precision,
        max_batch=args.max_batch or settings.model.max_batch,
        image_size=size,
    )
    print(engine)
    return 0


def _export_triton(args: argparse.Namespace) -> int:
    from triagenode.optimization.triton_repo import write_model_repository

    settings = settings_from_args(args)
    model = settings.model
    result = write_model_repository(
        args.dir,
        Path(args.artifacts or settings.artifacts_dir),
        model_name=args.name or model.triton.model_name,
        max_batch=args.max_batch or model.max_batch,
        preferred_batch_sizes=args.preferred_batch,
        max_queue_delay_ms=(
            model.max_wait_ms if args.max_queue_delay_ms is None else args.max_queue_delay_ms
        ),
        gpu=args.kind == "gpu",
        instances=args.instances,
        use_plan=not args.onnx_only,
    )
    print(json.dumps(result.to_dict(), indent=2))
    return 0
