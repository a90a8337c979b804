"""Display values from decoded pixels: the DICOM grayscale pipeline and colour scaling.

Modality LUT (sequence, else Rescale Slope/Intercept), then VOI to [0, 1], then MONOCHROME1
inversion; RGB (and YBR, already converted by pydicom) and PALETTE COLOR scaled by their bit
depth. PS3.3 C.11 and PS3.4 N.2. The VOI is, in this order:

1. a window the caller chose for the label set, when the image is CT (Hounsfield units);
2. the VOI LUT Sequence;
3. the first Window Center/Width, with its VOI LUT Function;
4. a modality default (CT soft tissue, CT of the head brain);
5. the image's full range.

Enhanced multi-frame objects (Enhanced CT/MR/XA, legacy converted, ...) keep their rescale
(Pixel Value Transformation Sequence) and window (Frame VOI LUT Sequence) in the Shared and
Per-frame Functional Groups; a frame's own values take precedence over the shared ones,
which take precedence over top-level attributes (:func:`frame_attributes`).

Pixels equal to Pixel Padding Value (or between it and Pixel Padding Range Limit) are not
image: they are left out of the full-range window and shown as background (0, black).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from triagenode.errors import PreprocessError

__all__ = [
    "apply_window",
    "frame_attributes",
    "modality_default_window",
    "padding_mask",
    "to_display",
]

_HEAD = {"HEAD", "BRAIN", "SKULL"}
# What the grey pipeline reads; a frame's view of an enhanced object copies these.
_GREY_KEYWORDS = (
    "Modality",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
# Functional group macros (PS3.3 C.7.6.16.2) and the attributes each replaces as a whole.
_FUNCTIONAL_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"),
}

Window = tuple[float, float]  # (center, width) in modality units


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


def _first_item(ds: Dataset, keyword: str, index: int = 0) -> Dataset | None:
    sequence = ds.get(keyword)
    if not sequence or not 0 <= index < len(sequence):
        return None
    item: Dataset = sequence[index]
    return item


def frame_attributes(ds: Dataset, frame: int | None = None) -> Dataset:
    """The grey-pipeline attributes that apply to one frame (1-based; None is the first).

    ``ds`` itself when it has no functional groups; otherwise a small dataset of the
    top-level attributes the display needs, with the Pixel Value Transformation and Frame
    VOI LUT macros of the Shared Functional Groups, then of the frame's Per-frame Functional
    Groups, each replacing what came before (PS3.3 C.7.6.16).
    """
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    own = _first_item(ds, "PerFrameFunctionalGroupsSequence", (frame or 1) - 1)
    if shared is None and own is None:
        return ds
    view = Dataset()
    for keyword in _GREY_KEYWORDS:
        if keyword in ds:
            view.add(ds[keyword])
    for group in (shared, own):
        if group is None:
            continue
        for macro, keywords in _FUNCTIONAL_GROUPS.items():
            item = _first_item(group, macro)
            if item is None:
                continue
            for keyword in keywords:
                if keyword in view:
                    delattr(view, keyword)
                if keyword in item:
                    view.add(item[keyword])
    return view


def padding_mask(pixels: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """True where a stored value is padding (PS3.3 C.7.5.1.1.2), or None when none is.

    Pixel Padding Value alone marks that one value; with Pixel Padding Range Limit, every
    value between the two (inclusive, either order).
    """
    if pixels.ndim != 2 or "PixelPaddingValue" not in ds:
        return None
    try:
        value = int(ds.PixelPaddingValue)
        limit = ds.get("PixelPaddingRangeLimit")
        limit = value if limit in (None, "") else int(limit)
    except (TypeError, ValueError):
        return None  # an unparseable value (e.g. bytes of an unresolved VR): no padding
    low, high = min(value, limit), max(value, limit)
    mask = pixels == low if low == high else (pixels >= low) & (pixels <= high)
    return mask if mask.any() else None


def _valid(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return values if mask is None else values[~mask]


def _is_ct(ds: Dataset) -> bool:
    return str(ds.get("Modality", "")).strip().upper() == "CT"


def _window_choice(ds: Dataset, window: Window | None) -> tuple[float, float, str] | str:
    """The VOI to apply: ``(center, width, function)``, or ``"lut"`` or ``"range"``."""
    if window is not None and _is_ct(ds):
        return float(window[0]), float(window[1]), "LINEAR"
    if "VOILUTSequence" in ds:
        return "lut"
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center not in (None, "") and width not in (None, ""):
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return _first(center), _first(width), function
    default = modality_default_window(ds)
    if default is not None:
        return default[0], default[1], "LINEAR"
    return "range"


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


def _linear_display(
    pixels: np.ndarray,
    ds: Dataset,
    window: Window | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray | None:
    """Rescale and a linear window fused into one multiply-add, or None when not linear.

    ``((x * slope + intercept) - low) / span`` is ``x * a + b``: one pass over the pixels
    instead of four, the common case for CT, CR and MR.
    """
    if "ModalityLUTSequence" in ds:
        return None
    choice = _window_choice(ds, window)
    if choice == "lut":
        return None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if isinstance(choice, tuple):
        center, width, function = choice
        if function == "LINEAR_EXACT" and width > 0:
            low, span = center - width / 2.0, width
        elif function == "LINEAR" and width > 1:
            low, span = center - 0.5 - (width - 1) / 2.0, width - 1.0
        else:
            return None  # SIGMOID, or a width apply_window explains
    else:
        valid = _valid(pixels, mask)
        if valid.size == 0:
            return np.zeros(pixels.shape, dtype=np.float32)
        ends = (float(valid.min()) * slope + intercept, float(valid.max()) * slope + intercept)
        low, span = min(ends), abs(ends[1] - ends[0])
        if span <= 0:
            return np.zeros(pixels.shape, dtype=np.float32)
    out = pixels.astype(np.float32)
    out *= np.float32(slope / span)
    out += np.float32((intercept - low) / span)
    return np.clip(out, 0.0, 1.0, out=out)


def _voi(
    values: np.ndarray,
    ds: Dataset,
    window: Window | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    choice = _window_choice(ds, window)
    if choice == "lut":
        from pydicom.pixels import apply_voi_lut

        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float32)
        return np.clip(out / np.float32(2**bits - 1), 0.0, 1.0)
    if isinstance(choice, tuple):
        return apply_window(values, *choice)
    valid = _valid(values, mask)
    if valid.size == 0:
        return np.zeros_like(values, dtype=np.float32)
    low, high = float(valid.min()), float(valid.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    out = (values - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _palette(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(pixels, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return rgb.astype(np.float32) / np.float32(2 ** (16 if bits > 8 else 8) - 1)


def to_display(
    pixels: np.ndarray,
    ds: Dataset,
    *,
    frame: int | None = None,
    window: Window | None = None,
) -> np.ndarray:
    """Decoded pixels of one frame to display values in [0, 1], ``(H, W)`` or ``(H, W, 3)``.

    Parameters
    ----------
    pixels
        The frame's decoded stored values.
    ds
        Its dataset (the whole multi-frame object for an enhanced image).
    frame
        1-based frame number, to find the frame's functional groups; None is the first.
    window
        ``(center, width)`` in Hounsfield units chosen for the label set; applied (LINEAR)
        only to CT, in place of the dataset's own VOI.

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
    attributes = frame_attributes(ds, frame)
    mask = padding_mask(pixels, attributes)
    display = _linear_display(pixels, attributes, window, mask)
    if display is None:
        display = _voi(_modality_lut(pixels, attributes), attributes, window, mask)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    if mask is not None:
        display[mask] = 0.0  # padding is background, not the darkest (or brightest) tissue
    return display
