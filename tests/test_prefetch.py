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
        out = prefetcher.run(list(range(5)), prepare, encode, max_batch=8)
    finally:
        prefetcher.close()
    assert saw_encoder_running == [True] * 4
    assert [float(o[0][0]) for o in out] == [0.0, 1.0, 2.0, 3.0, 4.0]  # order kept


def test_at_most_lookahead_items_wait_prepared():
    lock = threading.Lock()
    waiting, peak = 0, 0

    def prepare(item: int) -> list[np.ndarray]:
        nonlocal waiting, peak
        with lock:
            waiting += 1
            peak = max(peak, waiting)
        return [_image(item)]

    def encode(batch: np.ndarray) -> np.ndarray:
        nonlocal waiting
        with lock:
            waiting -= len(batch)
        return batch.reshape(len(batch), -1)

    prefetcher = StudyPrefetcher(workers=2, lookahead=3)
    try:
        out = prefetcher.run(list(range(20)), prepare, encode, max_batch=2)
    finally:
        prefetcher.close()
    assert len(out) == 20 and waiting == 0
    assert 1 <= peak <= 3


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
