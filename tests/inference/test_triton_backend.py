"""``model.backend = "triton"`` against a real Triton Inference Server, and the batcher's
priority hand-off.

The servers (tritonserver 2.51 from the ``nvidia-pytriton`` wheel, on loopback ports) are
described in ``tests/triton_support.py``; without a Python that can run them, the server
tests skip and say so, and the tests that need no server (unreachable server, batcher
priority) always run.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.factory import ct_slice, write
from tests.onnx_fixtures import _demo_export_dir, demo_images, demo_model
from tests.peers import free_port, wait_for
from tests.triton_support import (
    MODEL,
    SERVER_MAX_BATCH,
    TritonServer,
    exported_tritonserver,
    make_pki,
    pytriton_python,
    pytriton_server,
    skip_reason,
)
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


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    python = pytriton_python()
    if python is None:
        pytest.skip(skip_reason())
    with pytriton_server(python, tmp_path_factory.mktemp("pytriton")) as server:
        yield server


@pytest.fixture
def exported_repository_server(tmp_path: Path) -> Iterator[str]:
    """``tritonserver`` itself (no pytriton) serving what ``export-triton`` wrote."""
    python = pytriton_python()
    if python is None:
        pytest.skip(skip_reason())
    with exported_tritonserver(python, tmp_path) as url:
        yield url


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


def test_triagenode_classify_through_triton_prints_the_local_backends_scores(
    triton_server, tmp_path: Path, monkeypatch, capsys
) -> None:
    import json

    from triagenode.cli import main

    monkeypatch.chdir(tmp_path)
    study, series = generate_uid(), generate_uid()
    for index in range(3):
        write(ct_slice(study, series, index, size=64, seed=5), tmp_path / "in" / f"{index}.dcm")
    monkeypatch.setenv("TRIAGENODE_MODEL__ARTIFACTS_DIR", str(_demo_export_dir()))
    monkeypatch.setenv("TRIAGENODE_MODEL__TRITON__URL", triton_server.url)
    studies = {}
    for backend in ("triton", "onnxruntime"):
        monkeypatch.setenv("TRIAGENODE_MODEL__BACKEND", backend)
        assert main(["classify", str(tmp_path / "in"), "--demo-model", "--json"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
        [studies[backend]] = [line for line in lines if line["type"] == "study"]
    assert studies["triton"]["backend"] == "triton"
    assert studies["onnxruntime"]["backend"] == "onnxruntime"
    # printed with 6 decimals: equal up to a rounding step
    assert studies["triton"]["scores"] == pytest.approx(studies["onnxruntime"]["scores"], abs=2e-6)
    assert studies["triton"]["label_set"] == "ct_head"


def test_a_model_without_priority_levels_or_weights_is_used_with_warnings(
    triton_server, caplog
) -> None:
    caplog.set_level("WARNING", logger="triagenode.inference.backends.triton")
    settings = _settings(triton_server.url, model_name="no_priorities")
    encoder = select_backend(settings, None, demo_model())
    try:
        images = demo_images(3)
        stat = encoder.encode_prioritized(images, Priority.stat)  # type: ignore[attr-defined]
        np.testing.assert_allclose(stat, _onnx_encoder().encode(images), rtol=0, atol=1e-6)
    finally:
        encoder.close()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "has 0 priority levels (needs 4): requests go without priority" in warned
    assert "cannot confirm it serves this node's weights" in warned


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


def test_a_server_that_accepts_and_never_answers_is_given_up_after_the_timeout() -> None:
    """A peer that takes the connection and then says nothing (hung server, half-open
    proxy): start-up ends in a clear error after ``timeout_s``, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts; nobody ever reads or writes
        url = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as caught:
            select_backend(_settings(url, timeout_s=2), None, demo_model())
        waited = time.monotonic() - started
    assert str(caught.value).startswith(f"Triton server {url}, model '{MODEL}'")
    assert waited < 30, waited


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


def test_mutual_tls_to_the_server(tmp_path: Path) -> None:
    python = pytriton_python()
    if python is None:
        pytest.skip(skip_reason())
    pki = make_pki(tmp_path)
    model = demo_model()
    with exported_tritonserver(python, tmp_path, pki) as url:
        tls = {"tls": True, "tls_ca": str(pki / "ca.crt")}
        client = {"tls_cert": str(pki / "client.crt"), "tls_key": str(pki / "client.key")}
        encoder = select_backend(_settings(url, **tls, **client), None, model)
        images = demo_images(2)
        np.testing.assert_allclose(
            encoder.encode(images), _onnx_encoder().encode(images), rtol=0, atol=1e-6
        )
        encoder.close()
        refused = {
            "plain text": _settings(url),
            "no client certificate": _settings(url, **tls),
            "a CA that did not sign the server": _settings(
                url, tls=True, tls_ca=str(pki / "other-ca.crt"), **client
            ),
            "a client certificate of another CA": _settings(
                url,
                **tls,
                tls_cert=str(pki / "stranger.crt"),
                tls_key=str(pki / "stranger.key"),
            ),
        }
        for why, settings in refused.items():
            with pytest.raises(ModelLoadError, match=f"Triton server {url}, model") as caught:
                select_backend(settings, None, model)
            assert "the liveness check" in str(caught.value), why


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
        lows = [batcher.submit(image, Priority.low) for _ in range(4)]  # a full batch
        wait_for(lambda: not batcher._heap, timeout=10)  # taken; the gate holds the encoder
        mixed = [batcher.submit(image, p) for p in (Priority.routine, Priority.urgent)]
        mixed += [batcher.submit(image, Priority.low), batcher.submit(image, Priority.routine)]
        encoder.gate.set()
        for future in [*lows, *mixed]:
            future.result(30)
    assert encoder.priorities == [int(Priority.low), int(Priority.urgent)]
