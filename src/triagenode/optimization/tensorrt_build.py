"""TensorRT engines from the ONNX image tower, built once per GPU and cached.

An engine is only valid for the GPU model, compute capability and TensorRT version that
built it, and for the exact ONNX graph and precision.
:func:`~triagenode.inference.backends.engine_cache.engine_cache_key` (beside the backend that
reads the engines) turns those into a file name; :func:`ensure_engine` returns
the cached engine when its key matches and builds one otherwise, so changing any input
rebuilds. A per-GPU timing cache makes rebuilds (new weights, other precision) fast.

Written against the TensorRT 10 Python API (``build_serialized_network``, optimisation
profiles, ``create_timing_cache``); INT8 uses explicit quantisation, i.e. the QDQ model from
``triagenode optimize quantize --mode static`` (calibrated on DICOM images), which is the
TensorRT 10 replacement of the deprecated implicit-quantisation calibrators.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from triagenode.inference.backends.engine_cache import (
    TENSORRT_PRECISIONS,
    GpuInfo,
    current_gpu,
    engine_path,
    find_tensorrt_engine,
    tensorrt_key,
)
from triagenode.optional import require

__all__ = ["build_engine", "ensure_engine"]

log = logging.getLogger(__name__)


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
    trt = require("tensorrt", "tensorrt", "Building a TensorRT engine")

    if precision not in TENSORRT_PRECISIONS:
        raise ValueError(f"precision must be one of {TENSORRT_PRECISIONS} (got {precision!r})")
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
    gpu = gpu or current_gpu()
    key = tensorrt_key(
        onnx_path, precision=precision, max_batch=max_batch, image_size=image_size, gpu=gpu
    )
    path = engine_path(cache_dir, key)
    if path.exists():
        log.info("TensorRT engine cache hit: %s", path.name)
        return path
    if not build:
        return find_tensorrt_engine(cache_dir, key)  # raises: names the engine and the command
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
