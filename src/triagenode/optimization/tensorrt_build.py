"""TensorRT engines from the ONNX image tower, built once per GPU and cached.

An engine is only valid for the GPU model, compute capability and TensorRT version that
built it, and for the exact ONNX graph and precision. :func:`engine_cache_key` turns those
into a file name (a pure function, tested without TensorRT); :func:`ensure_engine` returns
the cached engine when its key matches and builds one otherwise, so changing any input
rebuilds. A per-GPU timing cache makes rebuilds (new weights, other precision) fast.

Written against the TensorRT 10 Python API (``build_serialized_network``, optimisation
profiles, ``create_timing_cache``); INT8 uses explicit quantisation, i.e. the QDQ model from
``triagenode optimize quantize --mode static`` (calibrated on DICOM images), which is the
TensorRT 10 replacement of the deprecated implicit-quantisation calibrators.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EngineKey",
    "GpuInfo",
    "build_engine",
    "current_gpu",
    "engine_cache_key",
    "engine_path",
    "ensure_engine",
]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class GpuInfo:
    """What makes an engine portable or not: the device and the TensorRT build."""

    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]  # e.g. (9, 0)
    tensorrt_version: str  # e.g. "10.3.0"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; two builds with equal keys are interchangeable."""

    gpu: GpuInfo
    onnx_sha256: str
    precision: str  # fp32, fp16 or int8
    max_batch: int
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_cache_key(key: EngineKey) -> str:
    """File stem for an engine: readable prefix plus a hash of every field of ``key``.

    Pure: the same key always gives the same name and any changed field a different one.

    Examples
    --------
    ``nvidia-h100-80gb-hbm3-sm90-trt10.3.0-fp16-b256-3f2a...`` (24 hex digits at the end).
    """
    if key.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (got {key.precision!r})")
    canonical = json.dumps(key.to_dict(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:24]
    gpu = re.sub(r"[^a-z0-9]+", "-", key.gpu.name.lower()).strip("-") or "gpu"
    major, minor = key.gpu.compute_capability
    trt = re.sub(r"[^0-9.]+", "", key.gpu.tensorrt_version)
    return f"{gpu}-sm{major}{minor}-trt{trt}-{key.precision}-b{key.max_batch}-{digest}"


def engine_path(cache_dir: Path, key: EngineKey) -> Path:
    """``cache_dir/<engine_cache_key>.engine``."""
    return Path(cache_dir) / f"{engine_cache_key(key)}.engine"


def current_gpu(device_index: int = 0) -> GpuInfo:
    """This machine's GPU and TensorRT version.

    Raises
    ------
    RuntimeError
        When CUDA or TensorRT is not available.
    """
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; torch.cuda is not available")
    return GpuInfo(
        name=torch.cuda.get_device_name(device_index),
        compute_capability=tuple(torch.cuda.get_device_capability(device_index)),  # type: ignore[arg-type]
        tensorrt_version=trt.__version__,
    )


def build_engine(
    onnx_path: Path,
    out_path: Path,
    *,
    precision: str = "fp16",
    max_batch: int = 32,
    opt_batch: int | None = None,
    image_size: int = 224,
    timing_cache: Path | None = None,
    workspace_bytes: int = 4 << 30,
    input_name: str = "pixel_values",
) -> Path:
    """Build and serialise a TensorRT engine for the ONNX image tower.

    Parameters
    ----------
    onnx_path : pathlib.Path
        fp32 ``image.onnx`` for fp32/fp16; the static QDQ ``image.int8-static.onnx`` for int8.
    out_path : pathlib.Path
        Engine file; written atomically.
    precision : {"fp32", "fp16", "int8"}
        ``fp16`` allows half-precision kernels; ``int8`` allows int8 (from the QDQ nodes)
        and fp16 for the unquantised layers.
    max_batch : int
        Optimisation profile covers batch 1..max_batch.
    opt_batch : int, optional
        Batch the kernels are tuned for; ``max_batch`` by default.
    image_size : int
        Input side in pixels.
    timing_cache : pathlib.Path, optional
        Read before and written after the build.
    workspace_bytes : int
        Builder workspace limit.
    input_name : str
        The ONNX input.

    Returns
    -------
    pathlib.Path
        ``out_path``.

    Raises
    ------
    RuntimeError
        When the ONNX file cannot be parsed or the build fails (TensorRT's errors included).
    """
    import tensorrt as trt

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    shape = (3, image_size, image_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_name, (1, *shape), (opt_batch or max_batch, *shape), (max_batch, *shape)
    )
    config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT build of {onnx_path} ({precision}) failed; see its log")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, out_path)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info(
        "built TensorRT engine %s (%s, batch 1..%d) in %.0f s",
        out_path.name,
        precision,
        max_batch,
        time.perf_counter() - started,
    )
    return out_path


def ensure_engine(
    onnx_path: Path,
    cache_dir: Path,
    *,
    precision: str = "fp16",
    max_batch: int = 32,
    image_size: int = 224,
    gpu: GpuInfo | None = None,
    build: bool = True,
) -> Path:
    """The cached engine for this GPU, ONNX file and precision; built when missing.

    Parameters
    ----------
    onnx_path : pathlib.Path
        Source ONNX model (hashed: a re-export with other weights gets another engine).
    cache_dir : pathlib.Path
        Engine cache (``<data_dir>/engines/trt``); holds the per-GPU timing cache too.
    precision, max_batch, image_size
        As for :func:`build_engine`.
    gpu : GpuInfo, optional
        Defaults to :func:`current_gpu`.
    build : bool
        When False, a missing engine raises instead of being built (a build takes minutes).

    Returns
    -------
    pathlib.Path
        The engine file.

    Raises
    ------
    FileNotFoundError
        When ``build`` is False and no engine matches.
    """
    from triagenode.optimization.onnx_export import file_sha256

    gpu = gpu or current_gpu()
    key = EngineKey(gpu, file_sha256(Path(onnx_path)), precision, max_batch, image_size)
    path = engine_path(cache_dir, key)
    if path.exists():
        log.info("TensorRT engine cache hit: %s", path.name)
        return path
    if not build:
        raise FileNotFoundError(
            f"no TensorRT engine {path.name} for this GPU, ONNX file and precision; "
            "run `triagenode optimize build-trt`"
        )
    cc = "".join(map(str, gpu.compute_capability))
    timing = Path(cache_dir) / f"timing-sm{cc}-trt{gpu.tensorrt_version}.cache"
    build_engine(
        onnx_path,
        path,
        precision=precision,
        max_batch=max_batch,
        image_size=image_size,
        timing_cache=timing,
    )
    path.with_suffix(".json").write_text(json.dumps(key.to_dict(), indent=2))
    return path
