"""Inference backends behind the :class:`~triagenode.inference.backends.base.ImageEncoder`
protocol, and :func:`create_encoder`, which builds the one ``model.backend`` names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from triagenode.inference.backends.base import ImageEncoder
from triagenode.inference.backends.engine_cache import EngineBuilder

__all__ = ["ImageEncoder", "create_encoder"]


def create_encoder(
    loaded_model: Any,
    model_settings: Any,
    artifacts_dir: Path | None = None,
    *,
    builder: EngineBuilder | None = None,
) -> ImageEncoder:
    """The image encoder for ``model_settings.backend``, opened by
    :func:`~triagenode.inference.backends.select.select_backend`: ``triton`` is a Triton
    server (no fallback); the others are chosen from the artefacts in ``artifacts_dir``
    (default ``model_settings.artifacts_dir``), falling back with a warning.

    Parameters
    ----------
    loaded_model
        A :class:`~triagenode.inference.model.LoadedModel`.
    model_settings
        The ``[model]`` section: backend, device, precision, max_batch, threads.
    artifacts_dir
        ONNX models, OpenVINO models and TensorRT engines (``Settings.artifacts_dir``).
    builder
        Builds a compiled model missing from that cache (see ``select_backend``).

    Raises
    ------
    ModelLoadError
        When no backend, not even PyTorch on the CPU, can be opened.
    """
    from triagenode.inference.backends.select import select_backend

    folder = artifacts_dir or getattr(model_settings, "artifacts_dir", None)
    return select_backend(model_settings, folder, loaded_model, builder=builder)
