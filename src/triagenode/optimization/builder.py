"""The :class:`~triagenode.inference.backends.engine_cache.EngineBuilder` that backend
selection is given, so a node builds a compiled model missing from the cache at start-up
(an OpenVINO IR in seconds; a TensorRT engine, in minutes, only when ``model.backend`` names
``tensorrt``) while :mod:`triagenode.inference` never imports this package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from triagenode.optimization.openvino_build import ensure_openvino_model
from triagenode.optimization.tensorrt_build import ensure_engine

__all__ = ["OptimizationBuilder"]


class OptimizationBuilder:
    """Builds on a cache miss with :func:`ensure_engine` and :func:`ensure_openvino_model`."""

    def tensorrt_engine(
        self, onnx_path: Path, cache_dir: Path, *, precision: str, max_batch: int, image_size: int
    ) -> Path:
        return ensure_engine(
            onnx_path, cache_dir, precision=precision, max_batch=max_batch, image_size=image_size
        )

    def openvino_model(
        self,
        loaded: Any,
        cache_dir: Path,
        *,
        precision: str,
        source_onnx: Path | None,
        threads: int,
    ) -> Path:
        return ensure_openvino_model(
            loaded, cache_dir, precision=precision, source_onnx=source_onnx, threads=threads
        )
