"""A real Triton Inference Server for the tests: pytriton hosting an ONNX Runtime session.

Run as a script by ``tests/triton_support.py`` with a Python that has
``nvidia-pytriton`` (which bundles ``tritonserver`` 2.51 and its Python backend, but no ONNX
Runtime backend, so the ONNX file is run by ONNX Runtime on CPU inside the Python model).
pytriton pins ``numpy<2`` while the node runs on numpy 2, so the server usually lives in its
own virtual environment (``--system-site-packages``, plus ``nvidia-pytriton 'numpy<2'``);
the node under test talks to it over loopback gRPC only, as it would to a remote server.

Three models are served:

- ``--name`` (the image tower): ``pixel_values (-1,3,S,S) FP32 -> image_embeds (-1,D) FP32``,
  dynamic batching with the node's four priority levels, like ``export-triton`` writes it.
- ``no_priorities``: the same without priority levels (a model set up by someone else).
- ``order_probe`` (same tensors, batch size 1): its first request blocks until the test
  writes ``release`` on stdin; each output row is filled with the execution's sequence
  number, so the test sees in which order Triton's scheduler ran the queued requests.

Protocol on stdout: ``READY`` once both models are loaded, ``BUSY`` when the probe's first
request is executing. The server stops when stdin closes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import sysconfig
import threading


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    # pytriton's own progress (server start, model loading) goes to the test's server log
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    # The Python backend stub links libpython3.x dynamically: it must find this
    # interpreter's (pyenv, venv), not an older system copy with a different stdlib ABI.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = ":".join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p
    )

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    session = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    size = int(session.get_inputs()[0].shape[2])
    dim = int(session.get_outputs()[0].shape[1])
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    @batch
    def encode(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        pixels = inputs[input_name].astype(np.float32, copy=False)
        return {output_name: session.run([output_name], {input_name: pixels})[0]}

    release = threading.Event()
    executed: list[int] = []

    @batch
    def probe(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        n = len(inputs[input_name])
        if not executed:
            print("BUSY", flush=True)
            release.wait(120)
        executed.append(n)
        return {output_name: np.full((n, dim), float(len(executed)), dtype=np.float32)}

    tensors_in = [Tensor(name=input_name, dtype=np.float32, shape=(3, size, size))]
    tensors_out = [Tensor(name=output_name, dtype=np.float32, shape=(dim,))]
    levels = DynamicBatcher(
        max_queue_delay_microseconds=2000, priority_levels=4, default_priority_level=3
    )
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=5,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=encode,
            inputs=tensors_in,
            outputs=tensors_out,
            config=ModelConfig(max_batch_size=args.max_batch, batcher=levels),
            strict=True,
        )
        triton.bind(
            model_name="no_priorities",  # a model set up by someone else: no levels
            infer_func=encode,
            inputs=tensors_in,
            outputs=tensors_out,
            config=ModelConfig(max_batch_size=args.max_batch),
        )
        triton.bind(
            model_name="order_probe",
            infer_func=probe,
            inputs=tensors_in,
            outputs=tensors_out,
            config=ModelConfig(max_batch_size=1, batcher=levels),
        )
        triton.run()
        print("READY", flush=True)
        for line in sys.stdin:
            if line.strip() == "release":
                release.set()
        release.set()


if __name__ == "__main__":
    main()
