"""From DICOM pixels to a model input tensor.

The chain, in the order of the DICOM grayscale pipeline (PS3.4 N.2):

1. decode, one frame at a time: uncompressed little-endian grey frames straight from the
   bytes, everything else with pydicom and its pylibjpeg, openjpeg and RLE plugins;
2. Modality LUT: the Modality LUT Sequence, else Rescale Slope/Intercept (steps 2 to 5
   live in :mod:`triagenode.inference.display`);
3. VOI: the VOI LUT Sequence, else the first Window Center/Width (with VOI LUT Function
   LINEAR, LINEAR_EXACT or SIGMOID), else a modality default (CT soft tissue 40/400, CT of
   the head brain 40/80), else the image's full range; the result is in [0, 1];
4. MONOCHROME1 inverted so that bright always means dense;
5. colour: RGB as is, YBR_* converted to RGB by pydicom, PALETTE COLOR through its LUT, all
   scaled to [0, 1] by their bit depth (VOI does not apply to colour);
6. quantised to 8 bits (rounded), as the figures the model was trained on were, and
   resized exactly as open_clip's own transform does: torchvision's ``Resize(size)``
   (shortest side to ``image_size``, the long side ``int()``-truncated) with PIL's
   antialiased bicubic filter on the 8-bit image, then ``CenterCrop`` (offsets
   ``int(round(...))``), or a squash to the square; grey is resized as one 'L' plane and
   replicated to three channels afterwards (open_clip converts to RGB after the resize),
   then scaled by 1/255 and normalised by the model's mean and std.

Enhanced multi-frame objects take each frame's rescale and window from their functional
groups, padding is left out of the full-range window, and a caller may choose the CT window
(``window=``) for its label set; see :mod:`triagenode.inference.display`.

Every failure raises :class:`~triagenode.errors.PreprocessError` naming the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from triagenode.errors import PreprocessError
from triagenode.inference.display import (
    Window,
    apply_window,
    modality_default_window,
    to_display,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PreprocessConfig",
    "apply_window",
    "modality_default_window",
    "number_of_frames",
    "preprocess_dataset",
    "preprocess_file",
    "preprocess_pixels",
    "read_dataset",
    "resized_geometry",
    "to_display",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels become model input; read from the model's ``preprocess_cfg``."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # bicubic, bilinear or nearest
    resize_mode: str = "shortest"  # shortest side to image_size then centre crop; or squash

    @classmethod
    def from_open_clip(cls, image_size: int, cfg: dict[str, Any]) -> PreprocessConfig:
        size = cfg.get("size", image_size)
        return cls(
            image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
            mean=tuple(cfg.get("mean", OPENAI_MEAN)),  # type: ignore[arg-type]
            std=tuple(cfg.get("std", OPENAI_STD)),  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
        )


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames as an int (1 when absent or empty)."""
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def resized_geometry(
    height: int, width: int, config: PreprocessConfig
) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """``(width, height)`` to resize to and the ``(left, top, right, bottom)`` crop box.

    torchvision's ``Resize(size)`` sets the shortest side to ``size`` and the long side to
    ``int(size * long / short)`` (truncated); ``CenterCrop`` then cuts at
    ``int(round((new - size) / 2))``, Python's round-half-to-even. ``squash`` resizes
    straight to the square and crops nothing.
    """
    size = config.image_size
    if config.resize_mode == "squash":
        return (size, size), None
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    left = round((new_w - size) / 2.0)  # round half to even, as torchvision
    top = round((new_h - size) / 2.0)
    box = None if (new_w, new_h) == (size, size) else (left, top, left + size, top + size)
    return (new_w, new_h), box


