"""Where optimised model artefacts live and what they say about themselves.

``triagenode optimize`` writes these files into the artefacts folder (``model.artifacts_dir``,
default ``<data_dir>/engines``); the ``onnxruntime``, ``openvino`` and ``tensorrt`` backends and the
``auto`` selection read them. Every ONNX file carries the identity of the weights it was
exported from in its ``metadata_props``, so a stale artefact (exported from other weights)
is detected instead of silently serving another model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from triagenode.optional import require

__all__ = [
    "IMAGE_FP16",
    "IMAGE_FP32",
    "IMAGE_INT8_DYNAMIC",
    "IMAGE_INT8_STATIC",
    "METADATA_PREFIX",
    "TEXT_FP32",
    "engines_dir",
    "openvino_dir",
    "read_onnx_metadata",
]

IMAGE_FP32 = "image.onnx"
IMAGE_FP16 = "image.fp16.onnx"
IMAGE_INT8_DYNAMIC = "image.int8-dynamic.onnx"
IMAGE_INT8_STATIC = "image.int8-static.onnx"
TEXT_FP32 = "text.onnx"
METADATA_PREFIX = "triagenode."


def engines_dir(artifacts_dir: Path) -> Path:
    """Folder of cached TensorRT engines inside the artefacts folder."""
    return Path(artifacts_dir) / "trt"


def openvino_dir(artifacts_dir: Path) -> Path:
    """Folder of cached OpenVINO models (IR per CPU, OpenVINO version, source, precision)."""
    return Path(artifacts_dir) / "openvino"


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """The ``triagenode.*`` metadata of an ONNX file, JSON values decoded.

    Only the model header is parsed (weights are not loaded), so this is cheap even for
    a 350 MB ViT-B/16 file.
    """
    onnx = require("onnx", "onnx", "Reading an ONNX model's metadata")
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            key = prop.key[len(METADATA_PREFIX) :]
            try:
                out[key] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[key] = prop.value
    return out
