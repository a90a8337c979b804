"""Reading the few header attributes the node needs from a received dataset.

The receiver never decodes a whole dataset: it parses the elements before Pixel Data from
the first bytes it kept in memory, and only falls back to the spooled file when those bytes
did not reach the pixel data (a header larger than the kept prefix).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from triagenode.dicom_attrs import triage_inputs

__all__ = ["HEAD_BYTES", "InstanceHeader", "parse_header"]

# Bytes of each dataset kept in memory for parsing; CT/MR headers are 2-20 KB.
HEAD_BYTES = 64 * 1024
_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class InstanceHeader:
    """What the node records about one instance. ``patient_id`` is only ever hashed."""

    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    patient_id: str | None
    modality: str | None
    body_part: str | None
    instance_number: int | None
    number_of_frames: int | None
    triage_inputs: dict[str, str] = field(default_factory=dict)


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _str(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _read(meta_and_head: bytes) -> tuple[Dataset, bool]:
    stream = io.BytesIO(meta_and_head)
    ds = dcmread(stream, stop_before_pixels=True, force=True)
    # dcmread rewinds to the Pixel Data tag when it stops there: a position short of the end
    # means every element before the pixels was inside the prefix.
    return ds, stream.tell() < len(meta_and_head)


def parse_header(
    meta: bytes,
    head: bytes,
    complete: bool,
    transfer_syntax_uid: str,
    spooled_file: Path | None,
    request_priority: int | None,
    calling_ae: str | None,
) -> InstanceHeader:
    """Parse the attributes the node needs.

    Parameters
    ----------
    meta
        Preamble and file meta group the node wrote before the dataset.
    head
        The first bytes of the received dataset.
    complete
        True when ``head`` is the whole dataset.
    transfer_syntax_uid
        The presentation context's transfer syntax.
    spooled_file
        The temp file holding meta and the whole dataset, read when ``head`` is not enough.
    request_priority, calling_ae
        The C-STORE request's Priority and the sender, for the triage inputs.

    Raises
    ------
    Exception
        Whatever pydicom raises for a dataset it cannot parse; the caller maps it to a
        "cannot understand" status.
    """
    ds, reached_pixels = _read(meta + head)
    truncated = not (complete or reached_pixels)
    if spooled_file is not None and (
        truncated or (transfer_syntax_uid == _DEFLATED and not complete)
    ):
        ds = dcmread(spooled_file, stop_before_pixels=True, force=True)
    return InstanceHeader(
        study_uid=_str(ds.get("StudyInstanceUID")),
        series_uid=_str(ds.get("SeriesInstanceUID")),
        sop_instance_uid=_str(ds.get("SOPInstanceUID")),
        sop_class_uid=_str(ds.get("SOPClassUID")),
        patient_id=_str(ds.get("PatientID")),
        modality=_str(ds.get("Modality")),
        body_part=_str(ds.get("BodyPartExamined")),
        instance_number=_int(ds.get("InstanceNumber")),
        number_of_frames=_int(ds.get("NumberOfFrames")),
        triage_inputs=triage_inputs(ds, request_priority, calling_ae),
    )
