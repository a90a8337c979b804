"""The prefetcher: decoding overlaps encoding, memory stays bounded, failures stay per image."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.factory import ct_slice, write
from triagenode.domain import ImageRef
from triagenode.inference.backends.torch import TorchImageEncoder
from triagenode.inference.model import build_demo_model
from triagenode.inference.prefetch import EncodeFailure, StudyPrefetcher, study_embeddings
from triagenode.inference.preprocess import preprocess_file


def _image(value: float) -> np.ndarray:
    return np.full((3, 4, 4), value, dtype=np.float32)


def test_the_next_item_is_prepared_while_the_encoder_runs():
    encoding = threading.Event()
    saw_encoder_running: list[bool] = []

    def prepare(item: int) -> list[np.ndarray]:
        if item > 0:  # blocks until the encoder has started on an earlier item
            saw_encoder_running.append(encoding.wait(timeout=10))
        return [_image(item)]

    def encode(batch: np.ndarray) -> np.ndarray:
        encoding.set()
        return batch.reshape(len(batch), -1)[:, :2]

    prefetcher = StudyPrefetcher(workers=1, lookahead=4)
    try:
        out = prefetcher.run(list(range(5)), prepare, encode, max_batch=1)
    finally:
        prefetcher.close()
    assert saw_encoder_running == [True] * 4
    assert [float(o[0][0]) for o in out] == [0.0, 1.0, 2.0, 3.0, 4.0]  # order kept


class _WaitingCounter:
    """prepare/encode stand-ins counting the prepared images not yet encoded, and the most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = self.peak = 0

    def prepare(self, item: int) -> list[np.ndarray]:
        with self._lock:
            self.waiting += 1
            self.peak = max(self.peak, self.waiting)
        return [_image(item)]

    def encode(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.waiting -= len(batch)
        return batch.reshape(len(batch), -1)


def test_at_most_lookahead_items_wait_prepared():
    counter = _WaitingCounter()
    prepare, encode = counter.prepare, counter.encode
    prefetcher = StudyPrefetcher(workers=2, lookahead=3)
    try:
        out = prefetcher.run(list(range(20)), prepare, encode, max_batch=2)
    finally:
        prefetcher.close()
    assert len(out) == 20 and counter.waiting == 0
    assert 1 <= counter.peak <= 3


def test_a_failing_image_fails_alone():
    def prepare(item: int) -> list[np.ndarray | BaseException]:
        if item == 1:
            raise ValueError("cannot decode")
        return [_image(item), _image(item + 0.5)]

    def encode(batch: np.ndarray) -> np.ndarray:
        if np.any(batch == 2.5):
            raise RuntimeError("bad pixels")
        return batch.reshape(len(batch), -1)

    for workers in (0, 1):
        prefetcher = StudyPrefetcher(workers=workers)
        out = prefetcher.run([0, 1, 2], prepare, encode, max_batch=8)
        prefetcher.close()
        assert isinstance(out[1][0], ValueError)
        assert isinstance(out[2][1], EncodeFailure) and "bad pixels" in str(out[2][1])
        assert float(out[2][0][0]) == 2.0 and float(out[0][1][0]) == 0.5
    with pytest.raises(ValueError):
        StudyPrefetcher(workers=1, lookahead=0)


def test_study_embeddings_match_the_serial_path(tmp_path: Path):
    model = build_demo_model()
    encoder = TorchImageEncoder(model, device="cpu", precision="fp32")
    study, series = generate_uid(), generate_uid()
    images = []
    for index in range(5):
        ds = ct_slice(study, series, index, size=64, seed=3)
        path = write(ds, tmp_path / f"ct{index}.dcm")
        images.append((ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, series), path))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 10)
    images.insert(2, (ImageRef("1.2.840.10008.5.1.4.1.1.2", generate_uid(), series), broken))
    prefetcher = StudyPrefetcher(workers=1, lookahead=2)
    try:
        used, embeddings, failed = study_embeddings(
            images, model.preprocess, encoder.encode, prefetcher, max_batch=4
        )
    finally:
        prefetcher.close()
    good = [item for item in images if item[1] != broken]
    assert used == [ref for ref, _ in good]
    assert [ref for ref, _ in failed] == [images[2][0]] and failed[0][1]
    serial = encoder.encode(np.stack([preprocess_file(p, model.preprocess)[0] for _, p in good]))
    np.testing.assert_allclose(np.stack(embeddings), serial, atol=1e-5)


