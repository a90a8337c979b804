"""The resize matches open_clip's own preprocessing of the same 8-bit PIL image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from triagenode.inference.model import BIOMEDCLIP_PREPROCESS_CFG
from triagenode.inference.preprocess import (
    PreprocessConfig,
    preprocess_pixels,
    resized_geometry,
)

open_clip = pytest.importorskip("open_clip")

SIZE = 224


def _open_clip_transform(resize_mode: str):  # type: ignore[no-untyped-def]
    return open_clip.image_transform(
        SIZE,
        is_train=False,
        mean=tuple(BIOMEDCLIP_PREPROCESS_CFG["mean"]),
        std=tuple(BIOMEDCLIP_PREPROCESS_CFG["std"]),
        interpolation="bicubic",
        resize_mode=resize_mode,
    )


def _config(resize_mode: str) -> PreprocessConfig:
    cfg = {**BIOMEDCLIP_PREPROCESS_CFG, "interpolation": "bicubic", "resize_mode": resize_mode}
    return PreprocessConfig.from_open_clip(SIZE, cfg)


def _pixels(height: int, width: int, colour: bool) -> np.ndarray:
    # smooth structure plus noise: edges and ramps, so resampling errors would show
    rng = np.random.default_rng(height * 1000 + width)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)
    if colour:
        base = np.stack([base, base[::-1], 255 - base], axis=-1)
    noisy = base + rng.normal(0, 20, size=base.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


# odd sizes both ways round; 303x224 is not resized at all and crops 79 columns, where
# torchvision's round-half-to-even offset (40) differs from a floor (39)
SHAPES = [(300, 517), (517, 300), (224, 303), (225, 224), (1000, 999), (97, 131)]


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("colour", [False, True], ids=["grey", "rgb"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
def test_matches_open_clip_preprocess(
    shape: tuple[int, int], colour: bool, resize_mode: str
) -> None:
    pixels = _pixels(*shape, colour)
    image = Image.fromarray(pixels, mode="RGB" if colour else "L")
    expected = _open_clip_transform(resize_mode)(image).numpy()
    ours = preprocess_pixels(pixels.astype(np.float32) / 255, _config(resize_mode))
    assert ours.shape == expected.shape == (3, SIZE, SIZE)
    assert float(np.abs(ours - expected).max()) < 1e-3


def test_geometry_is_torchvisions() -> None:
    config = _config("shortest")
    # 517 wide, 300 high: short side 300 -> 224, long int(224 * 517 / 300) = int(386.03)
    assert resized_geometry(300, 517, config) == ((386, 224), (81, 0, 305, 224))
    # 224 high, 303 wide: no resize; crop offset round(79 / 2) = round(39.5) = 40
    assert resized_geometry(224, 303, config) == ((303, 224), (40, 0, 264, 224))
    assert resized_geometry(224, 224, config) == ((224, 224), None)
    assert resized_geometry(300, 517, _config("squash")) == ((224, 224), None)
