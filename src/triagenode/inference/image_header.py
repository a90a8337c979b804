"""What image selection knows about stored objects: SOP class tables, header attributes,
and the words that mark localizers and dose screens.

Selection must not decode pixels nor parse whole datasets: a 600-slice CT costs one header
read for its series-level attributes. :func:`read_image_header` reads only the handful of
attributes below, stopping before the pixel data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

__all__ = [
    "CAPTURE_IMAGE_TYPES",
    "DOSE_WORDS",
    "ENHANCED_VOLUME_SOP_CLASSES",
    "FOR_PROCESSING_SOP_CLASSES",
    "LOCALIZER_WORDS",
    "NON_IMAGE_MODALITIES",
    "NON_IMAGE_PREFIXES",
    "SECONDARY_CAPTURE_PREFIX",
    "ImageHeader",
    "is_image_sop_class",
    "read_image_header",
    "words",
]

# Storage SOP classes that never carry a classifiable image (PS3.4 B.5), by UID prefix.
NON_IMAGE_PREFIXES = (
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
NON_IMAGE_MODALITIES = frozenset(
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

# The For Processing variants of the projection X-ray SOP classes (PS3.4 B.5): raw detector
# data meant for a processing workstation, not for reading.
FOR_PROCESSING_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray - For Processing
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray - For Processing
    }
)
# Multi-frame objects that are volumes: they compete with CT/MR/PT/NM series.
ENHANCED_VOLUME_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
    }
)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # SC and its multi-frame variants
LOCALIZER_WORDS = ("SCOUT", "TOPOGRAM", "LOCALIZER", "LOCALISER", "SURVIEW", "SCANOGRAM")
DOSE_WORDS = ("DOSE", "PATIENT PROTOCOL")  # Siemens names its dose screen "Patient Protocol"
CAPTURE_IMAGE_TYPES = ("SCREEN SAVE", "DOSE", "DOSE INFO", "DOSE REPORT", "CSA REPORT")

_TAGS = [
    "SOPClassUID",
    "Modality",
    "Manufacturer",
    "SeriesDescription",
    "ProtocolName",
    "BodyPartExamined",
    "SeriesNumber",
    "ImageType",
    "PresentationIntentType",
]


def is_image_sop_class(sop_class_uid: str) -> bool:
    """False for storage SOP classes that never hold a classifiable image."""
    return not sop_class_uid.startswith(NON_IMAGE_PREFIXES)


@dataclass(frozen=True)
class ImageHeader:
    """The attributes of one instance that selection decides on (upper-cased, stripped)."""

    image_type: tuple[str, ...] = ()
    series_description: str = ""
    protocol_name: str = ""
    body_part: str = ""
    manufacturer: str = ""
    presentation_intent: str = ""
    series_number: int | None = None

    @property
    def derived(self) -> bool:
        """ImageType value 1 DERIVED or value 2 SECONDARY (PS3.3 C.7.6.1.1.2).

        An absent ImageType (optional in CR, for example) counts as original.
        """
        return self.image_type[:1] == ("DERIVED",) or self.image_type[1:2] == ("SECONDARY",)

    @property
    def text(self) -> str:
        """Series description, protocol name and body part as one run of words."""
        return words(f"{self.series_description} {self.protocol_name} {self.body_part}")


def words(text: str) -> str:
    """``text`` upper-cased, every run of non-alphanumerics one space, padded by spaces,
    so that ``f" {word} " in words(text)`` matches whole words only."""
    return " " + " ".join(re.split(r"[^A-Z0-9]+", text.upper())).strip() + " "


def _text(value: object) -> str:
    return str(value or "").strip().upper()


def read_image_header(path: Path) -> ImageHeader:
    """The selection attributes of a stored DICOM file (Part 10 or a bare dataset).

    Raises
    ------
    Exception
        Whatever reading raises (OSError, InvalidDicomError, a bad value, ...), or
        ValueError when the file holds no SOP Class UID; the caller skips the image.
    """
    ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=True)
    if "SOPClassUID" not in ds:
        raise ValueError("no SOP Class UID: not a DICOM image header")
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    number = ds.get("SeriesNumber")
    return ImageHeader(
        image_type=tuple(_text(value) for value in image_type),
        series_description=_text(ds.get("SeriesDescription")),
        protocol_name=_text(ds.get("ProtocolName")),
        body_part=_text(ds.get("BodyPartExamined")),
        manufacturer=_text(ds.get("Manufacturer")),
        presentation_intent=_text(ds.get("PresentationIntentType")),
        series_number=int(number) if number not in (None, "") else None,
    )
