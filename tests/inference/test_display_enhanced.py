"""Display values the model sees: enhanced multi-frame functional groups (checked against
highdicom), pixel padding, and the window a label set chooses."""

from __future__ import annotations

from pathlib import Path

import highdicom
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.factory import ct_slice, enhanced_ct, write
from triagenode.inference.display import frame_attributes, padding_mask, to_display
from triagenode.inference.preprocess import (
    PreprocessConfig,
    preprocess_dataset,
    preprocess_file,
    preprocess_pixels,
)

CONFIG = PreprocessConfig(image_size=32)


def _stored(frames: int = 3, seed: int = 7) -> np.ndarray:
    # stored 0..2500 with intercept -1024: HU from -1024 (air) to about 1476 (bone)
    return np.random.default_rng(seed).integers(0, 2500, size=(frames, 24, 20))


def _roundtrip(ds: Dataset, tmp_path: Path) -> Dataset:
    return dcmread(write(ds, tmp_path / f"{generate_uid()}.dcm"))


def _highdicom_frames(ds: Dataset) -> list[np.ndarray]:
    image = highdicom.Image.from_dataset(ds)
    return [
        image.get_frame(n, apply_voi_transform=True, dtype=np.float64)
        for n in range(1, int(ds.NumberOfFrames) + 1)
    ]


def test_enhanced_ct_per_frame_windows_match_highdicom(tmp_path: Path) -> None:
    # a shared rescale; each frame its own window (soft tissue, lung, bone). A macro is in
    # either the shared or the per-frame groups, never both (PS3.3 C.7.6.16)
    windows = [(40.0, 400.0), (-600.0, 1500.0), (300.0, 1500.0)]
    ds = enhanced_ct(_stored(), window=None, per_frame_windows=windows)
    ds = _roundtrip(ds, tmp_path)
    reference = _highdicom_frames(ds)
    for frame, expected in enumerate(reference, start=1):
        pixels = ds.pixel_array[frame - 1]
        display = to_display(pixels, ds, frame=frame)
        np.testing.assert_allclose(display, expected, atol=1e-5, err_msg=f"frame {frame}")
    # the frames really differ: the per-frame window was not ignored
    assert not np.allclose(reference[0], reference[1])
    # and not all white, as when the rescale and window in the groups are ignored
    assert 0.05 < float(to_display(ds.pixel_array[0], ds, frame=1).mean()) < 0.95


def test_enhanced_ct_per_frame_rescale_matches_highdicom(tmp_path: Path) -> None:
    # a rescale per frame (no shared one), a LINEAR_EXACT shared window
    rescales = [(1.0, -1024.0), (2.0, -2048.0), (0.5, -100.0)]
    ds = enhanced_ct(_stored(), per_frame_rescales=rescales, window=(40.0, 400.0))
    ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0].VOILUTFunction = "LINEAR_EXACT"
    ds = _roundtrip(ds, tmp_path)
    for frame, expected in enumerate(_highdicom_frames(ds), start=1):
        display = to_display(ds.pixel_array[frame - 1], ds, frame=frame)
        np.testing.assert_allclose(display, expected, atol=1e-5, err_msg=f"frame {frame}")


def test_enhanced_ct_rescale_then_window_by_the_standard_formula(tmp_path: Path) -> None:
    # slope 1.5, intercept -1000, window 300/80 (LINEAR, PS3.3 C.11.2.1.2.1):
    # HU = 1.5 s - 1000; y = (HU - (c - 0.5)) / (w - 1) + 0.5, clipped
    stored = np.array([[[840, 880, 900, 1000]]])  # HU 260, 320, 350, 500
    ds = enhanced_ct(stored, rescale=(1.5, -1000.0), window=(300.0, 80.0))
    ds = _roundtrip(ds, tmp_path)
    display = to_display(ds.pixel_array.reshape(1, 4), ds, frame=1)
    expected = np.clip((np.array([260, 320, 350, 500]) - 299.5) / 79 + 0.5, 0, 1)
    np.testing.assert_allclose(display[0], expected, atol=1e-6)


def test_per_frame_groups_take_precedence_over_shared_and_top_level() -> None:
    # not conformant (a macro in both groups), but seen: the frame's own value wins
    ds = enhanced_ct(_stored(2), per_frame_windows=[(-600.0, 1500.0), None])
    ds.WindowCenter, ds.WindowWidth = 1000, 10  # top level, overridden by the groups
    first, second = frame_attributes(ds, 1), frame_attributes(ds, 2)
    assert (first.WindowCenter, first.WindowWidth) == (-600.0, 1500.0)
    assert (second.WindowCenter, second.WindowWidth) == (40.0, 400.0)
    assert first.RescaleIntercept == -1024.0 and first.Modality == "CT"
    plain = ct_slice(generate_uid(), generate_uid(), 0)
    assert frame_attributes(plain, None) is plain  # nothing to merge: no copy


def test_enhanced_ct_file_preprocesses_each_frame_with_its_window(tmp_path: Path) -> None:
    stored = np.full((2, 24, 20), 1024 + 40, dtype=np.int64)  # 40 HU everywhere
    ds = enhanced_ct(stored, per_frame_windows=[(40.0, 400.0), (1040.0, 400.0)])
    path = write(ds, tmp_path / "enhanced.dcm")
    out = preprocess_file(path, CONFIG)
    assert out.shape == (2, 3, 32, 32)
    # 40 HU is mid-grey in a 40/400 window and black in a window centred at 1040
    grey = (round(0.5 * 255) / 255 - CONFIG.mean[0]) / CONFIG.std[0]
    black = (0 - CONFIG.mean[0]) / CONFIG.std[0]
    assert out[0, 0, 5, 5] == pytest.approx(grey, abs=2e-2)
    assert out[1, 0, 5, 5] == pytest.approx(black, abs=1e-5)


