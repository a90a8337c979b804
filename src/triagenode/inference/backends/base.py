"""The interface every inference backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["ImageEncoder", "PrioritizedImageEncoder"]


@runtime_checkable
class ImageEncoder(Protocol):
    """Turns a batch of preprocessed images into L2-normalised embeddings.

    Input: float32 array of shape ``(N, 3, H, W)``, already resized and normalised by the
    model's preprocess config. Output: float32 array ``(N, embed_dim)`` with unit rows.
    Backends: ``torch`` (PyTorch), ``onnxruntime``, ``openvino``, ``tensorrt``, ``triton``.
    """

    backend: str  # "torch", "onnxruntime", "openvino", "tensorrt" or "triton"
    device: str  # "cpu" or "cuda[:n]"
    precision: str  # "fp32", "fp16", "bf16" or "int8"
    embed_dim: int
    image_size: int

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


@runtime_checkable
class PrioritizedImageEncoder(Protocol):
    """An encoder that can pass a batch's priority on (``triton``: as request priority).

    The batcher calls :meth:`encode_prioritized` with the most urgent priority among the
    batch's images (a :class:`~triagenode.domain.Priority` value) when the encoder has it,
    else plain ``encode``.
    """

    def encode_prioritized(self, images: np.ndarray, priority: int) -> np.ndarray: ...
