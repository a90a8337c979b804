"""Finding compiled models in the cache: TensorRT engines and OpenVINO IRs.

A compiled model is only valid for the hardware and runtime version that built it and for
the exact source model and precision. The keys below turn those into a file name (pure
functions, tested without TensorRT or OpenVINO); :func:`find_tensorrt_engine` and
:func:`find_openvino_model` answer "is there a cached model for this machine?". Building one
on a miss is the job of :mod:`triagenode.optimization` (``tensorrt_build``,
``openvino_build``), which imports this module; backends never import it back, so selecting
a backend hands a build to an :class:`EngineBuilder` it is given
(:func:`~triagenode.inference.backends.select.select_backend`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from triagenode.inference.backends.cpu import INFERENCE_FLAGS, CpuCapabilities, detect_cpu
from triagenode.optional import require

__all__ = [
    "OPENVINO_PRECISIONS",
    "TENSORRT_PRECISIONS",
    "EngineBuilder",
    "EngineKey",
    "GpuInfo",
    "OpenVinoKey",
    "current_gpu",
    "engine_cache_key",
    "engine_path",
    "file_sha256",
    "find_openvino_model",
    "find_tensorrt_engine",
    "openvino_cache_key",
    "openvino_key",
    "openvino_model_path",
    "tensorrt_key",
]

TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


# TensorRT ------------------------------------------------------------------------------------


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
    if key.precision not in TENSORRT_PRECISIONS:
        raise ValueError(f"precision must be one of {TENSORRT_PRECISIONS} (got {key.precision!r})")
    gpu = re.sub(r"[^a-z0-9]+", "-", key.gpu.name.lower()).strip("-") or "gpu"
    major, minor = key.gpu.compute_capability
    trt = re.sub(r"[^0-9.]+", "", key.gpu.tensorrt_version)
    digest = _digest(key.to_dict())
    return f"{gpu}-sm{major}{minor}-trt{trt}-{key.precision}-b{key.max_batch}-{digest}"


def engine_path(cache_dir: Path, key: EngineKey) -> Path:
    """``cache_dir/<engine_cache_key>.engine``."""
    return Path(cache_dir) / f"{engine_cache_key(key)}.engine"


def current_gpu(device_index: int = 0) -> GpuInfo:
    """This machine's GPU and TensorRT version.

    Raises
    ------
    MissingDependency
        When TensorRT is not installed (the message names ``triagenode[tensorrt]``).
    RuntimeError
        When CUDA is not available.
    """
    trt = require("tensorrt", "tensorrt", "A TensorRT engine")
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; torch.cuda is not available")
    major, minor = torch.cuda.get_device_capability(device_index)
    return GpuInfo(
        name=torch.cuda.get_device_name(device_index),
        compute_capability=(int(major), int(minor)),
        tensorrt_version=trt.__version__,
    )


def tensorrt_key(
    onnx_path: Path,
    *,
    precision: str,
    max_batch: int,
    image_size: int,
    gpu: GpuInfo | None = None,
) -> EngineKey:
    """The key of the engine for this ONNX file on this GPU (``gpu`` detected when None)."""
    return EngineKey(
        gpu or current_gpu(), file_sha256(Path(onnx_path)), precision, max_batch, image_size
    )


def find_tensorrt_engine(cache_dir: Path, key: EngineKey) -> Path:
    """The cached engine for ``key``.

    Raises
    ------
    FileNotFoundError
        When no engine matches (its message says how to build one).
    """
    path = engine_path(cache_dir, key)
    if not path.exists():
        raise FileNotFoundError(
            f"no TensorRT engine {path.name} for this GPU, ONNX file and precision; "
            "run `triagenode optimize build-trt`"
        )
    return path


# OpenVINO ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenVinoKey:
    """Everything a cached model depends on; equal keys mean interchangeable models."""

    cpu: str  # e.g. "AMD EPYC" or "Intel(R) Xeon(R) Platinum 8480+"
    cpu_flags: tuple[str, ...]  # the inference flags of :mod:`...backends.cpu`, sorted
    openvino_version: str  # e.g. "2026.4.1-22982-..."
    source_sha256: str  # the ONNX file's SHA-256, or "torch:<weights sha256>"
    precision: str  # fp32, bf16 or int8
    image_size: int

    @classmethod
    def for_cpu(
        cls,
        cpu: CpuCapabilities,
        openvino_version: str,
        source_sha256: str,
        precision: str,
        image_size: int,
    ) -> OpenVinoKey:
        flags = tuple(sorted(cpu.flags & frozenset(INFERENCE_FLAGS)))
        return cls(cpu.name, flags, openvino_version, source_sha256, precision, image_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def openvino_cache_key(key: OpenVinoKey) -> str:
    """File stem for a model: readable prefix plus a hash of every field of ``key``.

    Pure: the same key always gives the same name and any changed field a different one.

    Examples
    --------
    ``amd-epyc-ov2026.4.1-bf16-s224-3f2a...`` (24 hex digits at the end).
    """
    if key.precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {OPENVINO_PRECISIONS} (got {key.precision!r})")
    cpu = re.sub(r"[^a-z0-9]+", "-", key.cpu.lower()).strip("-") or "cpu"
    version = re.sub(r"[^0-9.]+", "", key.openvino_version.split("-")[0])
    digest = _digest(key.to_dict())
    return f"{cpu}-ov{version}-{key.precision}-s{key.image_size}-{digest}"


def openvino_model_path(cache_dir: Path, key: OpenVinoKey) -> Path:
    """``cache_dir/<openvino_cache_key>.xml`` (its weights in the ``.bin`` beside it)."""
    return Path(cache_dir) / f"{openvino_cache_key(key)}.xml"


def openvino_key(
    loaded: Any,
    *,
    precision: str,
    openvino_version: str,
    source_onnx: Path | None = None,
    cpu: CpuCapabilities | None = None,
) -> OpenVinoKey:
    """The key of the model for this source and precision on this CPU (detected when None).

    The source is ``source_onnx`` (hashed) or, without it, the PyTorch weights of ``loaded``
    (a :class:`~triagenode.inference.model.LoadedModel`, keyed by their hash).
    """
    source = (
        file_sha256(Path(source_onnx))
        if source_onnx is not None
        else f"torch:{loaded.identity.weights_sha256}"
    )
    return OpenVinoKey.for_cpu(
        cpu or detect_cpu(),
        openvino_version,
        source,
        precision,
        int(loaded.preprocess.image_size),
    )


def find_openvino_model(cache_dir: Path, key: OpenVinoKey) -> Path:
    """The cached IR (``.xml`` with its ``.bin``) for ``key``.

    Raises
    ------
    FileNotFoundError
        When no model matches (its message says how to build one).
    """
    path = openvino_model_path(cache_dir, key)
    if not (path.is_file() and path.with_suffix(".bin").is_file()):
        raise FileNotFoundError(
            f"no OpenVINO model {path.name} for this CPU, OpenVINO version, source and "
            'precision; select model.backend = "openvino" to build it'
        )
    return path


# Building on a miss --------------------------------------------------------------------------


class EngineBuilder(Protocol):
    """Builds a missing compiled model; :mod:`triagenode.optimization` provides one."""

    def tensorrt_engine(
        self, onnx_path: Path, cache_dir: Path, *, precision: str, max_batch: int, image_size: int
    ) -> Path:
        """The engine for ``onnx_path`` in ``cache_dir``, built when missing."""
        ...

    def openvino_model(
        self,
        loaded: Any,
        cache_dir: Path,
        *,
        precision: str,
        source_onnx: Path | None,
        threads: int,
    ) -> Path:
        """The IR for ``loaded`` (or ``source_onnx``) in ``cache_dir``, built when missing."""
        ...