def test_concurrent_studies_share_the_bound_and_all_finish():
    counter = _WaitingCounter()
    prepare, encode = counter.prepare, counter.encode
    prefetcher = StudyPrefetcher(workers=2, lookahead=3)
    outs: dict[int, list] = {}

    def study(number: int) -> None:
        outs[number] = prefetcher.run(list(range(30)), prepare, encode, max_batch=2)

    threads = [threading.Thread(target=study, args=(n,)) for n in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        prefetcher.close()
    assert not any(thread.is_alive() for thread in threads)  # no deadlock on the shared bound
    assert sorted(outs) == [0, 1, 2] and counter.waiting == 0
    assert all([float(o[0][0]) for o in out] == list(range(30)) for out in outs.values())
    assert 1 <= counter.peak <= 3


# The classifier: the overlapped path gives what the serial one gives ----------------------


class _Interrupted(BaseException):
    """Not an Exception: must not be recorded as one image's failure."""


class _PickyEncoder:
    """The demo encoder, failing any batch that holds the image ``bad`` (as a real backend
    failing on one image does)."""

    def __init__(self, inner: TorchImageEncoder) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.precision = inner.precision
        self.image_size = inner.image_size
        self.bad: np.ndarray | None = None

    def encode(self, images: np.ndarray) -> np.ndarray:
        if self.bad is not None and any(np.array_equal(image, self.bad) for image in images):
            raise RuntimeError("bad pixels")
        return self.inner.encode(images)

    def close(self) -> None:
        self.inner.close()


def _prefetch_threads() -> set[threading.Thread]:
    """Live prefetch threads (other tests' classifiers may still hold idle ones: compare)."""
    return {t for t in threading.enumerate() if t.name.startswith("prefetch")}


@pytest.fixture(scope="module")
def demo_model():
    return build_demo_model()


@pytest.fixture
def head_ct(tmp_path: Path):
    """A 6-slice head CT with an unreadable file in the middle."""
    study, series = generate_uid(), generate_uid()
    images = []
    for index in range(6):
        ds = ct_slice(study, series, index, size=64, seed=index)
        path = write(ds, tmp_path / f"ct{index}.dcm")
        images.append((ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, series), path))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 10)
    images.insert(3, (ImageRef("1.2.840.10008.5.1.4.1.1.2", generate_uid(), series), broken))
    return study, images


@pytest.mark.parametrize("with_batcher", [False, True])
@pytest.mark.parametrize("images_in_flight", [16, 4])
def test_classify_study_overlapped_equals_serial(
    demo_model, head_ct, with_batcher: bool, images_in_flight: int
):
    from triagenode.config.labels import LabelSettings
    from triagenode.inference.batcher import DynamicBatcher
    from triagenode.inference.classifier import ZeroShotClassifier

    study, images = head_ct
    encoder = _PickyEncoder(TorchImageEncoder(demo_model, device="cpu", precision="fp32"))
    # the head set's brain window applies on both paths; slice 5 may fail in the encoder
    bad = preprocess_file(images[5][1], demo_model.preprocess, window=(40.0, 80.0))[0]
    before = _prefetch_threads()
    for encoder.bad in (bad, None):
        results = {}
        for name, workers in (("serial", 0), ("overlapped", 2), ("again", 2)):
            batcher = DynamicBatcher(encoder, max_batch=8, max_wait_ms=1) if with_batcher else None
            classifier = ZeroShotClassifier(
                demo_model,
                encoder,
                LabelSettings(),
                None,
                batcher,
                prefetch_workers=workers,
                prefetch_images=images_in_flight,
            )
            try:
                results[name] = classifier.classify_study(study, images, "ct_head")
            finally:
                classifier.close()
                if batcher is not None:
                    batcher.close()
        serial, overlapped = results["serial"], results["overlapped"]
        # the batches never depend on timing: the same findings at every run
        assert results["again"].findings == overlapped.findings
        assert overlapped.images_used == serial.images_used
        assert overlapped.images_failed == serial.images_failed
        reasons = [reason for _, reason in serial.images_failed]
        assert "not a DICOM file" in reasons[0]
        if encoder.bad is not None:
            assert len(serial.images_used) == 5 and reasons[1:] == ["encoder failed (bad pixels)"]
        if images_in_flight == 16 or encoder.bad is not None:
            # one batch (or one image at a time after a failed batch), as the serial path
            assert overlapped.findings == serial.findings
        else:  # batches of 2 against one of 6: the backend's last bits may differ
            np.testing.assert_allclose(
                [f.score for f in overlapped.findings],
                [f.score for f in serial.findings],
                atol=1e-5,
            )
        assert {"preprocess", "encode"} <= set(overlapped.timings_ms)
    assert not _prefetch_threads() - before


def test_an_interrupt_propagates_and_the_pool_recovers(demo_model, head_ct, monkeypatch):
    from triagenode.config.labels import LabelSettings
    from triagenode.inference import preprocess
    from triagenode.inference.classifier import ZeroShotClassifier

    study, images = head_ct
    good = [item for item in images if item[1].name != "broken.dcm"]
    before = _prefetch_threads()
    classifier = ZeroShotClassifier(
        demo_model,
        TorchImageEncoder(demo_model, device="cpu"),
        LabelSettings(),
        None,
        prefetch_workers=2,
        prefetch_images=2,
    )
    real = preprocess.read_dataset

    def read(path: Path):
        if path == good[2][1]:
            raise _Interrupted()
        return real(path)

    try:
        monkeypatch.setattr(preprocess, "read_dataset", read)
        with pytest.raises(_Interrupted):
            classifier.classify_study(study, good, "ct_head")
        monkeypatch.setattr(preprocess, "read_dataset", real)
        # the places the interrupted study held are free again: the next study completes
        again = classifier.classify_study(study, good, "ct_head")
        assert len(again.images_used) == len(good)
        assert _prefetch_threads() - before
    finally:
        classifier.close()
    assert not _prefetch_threads() - before
    classifier.close()  # twice is harmless


def test_the_settings_bound_the_prefetch():
    from pydantic import ValidationError

    from triagenode.config.settings import ModelSettings

    assert ModelSettings().prefetch_workers == 2 and ModelSettings().prefetch_images == 16
    assert ModelSettings(prefetch_workers=0).prefetch_workers == 0
    with pytest.raises(ValidationError):
        ModelSettings(prefetch_workers=-1)
    with pytest.raises(ValidationError):
        ModelSettings(prefetch_images=0)
