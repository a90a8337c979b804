"""Which images of a study to classify.

- Projection images (CR, DX, MG, IO, PX, XA, RF, US, SC, OP, XC, SM, ...): every instance.
- Cross-sectional volumes (CT, MR, PT, NM): at most K evenly spaced slices per series, by
  InstanceNumber (K = ``model.slices_per_series``), so a 600-slice CT costs K encodes.
- Multi-frame objects: their frames are the slices; evenly spaced frames, at most K.
- Never: SR, PR, KO, RT, waveforms, encapsulated documents, raw data, and never the node's
  own output (recognised by Manufacturer or SeriesDescription marker) -- a study must not
  feed its own report back in.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from triagenode.domain import ImageRef

__all__ = [
    "NODE_MANUFACTURER",
    "NODE_SERIES_MARKER",
    "VOLUME_MODALITIES",
    "InstanceRecord",
    "SelectedImage",
    "evenly_spaced",
    "is_image_sop_class",
    "select_images",
]

NODE_MANUFACTURER = "triagenode"  # Manufacturer the SR writer puts into the node's own SRs
NODE_SERIES_MARKER = "TRIAGENODE"  # SeriesDescription prefix of the node's own output
VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})

# Storage SOP classes that never carry a classifiable image (PS3.4 B.5), by UID prefix.
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # Structured Reports (incl. Key Object Selection 88.59)
    "1.2.840.10008.5.1.4.1.1.11.",  # Presentation States
    "1.2.840.10008.5.1.4.1.1.481.",  # RT Dose, Structure Set, Plans, Treatment Records
    "1.2.840.10008.5.1.4.1.1.9.",  # Waveforms (ECG, audio, haemodynamic, ...)
    "1.2.840.10008.5.1.4.1.1.104.",  # Encapsulated PDF, CDA, STL, OBJ, MTL
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data, Spatial Registration, Fiducials, Segmentation
    "1.2.840.10008.5.1.4.1.1.67",  # Real World Value Mapping
    "1.2.840.10008.5.1.4.1.1.68.",  # Surface Segmentation / Scan
    "1.2.840.10008.5.1.4.1.1.78.",  # Measurements (lensometry, refraction, ...)
    "1.2.840.10008.5.1.4.1.1.79.",  # Macular Grid Thickness and Volume Report
    "1.2.840.10008.5.1.4.1.1.90.",  # Content Assessment Results
    "1.2.840.10008.5.1.4.1.1.200.",  # Protocol Storage
    "1.2.840.10008.5.1.4.38.",  # Hanging Protocols
    "1.2.840.10008.5.1.4.39.",  # Color Palettes
    "1.2.840.10008.5.1.4.43.",  # Generic Implant Templates
    "1.2.840.10008.5.1.4.44.",
    "1.2.840.10008.5.1.4.45.",
)
_NON_IMAGE_MODALITIES = frozenset(
    {
        "SR",
        "PR",
        "KO",
        "RTSTRUCT",
        "RTPLAN",
        "RTDOSE",
        "RTRECORD",
        "DOC",
        "ECG",
        "HD",
        "AU",
        "REG",
        "FID",
        "SEG",
        "PLAN",
        "RWV",
        "AR",
        "KER",
        "LEN",
        "VA",
        "IOL",
        "SMR",
    }
)


@dataclass(frozen=True)
class InstanceRecord:
    """What selection needs to know about one stored instance (built from DB rows)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    modality: str | None
    instance_number: int | None
    number_of_frames: int
    path: Path
    manufacturer: str | None = None
    series_description: str | None = None


@dataclass(frozen=True)
class SelectedImage:
    """One image to classify: its reference (frame set for multi-frame) and its file."""

    ref: ImageRef
    path: Path


def is_image_sop_class(sop_class_uid: str) -> bool:
    """False for storage SOP classes that never hold a classifiable image."""
    return not sop_class_uid.startswith(_NON_IMAGE_PREFIXES)


def _is_own_output(record: InstanceRecord) -> bool:
    manufacturer = (record.manufacturer or "").strip().lower()
    description = (record.series_description or "").strip().upper()
    return manufacturer == NODE_MANUFACTURER or description.startswith(NODE_SERIES_MARKER)


def evenly_spaced(count: int, k: int) -> list[int]:
    """``min(k, count)`` indices in ``range(count)`` spread evenly, centre of each stratum.

    >>> evenly_spaced(10, 3)
    [1, 5, 8]
    """
    if count <= 0 or k <= 0:
        return []
    if count <= k:
        return list(range(count))
    # the centre of each of k equal strata: avoids always picking the first/last slice,
    # which are the likeliest to be outside the organ of interest
    return [int((i + 0.5) * count / k) for i in range(k)]


def select_images(instances: list[InstanceRecord], slices_per_series: int) -> list[SelectedImage]:
    """The images of a study to classify, in series then instance order.

    Parameters
    ----------
    instances
        All stored instances of the study.
    slices_per_series
        K: at most this many slices of a CT/MR/PT/NM series, or frames of a multi-frame
        object, are chosen.

    Returns
    -------
    list of SelectedImage
        Frame numbers (1-based) are set for multi-frame objects only.
    """
    by_series: dict[str, list[InstanceRecord]] = defaultdict(list)
    for record in instances:
        modality = (record.modality or "").strip().upper()
        if modality in _NON_IMAGE_MODALITIES or not is_image_sop_class(record.sop_class_uid):
            continue
        if _is_own_output(record):
            continue
        by_series[record.series_uid].append(record)
    chosen: list[SelectedImage] = []
    for series_uid in sorted(by_series):
        records = sorted(
            by_series[series_uid],
            key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_instance_uid),
        )
        volume = (records[0].modality or "").strip().upper() in VOLUME_MODALITIES
        single = [r for r in records if r.number_of_frames <= 1]
        multi = [r for r in records if r.number_of_frames > 1]
        if volume:
            single = [single[i] for i in evenly_spaced(len(single), slices_per_series)]
        for record in single:
            chosen.append(SelectedImage(_ref(record, None), record.path))
        for record in multi:
            for index in evenly_spaced(record.number_of_frames, slices_per_series):
                chosen.append(SelectedImage(_ref(record, index + 1), record.path))
    return chosen


def _ref(record: InstanceRecord, frame: int | None) -> ImageRef:
    return ImageRef(
        sop_class_uid=record.sop_class_uid,
        sop_instance_uid=record.sop_instance_uid,
        series_uid=record.series_uid,
        frame=frame,
    )
