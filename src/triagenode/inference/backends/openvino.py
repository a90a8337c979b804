"""OpenVINO image encoder for CPUs: bf16 where the CPU has AMX or AVX-512 BF16, else fp32.

The model it runs is an OpenVINO IR (``.xml`` + ``.bin``) that
:func:`triagenode.optimization.openvino_build.ensure_openvino_model` prepared from the
parity-checked ONNX export (or converted from PyTorch), checked against PyTorch fp32 and
cached per CPU, OpenVINO version, source model and precision. Compiling it takes a second or
two; it is done at start-up with ``INFERENCE_PRECISION_HINT``, ``INFERENCE_NUM_THREADS``
(``model.threads``) and ``PERFORMANCE_HINT`` (``model.performance_hint``).

Why the IR and not an exported compiled blob: the blob of ViT-B/16 holds fp32 weights,
importing it raised the resident memory more than ONNX Runtime fp32 does and was no faster
than compiling; the bf16 IR stores fp16 weights and compiles in seconds
(``docs/performance.md``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.errors import ConfigError, ModelLoadError
from triagenode.inference.backends.cpu import CpuCapabilities, detect_cpu
from triagenode.optional import MissingDependency, install_hint, require

__all__ = [
    "INSTALL_HINT",
    "OpenVinoImageEncoder",
    "import_openvino",
    "openvino_hint",
    "resolve_openvino_precision",
]

log = logging.getLogger(__name__)

INSTALL_HINT = install_hint("openvino")
_HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}


def import_openvino() -> Any:
    """The ``openvino`` module, or a :class:`ModelLoadError` naming the pip extra."""
    try:
        return require("openvino", "openvino", "The openvino backend")
    except MissingDependency as exc:
        raise ModelLoadError(str(exc)) from exc


def resolve_openvino_precision(
    precision: str,
    cpu: CpuCapabilities | None = None,
    device_capabilities: Iterable[str] | None = None,
) -> str:
    """The precision OpenVINO runs at on this CPU: ``bf16``, ``fp32`` or ``int8``.

    ``auto`` is bf16 where the CPU has native bf16 (AMX or AVX-512 BF16), else fp32. A bf16
    request on a CPU without it runs fp32 and says so at INFO (bf16 emulation would be slower
    than fp32, and never a crash).

    Parameters
    ----------
    precision : {"auto", "fp32", "bf16", "int8"}
        ``model.precision``.
    cpu : CpuCapabilities, optional
        Detected when None (tests inject one).
    device_capabilities : iterable of str, optional
        OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU device; bf16 also needs ``BF16``
        there. Not consulted when None.

    Raises
    ------
    ConfigError
        For ``fp16``, which OpenVINO's x86 CPU plugin does not run natively.
    """
    if precision in ("fp32", "int8"):
        return precision
    if precision not in ("auto", "bf16"):
        raise ConfigError(
            f"model.precision {precision!r}: the openvino backend runs fp32, bf16 or int8 "
            "on CPU (allowed: auto, fp32, bf16, int8)"
        )
    cpu = cpu or detect_cpu()
    native = cpu.bf16 and (device_capabilities is None or "BF16" in set(device_capabilities))
    if native:
        return "bf16"
    log.info(
        "CPU %s has no native bf16 (AMX or AVX-512 BF16): openvino runs fp32%s",
        cpu.name,
        "" if precision == "auto" else " instead of the requested bf16",
    )
    return "fp32"


def openvino_hint(precision: str, cpu: CpuCapabilities | None = None) -> str:
    """``INFERENCE_PRECISION_HINT`` for a resolved precision.

    INT8 models keep their unquantised layers in bf16 where the CPU has it.
    """
    if precision == "bf16":
        return "bf16"
    if precision == "int8" and (cpu or detect_cpu()).bf16:
        return "bf16"
    return "f32"


class OpenVinoImageEncoder:
    """:class:`~triagenode.inference.backends.base.ImageEncoder` over an OpenVINO IR.

    Parameters
    ----------
    model_path : pathlib.Path
        The IR's ``.xml`` (its ``.bin`` beside it).
    precision : {"fp32", "bf16", "int8"}
        Already resolved (:func:`resolve_openvino_precision`); sets the precision hint.
    threads : int
        ``INFERENCE_NUM_THREADS``; 0 lets OpenVINO use every core.
    performance_hint : {"latency", "throughput"}
        ``latency``: one stream, every thread on one batch (the node's batches are small).
        ``throughput``: several streams; a batch is split across them.
    cpu : CpuCapabilities, optional
        For the INT8 model's hint; detected when None.

    Raises
    ------
    ModelLoadError
        When OpenVINO is not installed (the message names the pip extra), the file is
        missing or the model does not compile.
    """

    backend = "openvino"
    device = "cpu"

    def __init__(
        self,
        model_path: Path,
        *,
        precision: str,
        threads: int = 0,
        performance_hint: str = "latency",
        cpu: CpuCapabilities | None = None,
    ) -> None:
        ov = import_openvino()
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelLoadError(f"OpenVINO model {self.model_path}: not found")
        if performance_hint not in _HINTS:
            raise ConfigError(
                f"model.performance_hint {performance_hint!r}: allowed: {', '.join(_HINTS)}"
            )
        self.precision = precision
        self.hint = openvino_hint(precision, cpu)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self.hint,
            "PERFORMANCE_HINT": _HINTS[performance_hint],
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            self.compiled = core.compile_model(str(self.model_path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with its reason
            raise ModelLoadError(
                f"OpenVINO model {self.model_path}: cannot compile ({exc})"
            ) from exc
        self.streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        shape = self.compiled.input(0).get_partial_shape()
        self.image_size = int(shape[3].get_length()) if shape[3].is_static else 224
        self.embed_dim = int(self.compiled.output(0).get_partial_shape()[-1].get_length())
        # Infer requests are not re-entrant: one batch at a time through this encoder.
        self._lock = threading.Lock()
        log.info(
            "openvino encoder %s (%s, precision hint %s, %s, %d stream(s), %s threads)",
            self.model_path.name,
            precision,
            self.hint,
            performance_hint,
            self.streams,
            threads or "all",
        )

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings ``(N, embed_dim)`` of preprocessed ``(N,3,H,W)`` images."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape (N, 3, {self.image_size}, {self.image_size}); "
                f"got {tuple(images.shape)}"
            )
        if len(images) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        with self._lock:
            if self.streams == 1 or len(images) < 2:
                out = self._requests[0].infer({0: images})[0]
            else:
                parts = np.array_split(images, min(self.streams, len(images)))
                for request, part in zip(self._requests, parts, strict=False):
                    request.start_async({0: part})
                results = []
                for request, _ in zip(self._requests, parts, strict=False):
                    request.wait()
                    results.append(np.array(request.get_output_tensor(0).data))
                out = np.concatenate(results)
        out = np.asarray(out, dtype=np.float32)
        # bf16 rounding leaves rows a little off unit length: normalise in fp32.
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def close(self) -> None:
        with self._lock:
            self._requests.clear()
            self.compiled = None
