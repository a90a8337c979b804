"""Small files that declare or inflate to huge images, made without holding the huge image.

Used by the predict tests (refused before decoding) and by ``benchmarks/api_memory.py``
(the same files against a real server, measuring its memory).
"""

from __future__ import annotations

import io
import struct
import zlib

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

__all__ = ["deflated_dicom_bomb", "png_bomb"]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int, height: int, *, complete: bool = True) -> bytes:
    """A grey 8-bit PNG of ``width`` x ``height`` zero pixels.

    ``complete=False`` writes only the first row of image data: the header still declares
    the full size (all that a check before decoding may look at), and the file is made in
    microseconds. A complete 13000x13000 file is about 0.2 MB and takes a few seconds.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    data = bytearray()
    for _ in range(height if complete else 1):
        data += packer.compress(row)
    data += packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", bytes(data))
        + _chunk(b"IEND", b"")
    )


def deflated_dicom_bomb(inflated_bytes: int, rows: int = 512, columns: int = 512) -> bytes:
    """A Deflated Explicit VR Little Endian SC image whose data set inflates past
    ``inflated_bytes``: a modest header (``rows`` x ``columns``, one frame) followed by a
    Pixel Data element of that many zero bytes, deflated as it is written."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = Dataset()
    head.SOPClassUID = SecondaryCaptureImageStorage
    head.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    head.Modality = "OT"
    head.SamplesPerPixel = 1
    head.PhotometricInterpretation = "MONOCHROME2"
    head.Rows = rows
    head.Columns = columns
    head.BitsAllocated = 8
    head.BitsStored = 8
    head.HighBit = 7
    head.PixelRepresentation = 0
    # the Part 10 preamble and meta as pydicom writes them, then the deflated body by hand
    shell = Dataset()
    shell.file_meta = meta
    prefix = _file_meta_part(shell)
    head.file_meta = FileMetaDataset(meta)
    head.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = io.BytesIO()
    head.save_as(plain, enforce_file_format=True)
    body = plain.getvalue()[len(_meta_prefix(plain.getvalue())) :]
    length = inflated_bytes + (inflated_bytes & 1)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = bytearray(packer.compress(body))
    deflated += packer.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length))
    block = bytes(1 << 20)
    for _ in range(length // len(block)):
        deflated += packer.compress(block)
    deflated += packer.compress(bytes(length % len(block)))
    deflated += packer.flush()
    return prefix + bytes(deflated)


def _meta_prefix(encoded: bytes) -> bytes:
    """Preamble, ``DICM`` and the file meta group of a Part 10 file (its group length)."""
    group_length = struct.unpack("<I", encoded[140:144])[0]
    return encoded[: 144 + group_length]


def _file_meta_part(shell: Dataset) -> bytes:
    out = io.BytesIO()
    shell.save_as(out, enforce_file_format=True)
    return _meta_prefix(out.getvalue())
