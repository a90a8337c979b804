"""ONNX Runtime image encoder: TensorRT EP, CUDA EP or CPU EP, whichever this machine has.

On CUDA the input and output live in torch CUDA tensors bound with IO binding, so ONNX
Runtime reads and writes device memory directly instead of copying through numpy for every
batch. On CPU the session uses ``model.threads`` intra-op threads and full graph
optimisation; the INT8 model (``triagenode optimize quantize``) is the fast CPU path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.errors import ModelLoadError
from triagenode.inference.backends.artifacts import engines_dir, read_onnx_metadata
from triagenode.optional import require

__all__ = [
    "PROVIDER_ORDER",
    "OnnxRuntimeImageEncoder",
    "available_providers",
    "choose_providers",
]

log = logging.getLogger(__name__)

_PURPOSE = "The onnxruntime backend"

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_SHORT = {"tensorrt": PROVIDER_ORDER[0], "cuda": PROVIDER_ORDER[1], "cpu": PROVIDER_ORDER[2]}
_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def available_providers() -> list[str]:
    """Execution providers this ONNX Runtime build offers, in :data:`PROVIDER_ORDER`."""
    ort = require("onnxruntime", "onnx", _PURPOSE)
    offered = set(ort.get_available_providers())
    return [p for p in PROVIDER_ORDER if p in offered]


def choose_providers(requested: Sequence[str] | None = None, device: str = "auto") -> list[str]:
    """Providers to open a session with, best first, CPU always last as the fallback.

    Parameters
    ----------
    requested : sequence of str, optional
        Override: full names or ``tensorrt``/``cuda``/``cpu``; unavailable ones are refused.
    device : {"auto", "cpu", "cuda"}
        ``cpu`` keeps only the CPU EP.

    Raises
    ------
    ModelLoadError
        When a requested provider is not in this ONNX Runtime build.
    """
    available = available_providers()
    if requested:
        wanted = [_SHORT.get(p.lower(), p) for p in requested]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ModelLoadError(
                f"onnxruntime providers {missing} are not available here; available: {available}"
            )
        return wanted
    if device == "cpu":
        return [PROVIDER_ORDER[2]]
    return available


def _provider_options(
    provider: str, model_path: Path, precision: str, max_batch: int, image_size: int, device_id: int
) -> dict[str, Any]:
    if provider == "TensorrtExecutionProvider":
        cache = engines_dir(model_path.parent) / "ort-trt"
        cache.mkdir(parents=True, exist_ok=True)
        shape = f"3x{image_size}x{image_size}"
        return {
            "device_id": device_id,
            "trt_fp16_enable": precision == "fp16",
            "trt_int8_enable": precision == "int8",  # QDQ model: explicit quantisation
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": f"pixel_values:1x{shape}",
            "trt_profile_opt_shapes": f"pixel_values:{max_batch}x{shape}",
            "trt_profile_max_shapes": f"pixel_values:{max_batch}x{shape}",
        }
    if provider == "CUDAExecutionProvider":
        return {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}
    return {}


class OnnxRuntimeImageEncoder:
    """:class:`~triagenode.inference.backends.base.ImageEncoder` over an ONNX image tower.

    Parameters
    ----------
    model_path : pathlib.Path
        ``image.onnx``, ``image.fp16.onnx`` or an INT8 variant.
    providers : sequence of str, optional
        Override of :func:`choose_providers`' choice.
    device : {"auto", "cpu", "cuda"}
        ``cpu`` forces the CPU EP.
    threads : int
        Intra-op threads (``model.threads``); 0 lets ONNX Runtime choose.
    graph_optimization : {"disable", "basic", "extended", "all"}
        ONNX Runtime graph optimisation level.
    max_batch : int
        Largest batch (sizes TensorRT EP optimisation profiles).
    device_id : int
        CUDA device ordinal.

    Raises
    ------
    ModelLoadError
        When the file is missing or ONNX Runtime cannot open it.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        *,
        providers: Sequence[str] | None = None,
        device: str = "auto",
        threads: int = 0,
        graph_optimization: str = "all",
        max_batch: int = 32,
        device_id: int = 0,
    ) -> None:
        ort = require("onnxruntime", "onnx", _PURPOSE)
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelLoadError(f"ONNX model {self.model_path}: not found")
        try:
            self.metadata = read_onnx_metadata(self.model_path)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ModelLoadError(f"ONNX model {self.model_path}: not readable ({exc})") from exc
        self.precision = str(self.metadata.get("precision", "fp32"))
        self.embed_dim = int(self.metadata.get("embed_dim", 0))
        self.image_size = int(self.metadata.get("preprocess", {}).get("image_size", 224))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization]
        )
        chosen = choose_providers(providers, device)
        opts = [
            _provider_options(
                p, self.model_path, self.precision, max_batch, self.image_size, device_id
            )
            for p in chosen
        ]
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), options, providers=chosen, provider_options=opts
            )
        except Exception as exc:
            raise ModelLoadError(f"ONNX model {self.model_path}: cannot open ({exc})") from exc
        self.providers = self.session.get_providers()
        on_gpu = self.providers[0] in PROVIDER_ORDER[:2]
        self.device = f"cuda:{device_id}" if on_gpu else "cpu"
        self._device_id = device_id
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name
        if not self.embed_dim:
            self.embed_dim = int(self.session.get_outputs()[0].shape[-1])
        log.info(
            "onnxruntime encoder %s on %s (%s)",
            self.model_path.name,
            self.providers[0],
            self.precision,
        )

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings ``(N, embed_dim)`` of preprocessed ``(N,3,H,W)`` images."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.device.startswith("cuda"):
            return self._encode_bound(images)
        return self.session.run([self._output], {self._input: images})[0]

    def _encode_bound(self, images: np.ndarray) -> np.ndarray:
        # IO binding with torch-owned CUDA buffers: one host->device copy in, one out, and
        # no ORT-side allocation per call.
        import torch

        device = torch.device("cuda", self._device_id)
        inputs = torch.from_numpy(images).to(device)
        outputs = torch.empty((images.shape[0], self.embed_dim), dtype=torch.float32, device=device)
        torch.cuda.current_stream(device).synchronize()  # ORT runs on its own stream
        binding = self.session.io_binding()
        binding.bind_input(
            self._input, "cuda", self._device_id, np.float32, tuple(inputs.shape), inputs.data_ptr()
        )
        binding.bind_output(
            self._output,
            "cuda",
            self._device_id,
            np.float32,
            tuple(outputs.shape),
            outputs.data_ptr(),
        )
        self.session.run_with_iobinding(binding)
        return outputs.cpu().numpy()

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
