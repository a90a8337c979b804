"""Reading the few header attributes the node needs from a received dataset, and checking
that the dataset is whole.

The receiver never decodes a whole dataset: it parses the elements before Pixel Data from
the first bytes it kept in memory, and only falls back to the spooled file when those bytes
did not reach the pixel data (a header larger than the kept prefix). A deflated dataset's
header is inflated from the spooled file a bounded piece at a time.

:func:`check_complete` walks the element structure (tags and lengths only, values skipped)
to the dataset's end, so a dataset cut short, even inside its pixel data, is refused
instead of stored.
"""

from __future__ import annotations

import io
import os
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

__all__ = ["HEAD_BYTES", "IncompleteDataset", "InstanceHeader", "check_complete", "parse_header"]

# Bytes of each dataset kept in memory for parsing; CT/MR headers are 2-20 KB.
HEAD_BYTES = 64 * 1024
_DEFLATED = "1.2.840.10008.1.2.1.99"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# A deflated dataset's elements before Pixel Data are inflated into memory, up to this.
MAX_INFLATED_HEADER = 16 * 1024 * 1024
_PIXEL_DATA = 0x7FE00010
_MAX_DEPTH = 32  # nested sequences deeper than this are not plausible data
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
    tag_for_keyword(k) for k in ("RequestAttributesSequence", "ScheduledProcedureStepSequence")
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

    def get(self, keyword: str, default: Any = None) -> Any:  # type: ignore[override]
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


# Structure walk ---------------------------------------------------------------------------


class IncompleteDataset(ValueError):
    """The dataset ends inside an element, or its structure is not DICOM's."""


class _Source:
    """Sequential reads and skips over a dataset: the kept head, then the spooled file."""

    def __init__(self, head: bytes, size: int, fd: int | None, offset: int) -> None:
        self._head, self.size, self._fd, self._offset = head, size, fd, offset
        self.position = 0

    def read(self, n: int) -> bytes:
        start, end = self.position, self.position + n
        if end > self.size:
            raise IncompleteDataset(f"dataset ends {end - self.size} bytes inside an element")
        self.position = end
        if end <= len(self._head):
            return self._head[start:end]
        if self._fd is None:
            raise IncompleteDataset("dataset bytes missing")
        data = os.pread(self._fd, n, self._offset + start)
        if len(data) != n:
            raise IncompleteDataset("spooled file shorter than the dataset")
        return data

    def skip(self, n: int) -> None:
        if self.position + n > self.size:
            raise IncompleteDataset(
                f"dataset ends {self.position + n - self.size} bytes inside an element"
            )
        self.position += n

    def at_end(self) -> bool:
        return self.position >= self.size


class _InflatedSource:
    """Sequential reads and skips over a deflated dataset, inflated 1 MiB at a time.

    With ``keep``, every inflated byte read is also kept (for the header), up to ``keep``.
    """

    _STEP = 1024 * 1024

    def __init__(self, file: io.BufferedReader, keep: int = 0) -> None:
        self._file = file
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = b""
        self._at = 0
        self._done = False
        self.position = 0
        self.keep = keep
        self.kept = bytearray()

    def _fill(self, n: int) -> None:
        if len(self._buffer) - self._at >= n:
            return
        parts = [self._buffer[self._at :]]
        have = len(parts[0])
        while have < n and not self._done:
            data = self._inflater.unconsumed_tail or self._file.read(64 * 1024)
            if not data:
                self._done = True
                break
            try:
                more = self._inflater.decompress(data, self._STEP)
            except zlib.error as exc:
                raise IncompleteDataset(f"deflate stream damaged: {exc}") from None
            parts.append(more)
            have += len(more)
            if self._inflater.eof:
                self._done = True
        self._buffer, self._at = b"".join(parts), 0

    def read(self, n: int) -> bytes:
        self._fill(n)
        start, end = self._at, self._at + n
        if end > len(self._buffer):
            raise IncompleteDataset("deflated dataset ends inside an element")
        data = self._buffer[start:end]
        self._at = end
        self.position += n
        if len(self.kept) < self.keep:
            self.kept += data
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, self._STEP)
            self.read(step)
            n -= step

    def at_end(self) -> bool:
        self._fill(1)
        return self._at >= len(self._buffer)

    def check_stream_end(self) -> None:
        # Bytes after the end of the stream (a pad byte, or the CRC and size trailer some
        # encoders add) carry no dataset: only an unterminated stream is incomplete.
        if not self._inflater.eof:
            raise IncompleteDataset("deflate stream not terminated")


_Walkable = _Source | _InflatedSource