def _padded_mr(photometric: str = "MONOCHROME2") -> tuple[np.ndarray, Dataset]:
    pixels = np.array([[0, 0, 100, 200], [300, 400, 0, 0]], dtype=np.uint16)
    ds = Dataset()
    ds.Modality = "MR"
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 12, 0
    ds.PixelPaddingValue = 0
    return pixels, ds


def test_pixel_padding_is_left_out_of_the_full_range_window() -> None:
    pixels, ds = _padded_mr()
    # without padding the range would be 0..400; with it, 100..400
    expected = [[0, 0, 0, 1 / 3], [2 / 3, 1, 0, 0]]
    np.testing.assert_allclose(to_display(pixels, ds), expected, atol=1e-6)
    # the stepwise path (a VOI LUT function the fused path does not do) agrees
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 250, 300, "SIGMOID"
    display = to_display(pixels, ds)
    assert display[0, 0] == 0 and display[1, 3] == 0 and display[0, 2] > 0


def test_pixel_padding_is_background_in_monochrome1_too() -> None:
    pixels, ds = _padded_mr("MONOCHROME1")
    display = to_display(pixels, ds)
    np.testing.assert_allclose(display, [[0, 0, 1, 2 / 3], [1 / 3, 0, 0, 0]], atol=1e-6)


def test_pixel_padding_range_limit_marks_a_range_of_stored_values() -> None:
    pixels = np.array([[-2000, -1500, -1100, -1024, 0, 1000]], dtype=np.int16)
    ds = Dataset()
    ds.PixelRepresentation = 1
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = -1100, -2000  # either order
    mask = padding_mask(pixels, ds)
    assert mask is not None and mask.tolist() == [[True, True, True, False, False, False]]
    ds.Modality, ds.PhotometricInterpretation = "OT", "MONOCHROME2"
    # full range of the rest: -1024..1000
    np.testing.assert_allclose(to_display(pixels, ds), [[0, 0, 0, 0, 1024 / 2024, 1]], atol=1e-6)


def test_padding_read_from_a_file_with_a_ct_window(tmp_path: Path) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0, size=8)
    raw = np.frombuffer(ds.PixelData, dtype=np.int16).copy()
    raw[:8] = -2000 + 1024  # stored padding value (HU -2000 after the intercept)
    ds.PixelData = raw.tobytes()
    ds.PixelPaddingValue = -2000 + 1024
    ds = dcmread(write(ds, tmp_path / "padded.dcm"))
    display = to_display(ds.pixel_array, ds)
    assert (display[0] == 0).all() and display[1:].max() > 0


def test_a_label_set_window_replaces_the_ct_window() -> None:
    # HU 0, 40, 80 in a dataset that says 40/400; the label set asks for brain 40/80
    ds = ct_slice(generate_uid(), generate_uid(), 0, size=2, WindowCenter=40, WindowWidth=400)
    pixels = np.array([[1024, 1064], [1104, 1104]], dtype=np.int16)
    np.testing.assert_allclose(
        to_display(pixels, ds, window=(40.0, 80.0)), [[0, 40 / 79], [1, 1]], atol=1e-6
    )
    # the dataset's own window without one
    np.testing.assert_allclose(to_display(pixels, ds)[0, 0], 160 / 399, atol=1e-6)
    # a VOI LUT Sequence in the dataset does not win over the label set's window either
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [4, 0, 8], [0, 51, 102, 255]
    ds.VOILUTSequence = [item]
    np.testing.assert_allclose(
        to_display(pixels, ds, window=(40.0, 80.0)), [[0, 40 / 79], [1, 1]], atol=1e-6
    )


def test_a_label_set_window_leaves_other_modalities_alone() -> None:
    pixels = np.array([[0, 100, 200]], dtype=np.uint16)
    ds = Dataset()
    ds.Modality, ds.PhotometricInterpretation = "MR", "MONOCHROME2"
    np.testing.assert_allclose(to_display(pixels, ds, window=(40.0, 80.0)), [[0, 0.5, 1]])


def test_preprocess_dataset_and_file_take_the_window(tmp_path: Path) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0, size=40)
    path = write(ds, tmp_path / "ct.dcm")
    ds = dcmread(path)
    own, brain = preprocess_dataset(ds, CONFIG), preprocess_dataset(ds, CONFIG, window=(40, 80))
    assert not np.allclose(own, brain)
    np.testing.assert_array_equal(preprocess_file(path, CONFIG, window=(40, 80))[0], brain)
    # the old positional call still works
    np.testing.assert_array_equal(preprocess_dataset(ds, CONFIG, 1), own)


def test_preprocess_pixels_of_a_uniform_image_is_exact() -> None:
    out = preprocess_pixels(np.full((17, 9), 51 / 255, np.float32), CONFIG)
    np.testing.assert_allclose(out[1], (0.2 - CONFIG.mean[1]) / CONFIG.std[1], atol=1e-6)
