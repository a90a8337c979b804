"""Dynamic batcher: priority order, batch limits, per-item failure, concurrency, close."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from triagenode.domain import Priority
from triagenode.inference.backends.torch import TorchImageEncoder
from triagenode.inference.batcher import BatcherClosedError, DynamicBatcher
from triagenode.inference.model import build_demo_model
from triagenode.metrics import REGISTRY


@pytest.fixture(scope="module")
def encoder() -> TorchImageEncoder:
    return TorchImageEncoder(build_demo_model(), device="cpu", max_batch=64)


class RecordingEncoder:
    """The real demo encoder, recording each batch; it can hold a batch until released and
    refuses any batch holding a NaN (the "bad image")."""

    def __init__(self, inner: TorchImageEncoder) -> None:
        self.inner = inner
        self.backend, self.device, self.precision = "torch", "cpu", "fp32"
        self.embed_dim, self.image_size = inner.embed_dim, inner.image_size
        self.batches: list[list[float]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def encode(self, images: np.ndarray) -> np.ndarray:
        self.batches.append([float(image[0, 0, 0]) for image in images])
        self.entered.set()
        assert self.release.wait(10)
        if np.isnan(images).any():
            raise ValueError("NaN in input")
        return self.inner.encode(images)

    def close(self) -> None:
        pass


def _image(tag: float, size: int = 64) -> np.ndarray:
    image = np.random.default_rng(int(abs(tag) * 10)).random((3, size, size), dtype=np.float32)
    image[0, 0, 0] = tag
    return image


def test_higher_priority_goes_into_the_next_batch_first(encoder: TorchImageEncoder) -> None:
    recorder = RecordingEncoder(encoder)
    recorder.release.clear()
    with DynamicBatcher(recorder, max_batch=2, max_wait_ms=5) as batcher:
        first = batcher.submit(_image(1), Priority.routine)
        assert recorder.entered.wait(10)  # the encoder now holds batch 1
        queued = {
            "low": batcher.submit(_image(10), Priority.low),
            "routine": batcher.submit(_image(20), Priority.routine),
            "stat": batcher.submit(_image(40), Priority.stat),
            "urgent": batcher.submit(_image(30), Priority.urgent),
        }
        recorder.release.set()
        for future in [first, *queued.values()]:
            assert future.result(10).shape == (encoder.embed_dim,)
    assert recorder.batches == [[1.0], [40.0, 30.0], [20.0, 10.0]]


def test_a_failing_image_does_not_fail_its_batch_mates(encoder: TorchImageEncoder) -> None:
    recorder = RecordingEncoder(encoder)
    before = REGISTRY.get_sample_value("triagenode_batch_size_count") or 0
    good = [_image(1), _image(2)]
    bad = _image(3)
    bad[1, 5, 5] = np.nan
    with DynamicBatcher(recorder, max_batch=3, max_wait_ms=2000) as batcher:
        futures = [batcher.submit(good[0]), batcher.submit(bad), batcher.submit(good[1])]
        assert futures[0].result(10) is not None
        with pytest.raises(ValueError, match="NaN"):
            futures[1].result(10)
        np.testing.assert_allclose(
            futures[2].result(10), encoder.encode(good[1][None])[0], atol=1e-5
        )
    assert len(recorder.batches[0]) == 3  # tried together first, then one by one
    after = REGISTRY.get_sample_value("triagenode_batch_size_count") or 0
    assert after - before == 2  # the two good images, each in its own retry batch


def test_wrong_shape_fails_at_submit_and_closed_batcher_refuses(
    encoder: TorchImageEncoder,
) -> None:
    batcher = DynamicBatcher(encoder, max_batch=4, max_wait_ms=1)
    with pytest.raises(ValueError, match="shape"):
        batcher.submit(np.zeros((3, 8, 8), np.float32)).result(1)
    pending = batcher.submit(_image(5))
    batcher.close()
    assert pending.result(10).shape == (encoder.embed_dim,)  # drained before stopping
    with pytest.raises(BatcherClosedError):
        batcher.submit(_image(6))


def test_concurrent_callers_share_batches(encoder: TorchImageEncoder) -> None:
    recorder = RecordingEncoder(encoder)
    images = [_image(i + 1) for i in range(24)]
    expected = encoder.encode(np.stack(images))
    with DynamicBatcher(recorder, max_batch=8, max_wait_ms=20) as batcher:

        def caller(offset: int) -> list[np.ndarray]:
            futures = [batcher.submit(images[i]) for i in range(offset, 24, 4)]
            return [f.result(10) for f in futures]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(caller, range(4)))
    for offset, got in enumerate(results):
        np.testing.assert_allclose(np.stack(got), expected[offset::4], atol=1e-5)
    assert all(len(batch) <= 8 for batch in recorder.batches)
    assert len(recorder.batches) < 24  # batched, not one by one
