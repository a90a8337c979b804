"""Display values from decoded pixels: the DICOM grayscale pipeline and colour scaling.

Modality LUT (sequence, else Rescale Slope/Intercept), then VOI (VOI LUT Sequence, else the
first Window Center/Width with its VOI LUT Function, else a modality default, else the
image's full range) to [0, 1], then MONOCHROME1 inversion; RGB (and YBR, already converted
by pydicom) and PALETTE COLOR scaled by their bit depth. PS3.3 C.11 and PS3.4 N.2.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from triagenode.errors import PreprocessError

__all__ = ["apply_window", "modality_default_window", "to_display"]

_HEAD = {"HEAD", "BRAIN", "SKULL"}


def _first(value: object) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def apply_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Map modality values to [0, 1] by a window (PS3.3 C.11.2.1.2).

    Parameters
    ----------
    values
        Modality values (after rescale), any shape, float32.
    center, width
        Window Center and Window Width.
    function
        VOI LUT Function: ``LINEAR`` (default), ``LINEAR_EXACT`` or ``SIGMOID``.
    """
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        if width <= 0:
            raise PreprocessError(f"window width {width} must be > 0 for SIGMOID")
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width, dtype=np.float32))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise PreprocessError(f"window width {width} must be > 0 for LINEAR_EXACT")
        low, span = center - width / 2.0, width
    else:
        if width < 1:
            raise PreprocessError(f"window width {width} must be >= 1 for LINEAR")
        # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; w = 1 is a threshold at c-0.5.
        if width == 1:
            return (values > center - 0.5).astype(np.float32)
        low, span = center - 0.5 - (width - 1) / 2.0, width - 1.0
    out = (values - np.float32(low)) * np.float32(1.0 / span)
    return np.clip(out, 0.0, 1.0, out=out)


def modality_default_window(ds: Dataset) -> tuple[float, float] | None:
    """A sensible window when the dataset has none: CT brain or soft tissue, else None."""
    if str(ds.get("Modality", "")).upper() != "CT":
        return None
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    return (40.0, 80.0) if body_part in _HEAD else (40.0, 400.0)


def _modality_lut(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    values = pixels.astype(np.float32, copy=False)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0 or intercept != 0.0:
        values = values * np.float32(slope) + np.float32(intercept)
    return values


def _linear_display(pixels: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Rescale and a linear window fused into one multiply-add, or None when not linear.

    ``((x * slope + intercept) - low) / span`` is ``x * a + b``: one pass over the pixels
    instead of four, the common case for CT, CR and MR.
    """
    if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
        return None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if center not in (None, "") and width not in (None, ""):
        center, width = _first(center), _first(width)
    else:
        center, width = None, None
        function = "LINEAR"
    if function not in ("LINEAR", "LINEAR_EXACT"):
        return None
    if center is None and modality_default_window(ds) is not None:
        center, width = modality_default_window(ds)  # type: ignore[misc]
    if center is not None and width is not None:
        if function == "LINEAR_EXACT":
            if width <= 0:
                return None  # let apply_window raise its error
            low, span = center - width / 2.0, width
        else:
            if width <= 1:
                return None
            low, span = center - 0.5 - (width - 1) / 2.0, width - 1.0
    else:
        ends = (float(pixels.min()) * slope + intercept, float(pixels.max()) * slope + intercept)
        low, span = min(ends), abs(ends[1] - ends[0])
        if span <= 0:
            return np.zeros(pixels.shape, dtype=np.float32)
    out = pixels.astype(np.float32)
    out *= np.float32(slope / span)
    out += np.float32((intercept - low) / span)
    return np.clip(out, 0.0, 1.0, out=out)


def _voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float32)
        return np.clip(out / np.float32(2**bits - 1), 0.0, 1.0)
    center = ds.get("WindowCenter")
    width = ds.get("WindowWidth")
    if center not in (None, "") and width not in (None, ""):
        return apply_window(
            values, _first(center), _first(width), str(ds.get("VOILUTFunction", "LINEAR"))
        )
    default = modality_default_window(ds)
    if default is not None:
        return apply_window(values, *default)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    out = (values - np.float32(low)) * np.float32(1.0 / (high - low))
    return out.astype(np.float32, copy=False)


def _palette(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(pixels, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return rgb.astype(np.float32) / np.float32(2 ** (16 if bits > 8 else 8) - 1)


def to_display(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Decoded pixels of one frame to display values in [0, 1], ``(H, W)`` or ``(H, W, 3)``.

    Raises
    ------
    PreprocessError
        When the photometric interpretation or VOI attributes are unusable.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _palette(pixels, ds)
    if pixels.ndim == 3:  # RGB, or YBR already converted to RGB by pydicom
        if pixels.dtype.kind == "f":
            return np.clip(pixels.astype(np.float32), 0.0, 1.0)
        bits = int(ds.get("BitsStored", 8) or 8)
        return pixels.astype(np.float32) * np.float32(1.0 / (2**bits - 1))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PreprocessError(f"photometric interpretation {photometric} is not supported")
    display = _linear_display(pixels, ds)
    if display is None:
        display = _voi(_modality_lut(pixels, ds), ds)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    return display
