"""Reading the few header attributes the node needs from a received dataset.

The receiver never decodes a whole dataset: it parses the elements before Pixel Data from
the first bytes it kept in memory, and only falls back to the spooled file when those bytes
did not reach the pixel data (a header larger than the kept prefix). A deflated dataset's
header is inflated from the spooled file a bounded piece at a time
(:func:`~triagenode.scp.structure.inflated_header`). Whether the dataset is whole is
:mod:`triagenode.scp.structure`'s question.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from triagenode.dicom_attrs import TRIAGE_KEYWORDS, triage_inputs
from triagenode.scp.structure import MAX_INFLATED_HEADER, inflated_header

__all__ = ["HEAD_BYTES", "InstanceHeader", "parse_header"]

# Bytes of each dataset kept in memory for parsing; CT/MR headers are 2-20 KB.
HEAD_BYTES = 64 * 1024
_DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_PIXEL_DATA = 0x7FE00010
# Syntaxes whose dataset is not explicit VR little endian as sent (PS3.5 A.4: every
# encapsulated syntax is explicit VR little endian outside the pixel data).
_NOT_LITTLE_EXPLICIT = frozenset([_DEFLATED, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.98"])


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


# Tags of every top-level element the node reads (see InstanceHeader and TRIAGE_KEYWORDS).
_WANTED: dict[int, str] = {
    int(tag_for_keyword(k)): k  # type: ignore[arg-type]
    for k in (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "PatientID",
        "InstanceNumber",
        "NumberOfFrames",
        *TRIAGE_KEYWORDS,
    )
}
_DICTIONARY_VR = {tag: dictionary_VR(tag) for tag in _WANTED}
_LAST_WANTED = max(_WANTED)
_TEXT_VRS = frozenset(("LO", "LT", "PN", "SH", "ST", "UC", "UT"))
_DELIMITERS = {0x5C}  # backslash separates values
# Sequences triage_inputs looks into: when present, pydicom reads the header instead.
_NESTED = frozenset(
    tag_for_keyword(k)
    for k in (
        "AnatomicRegionSequence",
        "RequestAttributesSequence",
        "ScheduledProcedureStepSequence",
    )
)
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_UNDEFINED = 0xFFFFFFFF
# An element's first 8 bytes: tag, then VR and 2-byte length (explicit VR) or a 4-byte
# length (implicit VR; the trailing field is then unused).
_EXPLICIT_HEAD = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_HEAD = struct.Struct("<HHI0s").unpack_from
_LENGTH = struct.Struct("<I").unpack_from
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _NeedsPydicom(Exception):
    """The quick scan met something it leaves to pydicom."""


def _skip_undefined(data: bytes, offset: int, implicit: bool) -> int:
    """Offset after an undefined-length value (a sequence or encapsulated data)."""
    depth = 0
    end = len(data)
    while offset + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", data, offset)
        tag = (group << 16) | element
        offset += 8
        if tag == _ITEM:
            if length != _UNDEFINED:
                offset += length
            else:
                depth += 1
        elif tag == _ITEM_END:
            depth -= 1
        elif tag == _SEQUENCE_END:
            if depth == 0:
                return offset
            raise _NeedsPydicom("unbalanced sequence")
        else:  # an element inside an undefined-length item
            offset -= 8
            offset = _skip_element(data, offset, implicit)
    raise _NeedsPydicom("sequence runs past the kept bytes")


def _skip_element(data: bytes, offset: int, implicit: bool) -> int:
    length: int
    if implicit:
        _, _, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
    else:
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, offset + 8)[0]
            offset += 12
        else:
            length = struct.unpack_from("<H", data, offset + 6)[0]
            offset += 8
    if length == _UNDEFINED:
        return _skip_undefined(data, offset, implicit)
    return offset + length


class _Header(dict[str, Any]):
    """Decoded top-level values by keyword: the little of ``Dataset`` that is needed."""

    def get(self, keyword: str, default: Any = None) -> Any:
        return super().get(keyword, default)


def _decode(raw: bytes, vr: str, encodings: list[str]) -> str | list[str]:
    if vr in _TEXT_VRS and encodings:
        text = decode_bytes(raw, encodings, _DELIMITERS)
    else:
        text = raw.decode("latin-1")
    text = text.rstrip("\0 ")
    if vr not in ("LT", "ST", "UT") and "\\" in text:
        return [part.strip() for part in text.split("\\")]
    return text.strip()


def _scan(head: bytes, transfer_syntax_uid: str) -> _Header:
    """The wanted top-level values of a little endian dataset, decoded.

    Walks the elements without building pydicom objects and stops after the last wanted
    tag, so the pixel data is never reached; anything unusual goes to pydicom instead.
    The loop runs once per element of every received instance, so it is written flat.
    """
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    if not implicit and transfer_syntax_uid in _NOT_LITTLE_EXPLICIT:
        raise _NeedsPydicom(transfer_syntax_uid)
    found = _Header()
    encodings: list[str] = []
    offset, end = 0, len(head)
    element_head = _IMPLICIT_HEAD if implicit else _EXPLICIT_HEAD
    while offset + 8 <= end:
        group, element, vr_or_length, short_length = element_head(head, offset)
        tag = (group << 16) | element
        if tag > _LAST_WANTED:
            return found
        if tag in _NESTED:
            raise _NeedsPydicom("request attributes present")
        if implicit:
            length, value_at = vr_or_length, offset + 8
        elif vr_or_length in _LONG_VRS:
            length, value_at = _LENGTH(head, offset + 8)[0], offset + 12
        elif vr_or_length.isupper():
            length, value_at = short_length, offset + 8
        else:  # not a VR: the data is not what the transfer syntax says; pydicom copes
            raise _NeedsPydicom("explicit VR expected")
        if length == _UNDEFINED:
            offset = _skip_undefined(head, value_at, implicit)
        else:
            offset = value_at + length
        if offset > end:
            break
        keyword = _WANTED.get(tag)
        if keyword is None:
            continue
        vr = _DICTIONARY_VR[tag] if implicit else vr_or_length.decode("ascii")
        raw = head[value_at:offset]
        if keyword == "SpecificCharacterSet":
            names = raw.decode("ascii").strip(" \0").split("\\")
            encodings = convert_encodings([n.strip() for n in names])
            continue
        found[keyword] = _decode(raw, vr, encodings)
    raise _NeedsPydicom("header runs past the kept bytes")


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
    ds: Dataset | _Header
    if transfer_syntax_uid == _DEFLATED:
        # The elements before Pixel Data, inflated: from here on explicit VR little endian.
        if spooled_file is not None:
            head = inflated_header(spooled_file, len(meta))
        else:
            head = zlib.decompressobj(-zlib.MAX_WBITS).decompress(head, MAX_INFLATED_HEADER)
        meta, complete, spooled_file, transfer_syntax_uid = b"", True, None, _EXPLICIT_LE
    try:
        ds = _scan(head, transfer_syntax_uid)
    except (_NeedsPydicom, struct.error, UnicodeDecodeError, LookupError):
        if not meta:  # an inflated prefix: a bare explicit VR little endian dataset
            ds = read_dataset(io.BytesIO(head), False, True, stop_when=_at_pixels)
            return _instance_header(ds, request_priority, calling_ae)
        ds, reached_pixels = _read(meta + head)
        truncated = not (complete or reached_pixels)
        if spooled_file is not None and truncated:
            ds = dcmread(spooled_file, stop_before_pixels=True, force=True)
    return _instance_header(ds, request_priority, calling_ae)


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    return tag == _PIXEL_DATA


def _instance_header(
    ds: Dataset | _Header, request_priority: int | None, calling_ae: str | None
) -> InstanceHeader:
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
        # _Header offers the .get() that triage_inputs uses.
        triage_inputs=triage_inputs(cast(Dataset, ds), request_priority, calling_ae),
    )
