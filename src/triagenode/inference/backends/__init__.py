"""Inference backends behind the :class:`~triagenode.inference.backends.base.ImageEncoder`
protocol, and :func:`create_encoder`, which builds the one ``model.backend`` names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from triagenode.errors import ConfigError
from triagenode.inference.backends.base import ImageEncoder

__all__ = ["ImageEncoder", "create_encoder"]


def create_encoder(
    loaded_model: Any, model_settings: Any, artifacts_dir: Path | None = None
) -> ImageEncoder:
    """The image encoder for ``model_settings.backend``.

    ``torch``: PyTorch. ``triton``: a Triton server (no fallback). ``onnxruntime``,
    ``openvino``, ``tensorrt`` and ``auto``: chosen by
    :func:`~triagenode.inference.backends.select.select_backend` from the artefacts in
    ``artifacts_dir`` (default ``model_settings.artifacts_dir``), falling back with a warning.

    Parameters
    ----------
    loaded_model
        A :class:`~triagenode.inference.model.LoadedModel`.
    model_settings
        The ``[model]`` section: backend, device, precision, max_batch, threads.
    artifacts_dir
        ONNX models, OpenVINO models and TensorRT engines (``Settings.artifacts_dir``).

    Raises
    ------
    ConfigError
        For a backend this build cannot create, or a device/precision it cannot serve.
    """
    backend = getattr(model_settings, "backend", "auto")
    if backend in ("auto", "onnxruntime", "openvino", "tensorrt", "triton"):
        from triagenode.inference.backends.select import select_backend

        folder = artifacts_dir or getattr(model_settings, "artifacts_dir", None)
        return select_backend(model_settings, folder, loaded_model)
    threads = int(getattr(model_settings, "threads", 0) or 0)
    if backend in ("auto", "torch"):
        import torch

        from triagenode.inference.backends.torch import TorchImageEncoder

        if threads:
            torch.set_num_threads(threads)
        return TorchImageEncoder(
            loaded_model,
            device=getattr(model_settings, "device", "auto"),
            precision=getattr(model_settings, "precision", "auto"),
            max_batch=int(getattr(model_settings, "max_batch", 32)),
        )
    raise ConfigError(
        f"model.backend {backend!r}: not available through create_encoder (allowed: auto, torch)"
    )
