"""Triton Python-backend model that runs ``model.onnx`` beside it with ONNX Runtime on CPU.

The tests copy this file as ``<repo>/<model>/1/model.py`` into a repository written by
``triagenode optimize export-triton`` and switch its ``platform: "onnxruntime_onnx"`` to
``backend: "python"``: the ``tritonserver`` bundled with nvidia-pytriton has the Python
backend but not the ONNX Runtime one. Everything else in ``config.pbtxt`` (tensors, dynamic
batching, priority levels, parameters) is the export's, as the server loads it.
"""

from __future__ import annotations

import os
from typing import Any

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.session = ort.InferenceSession(
            os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            pixels = pb_utils.get_input_tensor_by_name(request, self.input).as_numpy()
            embeddings = self.session.run([self.output], {self.input: pixels})[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output, embeddings)]))
        return responses
