"""What this machine can run: its description, and an encoder factory per backend.

:func:`machine_backends` lists PyTorch fp32 first (the reference every comparison is made
against), PyTorch bf16 (autocast) where the CPU has native bf16, then every ONNX artefact on
the CPU provider, OpenVINO fp32/bf16/INT8 when it is installed, then, on a GPU machine,
PyTorch CUDA, ONNX Runtime's CUDA/TensorRT providers and TensorRT engines.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triagenode.inference.backends.base import ImageEncoder
from triagenode.inference.backends.cpu import detect_cpu
from triagenode.optional import require

__all__ = ["EncoderFactory", "machine_backends", "machine_info"]

EncoderFactory = Callable[[], ImageEncoder]


def machine_info() -> dict[str, Any]:
    """CPU, core count, library versions, load average and the GPU when there is one."""
    import torch

    ort = require("onnxruntime", "onnx", "Describing this machine's backends")
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "openvino": _openvino_version(),
        "cpu_flags": sorted(detect_cpu().flags),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        # Other work on a shared machine shows here; compare runs only at similar load.
        "load_average_start": list(os.getloadavg()),
    }
    return info


def _openvino_version() -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino

    return str(openvino.get_version())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_backends(
    loaded: Any, artifacts_dir: Path, threads: int = 0, max_batch: int = 32
) -> list[tuple[str, EncoderFactory]]:
    """PyTorch fp32 first, then every ONNX artefact in ``artifacts_dir`` on each provider.

    GPU rows (PyTorch fp16/bf16 on CUDA, ONNX Runtime CUDA/TensorRT EPs, TensorRT engines)
    are added when this machine has them.
    """
    import torch

    from triagenode.inference.backends.artifacts import (
        IMAGE_FP16,
        IMAGE_FP32,
        IMAGE_INT8_DYNAMIC,
        IMAGE_INT8_STATIC,
    )
    from triagenode.inference.backends.onnxruntime import (
        OnnxRuntimeImageEncoder,
        available_providers,
    )
    from triagenode.inference.backends.torch import TorchImageEncoder

    if threads:
        torch.set_num_threads(threads)
    out: list[tuple[str, EncoderFactory]] = [
        (
            "torch-cpu-fp32",
            lambda: TorchImageEncoder(loaded, device="cpu", precision="fp32", max_batch=max_batch),
        ),
    ]
    if detect_cpu().bf16:
        out.append(
            (
                "torch-cpu-bf16",
                lambda: TorchImageEncoder(
                    loaded, device="cpu", precision="bf16", max_batch=max_batch
                ),
            )
        )
    folder = Path(artifacts_dir)

    def ort(path: Path, provider: str) -> EncoderFactory:
        return lambda: OnnxRuntimeImageEncoder(
            path, providers=[provider], threads=threads, max_batch=max_batch
        )

    cpu_files = [
        (IMAGE_FP32, "fp32"),
        (IMAGE_INT8_DYNAMIC, "int8-dynamic"),
        (IMAGE_INT8_STATIC, "int8-static"),
    ]
    for file, label in cpu_files:
        if (folder / file).is_file():
            out.append((f"onnxruntime-cpu-{label}", ort(folder / file, "CPUExecutionProvider")))
    # Variants saved beside them by hand (image.int8-dynamic-<variant>.onnx) are compared too.
    known = {f for f, _ in cpu_files} | {IMAGE_FP16}
    for path in sorted(folder.glob("image.*.onnx")):
        if path.name not in known:
            label = path.name.removeprefix("image.").removesuffix(".onnx")
            out.append((f"onnxruntime-cpu-{label}", ort(path, "CPUExecutionProvider")))
    if importlib.util.find_spec("openvino") is not None:
        for prec in ("fp32", "bf16", "int8"):
            out.append((f"openvino-cpu-{prec}", _openvino_factory(loaded, folder, prec, threads)))
    if torch.cuda.is_available():
        for prec in ("fp16", "bf16"):
            out.append((f"torch-cuda-{prec}", _torch_factory(loaded, prec, max_batch)))
        for provider in available_providers()[:2]:
            short = "trt-ep" if provider.startswith("Tensorrt") else "cuda-ep"
            for file, label in [
                (IMAGE_FP32, "fp32"),
                (IMAGE_FP16, "fp16"),
                (IMAGE_INT8_STATIC, "int8-static"),
            ]:
                if (folder / file).is_file():
                    out.append((f"onnxruntime-{short}-{label}", ort(folder / file, provider)))
        if importlib.util.find_spec("tensorrt") is not None:
            for file, prec in [(IMAGE_FP32, "fp16"), (IMAGE_INT8_STATIC, "int8")]:
                if (folder / file).is_file():
                    out.append(
                        (
                            f"tensorrt-{prec}",
                            _trt_factory(loaded, folder / file, prec, folder, max_batch),
                        )
                    )
    return out


def _torch_factory(loaded: Any, precision: str, max_batch: int) -> EncoderFactory:
    from triagenode.inference.backends.torch import TorchImageEncoder

    return lambda: TorchImageEncoder(
        loaded, device="cuda", precision=precision, max_batch=max_batch
    )


def _openvino_factory(loaded: Any, folder: Path, precision: str, threads: int) -> EncoderFactory:
    def make() -> ImageEncoder:
        from triagenode.errors import ModelLoadError
        from triagenode.inference.backends.artifacts import IMAGE_FP32, openvino_dir
        from triagenode.inference.backends.openvino import OpenVinoImageEncoder
        from triagenode.optimization.openvino_build import ensure_openvino_model

        cpu = detect_cpu()
        if precision == "bf16" and not cpu.bf16:
            raise ModelLoadError(f"CPU {cpu.name} has no native bf16 (AMX or AVX-512 BF16)")
        onnx = folder / IMAGE_FP32
        path = ensure_openvino_model(
            loaded,
            openvino_dir(folder),
            precision=precision,
            source_onnx=onnx if onnx.is_file() else None,
            # Built (or refused) beforehand by the benchmark's preparation, so the row's
            # memory figure is the backend serving, not its build.
            build=False,
        )
        return OpenVinoImageEncoder(path, precision=precision, threads=threads)

    return make


def _trt_factory(
    loaded: Any, onnx_path: Path, precision: str, folder: Path, max_batch: int
) -> EncoderFactory:
    def make() -> ImageEncoder:
        from triagenode.inference.backends.artifacts import engines_dir
        from triagenode.inference.backends.tensorrt import TensorRTImageEncoder
        from triagenode.optimization.tensorrt_build import ensure_engine

        size = loaded.preprocess.image_size
        engine = ensure_engine(
            onnx_path,
            engines_dir(folder),
            precision=precision,
            max_batch=max_batch,
            image_size=size,
        )
        return TensorRTImageEncoder(
            engine, precision=precision, max_batch=max_batch, image_size=size
        )

    return make