def _to_uint8(display: np.ndarray) -> np.ndarray:
    """Display values in [0, 1] to 8 bits, rounded half to even."""
    out = np.multiply(display, np.float32(255), dtype=np.float32)
    np.clip(out, 0.0, 255.0, out=out)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def _resize(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Resize (and crop) an 8-bit PIL image to the model's square input, as open_clip does.

    PIL releases the GIL and keeps no thread pool, so preprocessing scales with worker
    threads instead of fighting the inference backend for cores.
    """
    resample = _FILTERS.get(config.interpolation, Image.Resampling.BICUBIC)
    target, box = resized_geometry(image.height, image.width, config)
    if image.size != target:
        image = image.resize(target, resample)
    if box is not None:
        image = image.crop(box)
    return image


def preprocess_pixels(display: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Display values in [0, 1] (``(H, W)`` or ``(H, W, 3)``) to a normalised ``(3, S, S)``.

    The same tensor as open_clip's ``preprocess`` of the 8-bit PIL image of ``display``
    (grey as 'L', colour as 'RGB'), to float rounding.
    """
    mean = np.asarray(config.mean, dtype=np.float32)[:, None, None]
    scale = (1.0 / (255.0 * np.asarray(config.std, dtype=np.float32)))[:, None, None]
    offset = mean / np.asarray(config.std, dtype=np.float32)[:, None, None]
    if display.ndim == 2:
        image = _resize(Image.fromarray(_to_uint8(display), mode="L"), config)
        plane = np.asarray(image, dtype=np.float32)
        planes = np.broadcast_to(plane, (3, *plane.shape))  # one plane resized, not three
    else:
        image = _resize(Image.fromarray(_to_uint8(display[..., :3]), mode="RGB"), config)
        planes = np.moveaxis(np.asarray(image, dtype=np.float32), -1, 0)
    return (planes * scale - offset).astype(np.float32, copy=False)


_NATIVE_LE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


def _native_frame(ds: Dataset, frame: int, syntax: object) -> np.ndarray | None:
    """One grey frame of uncompressed little-endian 8/16-bit data, straight from the bytes.

    The common CT/MR/CR case without pydicom's generic decoder machinery (a third of the
    per-image cost at 512x512). Anything else returns None and goes through pydicom.
    """
    if syntax not in _NATIVE_LE or "PixelData" not in ds:
        return None
    try:
        bits = int(ds.BitsAllocated)
        stored = int(ds.BitsStored)
        rows, columns = int(ds.Rows), int(ds.Columns)
        signed = int(ds.PixelRepresentation) == 1
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or bits not in (8, 16) or not 1 <= stored <= bits:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    count = rows * columns
    data = ds.PixelData
    offset = (frame - 1) * count * dtype.itemsize
    if len(data) < offset + count * dtype.itemsize:
        return None  # short data: let pydicom explain
    pixels = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(rows, columns)
    if stored < bits:
        # as pydicom does: unused high bits are cleared, or filled with the sign bit
        shift = bits - stored
        mask = dtype.type((1 << stored) - 1)
        pixels = (pixels << shift) >> shift if signed else pixels & mask
    return pixels


def _decode(ds: Dataset, frame: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    native = _native_frame(ds, frame, syntax)
    if native is not None:
        return native
    try:
        # index= decodes one frame only: a 1,000-frame object costs one frame's memory
        pixels = pixel_array(ds, index=frame - 1 if number_of_frames(ds) > 1 else None)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError) as exc:
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        # pydicom lists one line per plugin that tried; keep them all, on one line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = " ".join(lines) if lines else type(exc).__name__
        raise PreprocessError(f"cannot decode pixel data ({name}): {reason}") from None
    if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        pixels = pixels[0]
    return pixels


def preprocess_dataset(
    ds: Dataset,
    config: PreprocessConfig,
    frame: int | None = None,
    *,
    window: Window | None = None,
) -> np.ndarray:
    """One image (or one frame) of a dataset as model input, float32 ``(3, S, S)``.

    Parameters
    ----------
    ds
        A dataset read with its pixel data.
    config
        The model's preprocess config (size, mean, std, interpolation, resize mode).
    frame
        1-based frame number of a multi-frame object; None means the first.
    window
        ``(center, width)`` in Hounsfield units for the label set, applied to CT images in
        place of their own window; None keeps the dataset's VOI (then the modality default,
        then the full range without padding).

    Raises
    ------
    PreprocessError
        No pixel data, an undecodable transfer syntax, an unsupported photometric
        interpretation, a frame out of range, or a bad window.
    """
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        meta = getattr(ds, "file_meta", None)
        sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        what = getattr(sop, "name", sop) or "unknown SOP class"
        raise PreprocessError(f"no pixel data ({what})")
    frames = number_of_frames(ds)
    frame = 1 if frame is None else int(frame)
    if not 1 <= frame <= frames:
        raise PreprocessError(f"frame {frame} out of range (the object has {frames})")
    if int(ds.get("SamplesPerPixel", 1) or 1) not in (1, 3):
        raise PreprocessError(f"SamplesPerPixel {ds.SamplesPerPixel} is not supported")
    pixels = _decode(ds, frame)
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if min(pixels.shape[:2]) < 2:
        raise PreprocessError(f"image of {pixels.shape[0]}x{pixels.shape[1]} is too small")
    display = to_display(pixels, ds, frame=frame, window=window)
    if not np.isfinite(display).all():
        display = np.nan_to_num(display, nan=0.0, posinf=1.0, neginf=0.0)
    return preprocess_pixels(display, config)


def _image_file(path: Path, config: PreprocessConfig) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float32)
                top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                display = array / np.float32(top)
            elif image.mode in ("L", "1", "F"):
                display = np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255)
            else:
                display = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    except OSError as exc:
        raise PreprocessError(f"{path.name}: not a readable image ({exc})") from None
    return preprocess_pixels(display, config)[None]


def read_dataset(path: Path | str) -> Dataset:
    """Read a DICOM file: Part 10, or a bare dataset without preamble and file meta.

    Raises
    ------
    PreprocessError
        When the file is neither, or is unreadable.
    """
    path = Path(path)
    try:
        return dcmread(path)
    except InvalidDicomError:
        pass
    except (OSError, ValueError, EOFError) as exc:
        raise PreprocessError(f"{path.name}: unreadable DICOM ({exc})") from None
    ds: Dataset
    try:
        ds = dcmread(path, force=True)
    except Exception:
        ds = Dataset()
    # force=True "reads" any file; a real dataset has a SOP class or pixel data
    if "SOPClassUID" not in ds and not any(k in ds for k in _PIXEL_KEYWORDS):
        raise PreprocessError(f"{path.name}: not a DICOM file (no DICM preamble)")
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta and ds.original_encoding:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
    return ds


def preprocess_file(
    path: Path | str,
    config: PreprocessConfig,
    frames: Sequence[int] | None = None,
    *,
    window: Window | None = None,
) -> np.ndarray:
    """A DICOM file's frames (or a PNG/JPEG/TIFF image) as model input ``(N, 3, S, S)``.

    Parameters
    ----------
    path
        A DICOM file (Part 10, or raw with ``force``) or an ordinary image file.
    config
        The model's preprocess config.
    frames
        1-based frame numbers; None means every frame (one for single-frame objects).
    window
        ``(center, width)`` for CT, as in :func:`preprocess_dataset`.

    Raises
    ------
    PreprocessError
        The file is unreadable, not DICOM nor an image, or any requested frame fails.
    """
    path = Path(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _image_file(path, config)
    ds = read_dataset(path)
    wanted = list(frames) if frames is not None else list(range(1, number_of_frames(ds) + 1))
    return np.stack([preprocess_dataset(ds, config, f, window=window) for f in wanted])
