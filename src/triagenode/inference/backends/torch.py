"""The PyTorch backend: the model's image tower in eager PyTorch, on CPU or CUDA.

- CPU: fp32, or bf16 on request: fp32 weights run under ``torch.autocast(bfloat16)``, so
  matrix products use the CPU's bf16 units (AMX or AVX-512 BF16, through oneDNN) while
  normalisation and softmax stay fp32. A CPU without native bf16 gets fp32 (an INFO line).
  Batches as given.
- CUDA: fp16 or bf16 weights (``auto``: bf16 where the GPU supports it), timm's fused
  scaled-dot-product attention switched on in every block, batches padded up to a bucket
  size (powers of two up to ``max_batch``) and one CUDA graph captured per bucket on first
  use, so that a batch costs one graph replay instead of hundreds of kernel launches, which
  dominate batch-1 latency on a fast GPU (figures in ``docs/performance.md``).
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from triagenode.errors import ConfigError
from triagenode.inference.backends.cpu import CpuCapabilities, detect_cpu

__all__ = ["TorchImageEncoder", "batch_buckets", "resolve_device", "resolve_precision"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device {device!r}: no CUDA device is visible (allowed: cpu)")
    return device


def resolve_precision(precision: str, device: str, cpu: CpuCapabilities | None = None) -> str:
    """``auto`` is fp32 on CPU and bf16 (else fp16) on CUDA; int8 belongs to other backends.

    bf16 on a CPU without native bf16 (``cpu``, detected when None) becomes fp32 with an
    INFO line: emulated bf16 is slower than fp32 there.
    """
    if precision == "auto":
        if not device.startswith("cuda"):
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in _DTYPES:
        raise ConfigError(
            f"model.precision {precision!r}: the torch backend supports fp32, fp16, bf16 "
            "(int8 needs the onnxruntime or tensorrt backend)"
        )
    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError("model.precision 'fp16' needs CUDA; on CPU use fp32 or bf16")
    if precision == "bf16" and not device.startswith("cuda"):
        cpu = cpu or detect_cpu()
        if not cpu.bf16:
            log.info(
                "CPU %s has no native bf16 (AMX or AVX-512 BF16): torch runs fp32 instead",
                cpu.name,
            )
            return "fp32"
    return precision


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, ... below ``max_batch``, then ``max_batch`` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return sizes


class _Graph:
    """One captured CUDA graph: a static input buffer and the output it fills."""

    def __init__(
        self,
        module: torch.nn.Module,
        batch: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: str,
    ) -> None:
        self.input = torch.zeros((batch, *shape), dtype=dtype, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm-up: lets cuDNN/cuBLAS pick kernels before capture
                module(self.input)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.output = functional.normalize(module(self.input).float(), dim=-1)

    def run(self, images: torch.Tensor) -> torch.Tensor:
        self.input[: images.shape[0]].copy_(images, non_blocking=True)
        self.graph.replay()
        return self.output


class TorchImageEncoder:
    """:class:`~triagenode.inference.backends.base.ImageEncoder` over ``clip.visual``.

    Parameters
    ----------
    loaded_model
        A :class:`~triagenode.inference.model.LoadedModel`; its image tower is copied, so
        the text tower stays on the CPU in fp32.
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    precision
        ``auto``, ``fp32``, ``fp16`` or ``bf16``.
    max_batch
        Largest batch sent to the model; bigger inputs are split.
    cuda_graphs
        Capture a CUDA graph per bucket (CUDA only).
    cpu
        The CPU's capabilities (bf16 or not); detected when None.
    """

    backend = "torch"

    def __init__(
        self,
        loaded_model: Any,
        device: str = "auto",
        precision: str = "auto",
        max_batch: int = 32,
        cuda_graphs: bool = True,
        cpu: CpuCapabilities | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, cpu)
        self.dtype = _DTYPES[self.precision]
        self.max_batch = int(max_batch)
        self.embed_dim = int(loaded_model.embed_dim)
        self.image_size = int(loaded_model.preprocess.image_size)
        self._cuda = self.device.startswith("cuda")
        # CPU bf16: fp32 weights under autocast (LayerNorm, softmax and the residual stream
        # stay fp32: closer to the reference than casting the whole module).
        self._autocast = not self._cuda and self.precision == "bf16"
        self._use_graphs = cuda_graphs and self._cuda
        self._buckets = batch_buckets(self.max_batch)
        self._graphs: dict[int, _Graph] = {}
        self._lock = threading.Lock()  # a CUDA graph's buffers serve one batch at a time
        visual = copy.deepcopy(loaded_model.visual).eval()
        for module in visual.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True  # timm Attention: F.scaled_dot_product_attention
        weights = torch.float32 if self._autocast else self.dtype
        self.module = visual.to(device=self.device, dtype=weights)
        log.info(
            "torch image encoder on %s, %s, max batch %d%s",
            self.device,
            self.precision,
            self.max_batch,
            ", CUDA graphs" if self._use_graphs else "",
        )

    def _check(self, images: np.ndarray) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, expected))}); "
                f"got {tuple(images.shape)}"
            )

    def _bucket(self, count: int) -> int:
        return next(size for size in self._buckets if size >= count)

    def _encode_chunk(self, chunk: np.ndarray) -> np.ndarray:
        count = chunk.shape[0]
        tensor = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        if not self._cuda:
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._autocast),
            ):
                out = self.module(tensor)
            return functional.normalize(out.float(), dim=-1).numpy()
        tensor = tensor.pin_memory().to(self.device, non_blocking=True).to(self.dtype)
        bucket = self._bucket(count)
        if self._use_graphs:
            graph = self._graphs.get(bucket)
            if graph is None:
                graph = self._graphs[bucket] = _Graph(
                    self.module, bucket, tuple(tensor.shape[1:]), self.dtype, self.device
                )
            out = graph.run(tensor)[:count]
        else:
            padded = torch.zeros((bucket, *tensor.shape[1:]), dtype=self.dtype, device=self.device)
            padded[:count] = tensor
            with torch.inference_mode():
                out = functional.normalize(self.module(padded).float(), dim=-1)[:count]
        return out.cpu().numpy()

    def encode(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings ``(N, embed_dim)`` float32 for images ``(N, 3, S, S)``."""
        self._check(images)
        if images.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        parts = []
        with self._lock:
            for start in range(0, images.shape[0], self.max_batch):
                parts.append(self._encode_chunk(images[start : start + self.max_batch]))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def close(self) -> None:
        """Drop CUDA graphs and the module's device memory."""
        with self._lock:
            self._graphs.clear()
            if self._cuda:
                torch.cuda.empty_cache()