def _walk(
    source: _Walkable,
    little: bool,
    implicit: bool,
    depth: int = 0,
    in_item: bool = False,
    stop_at_pixels: bool = False,
) -> int | None:
    """Walk elements to the end (top level) or the item delimiter (``in_item``).

    Returns the offset of the Pixel Data element when ``stop_at_pixels`` met it.
    """
    if depth > _MAX_DEPTH:
        raise IncompleteDataset("sequences nested too deep")
    prefix = "<" if little else ">"
    tag_length = struct.Struct(prefix + "HHI").unpack
    short_length = struct.Struct(prefix + "H").unpack_from
    long_length = struct.Struct(prefix + "I").unpack
    while True:
        if not in_item and source.at_end():
            return None
        start = source.position
        raw = source.read(8)
        group, element, length = tag_length(raw)
        tag = (group << 16) | element
        if tag == _ITEM_END:
            if in_item:
                return None
            raise IncompleteDataset("item delimiter outside an item")
        if group == 0xFFFE:
            raise IncompleteDataset(f"delimiter ({group:04X},{element:04X}) out of place")
        if stop_at_pixels and tag >= _PIXEL_DATA:
            return start
        inner_implicit = implicit
        if not implicit:
            vr = raw[4:6]
            if vr in _LONG_VRS:
                (length,) = long_length(source.read(4))
                inner_implicit = vr == b"UN"  # PS3.5 6.2.2: undefined-length UN is implicit
            elif vr.isalpha() and vr.isupper():
                (length,) = short_length(raw, 6)
            else:
                raise IncompleteDataset(f"no VR at ({group:04X},{element:04X})")
        if length == _UNDEFINED:
            _walk_items(source, little, inner_implicit, depth + 1)
        else:
            source.skip(length)


def _walk_items(source: _Walkable, little: bool, implicit: bool, depth: int) -> None:
    """The items of an undefined-length sequence or encapsulated pixel data."""
    tag_length = struct.Struct(("<" if little else ">") + "HHI").unpack
    while True:
        group, element, length = tag_length(source.read(8))
        tag = (group << 16) | element
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise IncompleteDataset(f"({group:04X},{element:04X}) where an item was expected")
        if length == _UNDEFINED:
            _walk(source, little, implicit, depth + 1, in_item=True)
        else:
            source.skip(length)


def check_complete(
    head: bytes,
    dataset_size: int,
    transfer_syntax_uid: str,
    spooled_file: Path | None,
    data_offset: int,
) -> None:
    """Check that the dataset's elements run exactly to its end.

    Parameters
    ----------
    head
        The first bytes of the dataset (kept in memory while it arrived).
    dataset_size
        Bytes of the dataset as received.
    transfer_syntax_uid
        The presentation context's transfer syntax.
    spooled_file
        The file holding ``data_offset`` bytes of meta, then the dataset; read past ``head``.
    data_offset
        Where the dataset starts in ``spooled_file``.

    Raises
    ------
    IncompleteDataset
        When the dataset ends inside an element, or is not a DICOM element structure.
    """
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    little = transfer_syntax_uid != _BIG_ENDIAN
    if transfer_syntax_uid == _DEFLATED:
        if spooled_file is None:
            raise IncompleteDataset("deflated dataset needs its file")
        with open(spooled_file, "rb") as file:
            file.seek(data_offset)
            inflated = _InflatedSource(file)
            _walk(inflated, True, False)
            inflated.check_stream_end()
        return
    if not implicit and len(head) >= 6 and not (head[4:6].isalpha() and head[4:6].isupper()):
        implicit = True  # sent implicit whatever was negotiated; pydicom reads it so too
    if dataset_size <= len(head):
        _walk(_Source(head, dataset_size, None, 0), little, implicit)
        return
    if spooled_file is None:
        raise IncompleteDataset("dataset bytes missing")
    fd = os.open(spooled_file, os.O_RDONLY)
    try:
        _walk(_Source(head, dataset_size, fd, data_offset), little, implicit)
    finally:
        os.close(fd)


def inflated_header(spooled_file: Path, data_offset: int) -> bytes:
    """A deflated dataset's elements before Pixel Data, inflated (at most 16 MiB).

    Raises
    ------
    IncompleteDataset
        When the stream is damaged or the header is larger than the limit.
    """
    with open(spooled_file, "rb") as file:
        file.seek(data_offset)
        inflated = _InflatedSource(file, keep=MAX_INFLATED_HEADER + 1)
        end = _walk(inflated, True, False, stop_at_pixels=True)
    if end is None:
        end = inflated.position
    if end > MAX_INFLATED_HEADER:
        raise IncompleteDataset("deflated header larger than 16 MiB")
    return bytes(inflated.kept[:end])
