"""TensorRT image encoder (TensorRT 10 Python API), buffers owned by torch on CUDA.

The engine's I/O tensors are addressed by name (``set_input_shape``, ``set_tensor_address``)
and run with ``execute_async_v3`` on a dedicated torch CUDA stream, so no pycuda is needed.
Batches are padded up to a bucket (powers of two up to ``max_batch``); with CUDA graphs on,
each bucket's enqueue is captured once and replayed, which removes the per-kernel launch
cost that dominates batch-1 latency on a fast GPU (figures in ``docs/performance.md``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.errors import ModelLoadError
from triagenode.optional import MissingDependency, require

__all__ = ["TensorRTImageEncoder"]

log = logging.getLogger(__name__)


class _Bucket:
    """Static input/output buffers (and optionally a CUDA graph) for one batch size."""

    def __init__(self, inputs: Any, outputs: Any) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.graph: Any = None


class TensorRTImageEncoder:
    """:class:`~triagenode.inference.backends.base.ImageEncoder` over a TensorRT engine.

    Parameters
    ----------
    engine_path : pathlib.Path
        Serialised engine from :func:`triagenode.optimization.tensorrt_build.ensure_engine`.
    precision : str
        What the engine was built with (reported, not enforced).
    max_batch : int
        The engine profile's largest batch; bigger inputs are split.
    image_size : int
        Input side in pixels.
    device_index : int
        CUDA device ordinal.
    cuda_graphs : bool
        Capture one CUDA graph per batch bucket on first use and replay it afterwards.

    Raises
    ------
    ModelLoadError
        When TensorRT or CUDA is missing or the engine cannot be deserialised (for example
        built by another TensorRT version or for another GPU).
    """

    backend = "tensorrt"

    def __init__(
        self,
        engine_path: Path,
        *,
        precision: str = "fp16",
        max_batch: int = 32,
        image_size: int = 224,
        device_index: int = 0,
        cuda_graphs: bool = True,
    ) -> None:
        import torch

        try:
            trt = require("tensorrt", "tensorrt", "The tensorrt backend")
        except MissingDependency as exc:
            raise ModelLoadError(str(exc)) from exc
        if not torch.cuda.is_available():
            raise ModelLoadError("tensorrt backend needs a CUDA GPU; none is available")
        self._torch = torch
        self.device = f"cuda:{device_index}"
        self._cuda = torch.device("cuda", device_index)
        self.precision = precision
        self.max_batch = max_batch
        self.image_size = image_size
        self.cuda_graphs = cuda_graphs
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self._cuda):
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise ModelLoadError(
                    f"TensorRT engine {engine_path}: cannot deserialise (built for another "
                    "GPU or TensorRT version?); rebuild with `triagenode optimize build-trt`"
                )
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self._cuda)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelLoadError(
                f"TensorRT engine {engine_path}: expected 1 input and 1 output, "
                f"found {inputs} and {outputs}"
            )
        self._input, self._output = inputs[0], outputs[0]
        self._in_dtype = _torch_dtype(torch, trt, self.engine.get_tensor_dtype(self._input))
        self._out_dtype = _torch_dtype(torch, trt, self.engine.get_tensor_dtype(self._output))
        self.embed_dim = int(self.engine.get_tensor_shape(self._output)[-1])
        self._buckets: dict[int, _Bucket] = {}
        # One execution context and one set of bucket buffers: calls must not interleave.
        self._lock = threading.Lock()
        log.info(
            "tensorrt encoder %s (%s, batch <= %d, cuda graphs %s)",
            Path(engine_path).name,
            precision,
            max_batch,
            cuda_graphs,
        )

    def _bucket(self, batch: int) -> tuple[int, _Bucket]:
        from triagenode.inference.backends.torch import batch_buckets

        size = next(b for b in batch_buckets(self.max_batch) if b >= batch)
        bucket = self._buckets.get(size)
        if bucket is None:
            torch = self._torch
            shape = (size, 3, self.image_size, self.image_size)
            bucket = _Bucket(
                torch.zeros(shape, dtype=self._in_dtype, device=self._cuda),
                torch.empty((size, self.embed_dim), dtype=self._out_dtype, device=self._cuda),
            )
            self._buckets[size] = bucket
        return size, bucket

    def _enqueue(self, size: int, bucket: _Bucket) -> None:
        self.context.set_input_shape(self._input, tuple(bucket.inputs.shape))
        self.context.set_tensor_address(self._input, bucket.inputs.data_ptr())
        self.context.set_tensor_address(self._output, bucket.outputs.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed at batch {size}")

    def _run(self, size: int, bucket: _Bucket) -> None:
        torch = self._torch
        if not self.cuda_graphs:
            self._enqueue(size, bucket)
            return
        if bucket.graph is None:
            # TensorRT applies shape changes lazily: one plain enqueue first, so the capture
            # records only kernels and no deferred set-up work.
            self._enqueue(size, bucket)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue(size, bucket)
            bucket.graph = graph
        elif self.context.get_tensor_shape(self._input)[0] != size:
            # A replay does not set the context's shape; later eager calls must see the truth.
            self.context.set_input_shape(self._input, tuple(bucket.inputs.shape))
        with torch.cuda.stream(self.stream):
            bucket.graph.replay()

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings ``(N, embed_dim)`` of preprocessed ``(N,3,H,W)`` images."""
        out = np.empty((len(images), self.embed_dim), dtype=np.float32)
        with self._lock:
            self._encode_into(images, out)
        return out

    def _encode_into(self, images: np.ndarray, out: np.ndarray) -> None:
        torch = self._torch
        for start in range(0, len(images), self.max_batch):
            chunk = np.ascontiguousarray(images[start : start + self.max_batch], np.float32)
            n = len(chunk)
            size, bucket = self._bucket(n)
            host = torch.from_numpy(chunk)
            with torch.cuda.stream(self.stream):
                bucket.inputs[:n].copy_(host, non_blocking=False)
                if n < size:
                    bucket.inputs[n:].zero_()
                self._run(size, bucket)
                result = bucket.outputs[:n].float()
            self.stream.synchronize()
            emb = result.cpu().numpy()
            out[start : start + n] = emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def close(self) -> None:
        self._buckets.clear()
        self.context = None
        self.engine = None


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise ModelLoadError(f"TensorRT engine I/O dtype {dtype} is not supported")
    return table[dtype]
