"""``model.backend = "triton"`` against a real Triton Inference Server, and the batcher's
priority hand-off.

The server is ``tritonserver`` 2.51 from the ``nvidia-pytriton`` wheel, started by
``tests/triton_server.py`` on loopback ports and hosting the demo model's exported image
tower in ONNX Runtime on CPU. pytriton pins ``numpy<2`` and the node runs on numpy 2, so the
server runs from the Python named by ``TRIAGENODE_TEST_PYTRITON_PYTHON`` (a virtual
environment made with ``--system-site-packages`` and ``pip install nvidia-pytriton
'numpy<2'``), or from this Python when it has pytriton with numpy<2. Without either, the
server tests skip and say so; the tests that need no server (unreachable server, batcher
priority) always run.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.factory import ct_slice, write
from tests.onnx_fixtures import _demo_export_dir, demo_images, demo_model
from tests.peers import free_port, wait_for
from triagenode.config.labels import LabelSettings
from triagenode.config.settings import ModelSettings
from triagenode.domain import ImageRef, Priority
from triagenode.errors import ModelLoadError
from triagenode.inference.backends.base import ImageEncoder, PrioritizedImageEncoder
from triagenode.inference.backends.select import select_backend
from triagenode.inference.batcher import DynamicBatcher
from triagenode.inference.classifier import ZeroShotClassifier

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from triagenode.inference.backends.triton import (
    TritonImageEncoder,
    triton_priority,
)

PYTRITON_ENV = "TRIAGENODE_TEST_PYTRITON_PYTHON"
MODEL = "triagenode_image"
SERVER_MAX_BATCH = 8


def _pytriton_python() -> str | None:
    named = os.environ.get(PYTRITON_ENV)
    if named:
        return named
    if importlib.util.find_spec("pytriton") is not None and np.__version__.startswith("1."):
        return sys.executable
    return None


@dataclass
class TritonServer:
    url: str
    metrics_port: int
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    log: Path

    def expect(self, marker: str, timeout: float = 300.0) -> None:
        """Wait for a protocol line of tests/triton_server.py (stdout, read by a thread)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {marker} from the server: {self._tail()}") from None
            if line.strip() == marker:
                return
            if line == "":
                raise AssertionError(f"the Triton server exited before {marker}: {self._tail()}")

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def pending(self, model: str) -> float:
        """Requests queued in the server's scheduler (Prometheus metric)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("nv_inference_pending_request_count") and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    python = _pytriton_python()
    if python is None:
        pytest.skip(
            "no Triton server: nvidia-pytriton needs numpy<2 and this Python has numpy "
            f"{np.__version__}; set {PYTRITON_ENV} to a Python with nvidia-pytriton "
            "(see tests/triton_server.py)"
        )
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    log_path = tmp_path_factory.mktemp("triton") / "server.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [
            python,
            str(Path(__file__).with_name("triton_server.py")),
            "--onnx",
            str(_demo_export_dir() / "image.onnx"),
            "--name",
            MODEL,
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(metrics_port),
            "--max-batch",
            str(SERVER_MAX_BATCH),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    server = TritonServer(f"127.0.0.1:{grpc_port}", metrics_port, process, lines, log_path)
    try:
        server.expect("READY")
        yield server
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _settings(url: str, **triton: Any) -> ModelSettings:
    return ModelSettings(
        source="demo",
        backend="triton",
        max_batch=16,
        triton={"url": url, "model_name": MODEL, "timeout_s": 20, **triton},
    )


def _onnx_encoder() -> ImageEncoder:
    from triagenode.inference.backends.onnxruntime import OnnxRuntimeImageEncoder

    return OnnxRuntimeImageEncoder(_demo_export_dir() / "image.onnx", device="cpu")


def test_embeddings_through_triton_equal_the_local_onnxruntime_backend(triton_server) -> None:
    settings = _settings(triton_server.url, headers={"x-site": "north"})  # sent as metadata
    encoder = select_backend(settings, None, demo_model())
    try:
        assert isinstance(encoder, TritonImageEncoder) and encoder.backend == "triton"
        assert encoder.max_batch == SERVER_MAX_BATCH
        images = demo_images(SERVER_MAX_BATCH + 3)  # two requests: the server's limit is 8
        remote = encoder.encode(images)
        local = _onnx_encoder().encode(images)
        assert remote.shape == local.shape == (len(images), demo_model().embed_dim)
        np.testing.assert_allclose(remote, local, rtol=0, atol=1e-6)
    finally:
        encoder.close()


def test_the_nodes_results_through_triton_equal_the_local_backends(
    triton_server, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    images = []
    for index in range(3):
        ds = ct_slice(study, series, index, size=64, seed=11)
        path = write(ds, tmp_path / f"ct{index}.dcm")
        images.append((ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, series), path))
    remote = select_backend(_settings(triton_server.url), None, demo_model())
    results = []
    for encoder in (remote, _onnx_encoder()):
        with DynamicBatcher(encoder, max_batch=16, max_wait_ms=5) as batcher:
            classifier = ZeroShotClassifier(
                demo_model(), encoder, LabelSettings(), tmp_path / "cache", batcher=batcher
            )
            results.append(
                classifier.classify_study(
                    study,
                    images,
                    triage_inputs={"Modality": "CT", "BodyPartExamined": "HEAD"},
                    priority=Priority.stat,
                )
            )
    remote.close()
    through_triton, local = results
    assert through_triton.backend == "triton" and local.backend == "onnxruntime"
    assert [f.name for f in through_triton.findings] == [f.name for f in local.findings]
    assert [f.present for f in through_triton.findings] == [f.present for f in local.findings]
    np.testing.assert_allclose(
        [f.score for f in through_triton.findings], [f.score for f in local.findings], atol=1e-6
    )


def test_a_model_name_the_server_does_not_have_is_refused_naming_the_ready_ones(
    triton_server,
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        select_backend(_settings(triton_server.url, model_name="biomedclip"), None, demo_model())
    message = str(caught.value)
    assert f"Triton server {triton_server.url}, model 'biomedclip'" in message
    assert "is not ready on the server" in message
    # pytriton restricts the repository API (as production servers often do): the error
    # says so instead of listing the models.
    assert f"ready models: {MODEL}" in message or "does not list its models" in message


def test_a_model_of_other_dimensions_is_refused(triton_server) -> None:
    dim = demo_model().embed_dim
    with pytest.raises(ModelLoadError, match=r"does not fit this node's model") as caught:
        TritonImageEncoder(
            _settings(triton_server.url).triton,
            image_size=demo_model().preprocess.image_size,
            embed_dim=dim + 1,
        )
    assert f"output 'image_embeds' has shape [-1, {dim}], not [-1, {dim + 1}]" in str(caught.value)


def test_an_unreachable_server_is_a_clear_error_naming_the_url() -> None:
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ModelLoadError) as caught:
        select_backend(_settings(url, timeout_s=3), None, demo_model())
    message = str(caught.value)
    assert message.startswith(f"Triton server {url}, model '{MODEL}': the liveness check")
    assert "(is the server running?)" in message


def test_stat_overtakes_requests_queued_before_it_on_the_server(triton_server) -> None:
    """Triton's scheduler, not the node, reorders: the requests wait in the server's queue."""
    encoder = select_backend(
        _settings(triton_server.url, model_name="order_probe"), None, demo_model()
    )
    image = demo_images(1)
    assert triton_server.process.stdin is not None
    try:
        with ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(encoder.encode_prioritized, image, Priority.routine)
            triton_server.expect("BUSY")  # the probe's one instance is now occupied
            queued = {}
            for n, priority in enumerate((Priority.low, Priority.low, Priority.stat), 1):
                queued[priority, n] = pool.submit(encoder.encode_prioritized, image, priority)
                wait_for(lambda n=n: triton_server.pending("order_probe") >= n, timeout=30)
            triton_server.process.stdin.write("release\n")
            triton_server.process.stdin.flush()
            order = {key: int(f.result(60)[0, 0]) for key, f in queued.items()}
            assert int(blocker.result(60)[0, 0]) == 1
    finally:
        encoder.close()
    # Arrival order was low, low, stat; Triton ran stat first (execution 2), then the lows.
    assert order == {(Priority.stat, 3): 2, (Priority.low, 1): 3, (Priority.low, 2): 4}


_DIST = """
import pathlib, sys, sysconfig, pytriton
root = pathlib.Path(pytriton.__file__).parent
print(root / "tritonserver")
print(root.parent / "nvidia_pytriton.libs")
print(f"{sys.version_info[0]}.{sys.version_info[1]}")
print(pathlib.Path(sys.executable).parent)
print(sysconfig.get_config_var("LIBDIR"))
"""


@pytest.fixture
def exported_repository_server(tmp_path: Path, capsys) -> Iterator[str]:
    """``tritonserver`` itself (no pytriton) serving what ``export-triton`` wrote."""
    python = _pytriton_python()
    if python is None:
        pytest.skip(f"no tritonserver: set {PYTRITON_ENV} (see tests/triton_server.py)")
    from triagenode.cli import main

    found = subprocess.run([python, "-c", _DIST], capture_output=True, text=True, check=True)
    dist, libs, version, bindir, libdir = found.stdout.split("\n")[:5]
    server = tmp_path / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    stub = Path(dist) / "python_backend_stubs" / version / "triton_python_backend_stub"
    shutil.copy(stub, server / "backends" / "python")
    repo = tmp_path / "models"
    args = ["optimize", "export-triton", str(repo), "--artifacts", str(_demo_export_dir())]
    assert main([*args, "--max-batch", str(SERVER_MAX_BATCH), "--preferred-batch", "4"]) == 0
    capsys.readouterr()
    config = repo / MODEL / "config.pbtxt"
    text = config.read_text()
    assert 'platform: "onnxruntime_onnx"' in text
    config.write_text(text.replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    shutil.copy(Path(__file__).with_name("triton_onnx_model.py"), repo / MODEL / "1" / "model.py")
    grpc_port = free_port()
    env = dict(os.environ)
    # The Python backend's stub embeds libpython: it must load this interpreter's library
    # and find the server Python's packages (numpy<2) first on PATH.
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, libs, env.get("LD_LIBRARY_PATH")) if p)
    log = (tmp_path / "tritonserver.log").open("w")
    process = subprocess.Popen(
        [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={server / 'backends'}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"127.0.0.1:{grpc_port}"
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "tritonserver.log").read_text()[-2000:]
            try:
                return bool(client.is_model_ready(MODEL))
            except grpcclient.InferenceServerException:
                return False

        wait_for(ready, timeout=120, what="tritonserver to load the exported model")
        client.close()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_the_exported_repository_loads_in_tritonserver_and_serves_the_node(
    exported_repository_server,
) -> None:
    url = exported_repository_server
    encoder = select_backend(_settings(url), None, demo_model())
    try:
        config = encoder._client.get_model_config(MODEL, as_json=True)["config"]
        batching = config["dynamic_batching"]
        assert batching["preferred_batch_size"] == [4]
        assert (int(batching["priority_levels"]), int(batching["default_priority_level"])) == (4, 3)
        weights = config["parameters"]["triagenode.weights_sha256"]["string_value"]
        assert weights == demo_model().identity.weights_sha256
        images = demo_images(SERVER_MAX_BATCH + 1)
        np.testing.assert_allclose(
            encoder.encode(images), _onnx_encoder().encode(images), rtol=0, atol=1e-6
        )
    finally:
        encoder.close()
    served = demo_model().identity.weights_sha256[:12]
    with pytest.raises(ModelLoadError, match=rf"exported from other weights \({served} != ffff"):
        TritonImageEncoder(
            _settings(url).triton,
            image_size=demo_model().preprocess.image_size,
            embed_dim=demo_model().embed_dim,
            weights_sha256="f" * 64,
        )


def test_triton_priority_levels_follow_the_triage_scale() -> None:
    assert [triton_priority(p) for p in (Priority.stat, Priority.urgent)] == [1, 2]
    assert [triton_priority(p) for p in (Priority.routine, Priority.low)] == [3, 4]


class _RecordingEncoder:
    """An encoder that records the priority the batcher hands it (no server involved)."""

    backend, device, precision, embed_dim, image_size = "record", "cpu", "fp32", 4, 2

    def __init__(self) -> None:
        self.priorities: list[int] = []
        self.gate = threading.Event()

    def encode(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError("the batcher must use encode_prioritized")

    def encode_prioritized(self, images: np.ndarray, priority: int) -> np.ndarray:
        self.gate.wait(30)
        self.priorities.append(int(priority))
        return np.ones((len(images), self.embed_dim), dtype=np.float32)

    def close(self) -> None:
        pass


def test_the_batcher_passes_the_most_urgent_priority_of_a_batch_to_the_encoder() -> None:
    encoder = _RecordingEncoder()
    assert isinstance(encoder, PrioritizedImageEncoder)
    image = np.zeros((3, 2, 2), dtype=np.float32)
    with DynamicBatcher(encoder, max_batch=4, max_wait_ms=10_000) as batcher:
        lows = batcher.submit_many(np.stack([image] * 4), Priority.low)  # a full batch
        wait_for(lambda: not batcher._heap, timeout=10)  # taken; the gate holds the encoder
        mixed = [batcher.submit(image, p) for p in (Priority.routine, Priority.urgent)]
        mixed += [batcher.submit(image, Priority.low), batcher.submit(image, Priority.routine)]
        encoder.gate.set()
        for future in [*lows, *mixed]:
            future.result(30)
    assert encoder.priorities == [int(Priority.low), int(Priority.urgent)]
