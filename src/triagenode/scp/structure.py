"""Checking that a received dataset is whole: a walk over its element structure.

The walk reads tags and lengths only and skips values, from the dataset's first bytes kept
in memory and then from the spooled file, so a dataset cut short, even inside its pixel
data, is refused instead of stored. A deflated dataset is inflated a bounded piece at a
time, never whole.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

__all__ = ["MAX_INFLATED_HEADER", "IncompleteDataset", "check_complete", "inflated_header"]

_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# A deflated dataset's elements before Pixel Data are inflated into memory, up to this.
MAX_INFLATED_HEADER = 16 * 1024 * 1024
_PIXEL_DATA = 0x7FE00010
_MAX_DEPTH = 32  # nested sequences deeper than this are not plausible data
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class IncompleteDataset(ValueError):
    """The dataset ends inside an element, or its structure is not DICOM's."""


class _Source:
    """Sequential reads and skips over a dataset: the kept head, then the spooled file
    (opened only if the walk needs bytes past the head)."""

    def __init__(self, head: bytes, size: int, path: Path | None, offset: int) -> None:
        self._head, self.size, self._path, self._offset = head, size, path, offset
        self._fd: int | None = None
        self.position = 0

    def read(self, n: int) -> bytes:
        start, end = self.position, self.position + n
        if end > self.size:
            raise IncompleteDataset(f"dataset ends {end - self.size} bytes inside an element")
        self.position = end
        if end <= len(self._head):
            return self._head[start:end]
        if self._fd is None:
            if self._path is None:
                raise IncompleteDataset("dataset bytes missing")
            self._fd = os.open(self._path, os.O_RDONLY)
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

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_EXPLICIT_HEAD = struct.Struct("<HH2sH").unpack_from
_LENGTH = struct.Struct("<I").unpack_from


def _skim(head: bytes, size: int, implicit: bool) -> int:
    """Offset after the top-level little endian elements of defined length that lie in
    ``head``, up to the first one the walk must look into; the common case, made quick."""
    offset, limit = 0, min(len(head), size) - 12
    while offset <= limit:
        group, _, vr, short_length = _EXPLICIT_HEAD(head, offset)
        if group == 0xFFFE:
            return offset
        if implicit:
            (length,) = _LENGTH(head, offset + 4)
            value_at = offset + 8
        elif vr in _LONG_VRS:
            (length,) = _LENGTH(head, offset + 8)
            value_at = offset + 12
        elif vr.isalpha() and vr.isupper():
            length, value_at = short_length, offset + 8
        else:
            return offset
        if length == _UNDEFINED or value_at + length > size:
            return offset
        offset = value_at + length
    return offset


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
    source = _Source(head, dataset_size, spooled_file, data_offset)
    if little:
        source.position = _skim(head, dataset_size, implicit)
    try:
        _walk(source, little, implicit)
    finally:
        source.close()


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
