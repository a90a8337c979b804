"""Images posted to the research endpoints, checked from their headers before any decoding.

A few hundred kilobytes of PNG can declare 20000x20000 pixels, and half a megabyte of
deflated DICOM can inflate to gigabytes. So every image is measured first, from what its
header says (PIL's lazy open; a DICOM read that stops before the pixel data, after a
streaming inflate that counts bytes and stops at a cap), and refused above the configured
limits with 413. Only then is it decoded, and large pictures are reduced as they are decoded
(JPEG's own scaled decoding, PIL's box reduction), so one request costs a bounded amount of
memory whatever the peer sends.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import threading
import zlib
from dataclasses import dataclass

import numpy as np

from triagenode.api.problems import Problem

__all__ = [
    "ImageLimits",
    "PredictSlots",
    "check_dicom",
    "decode_image",
    "decode_images",
    "decode_picture",
    "reduce_factor",
]

# PS3.5 A.5: Deflated Explicit VR Little Endian, the one syntax that deflates the whole data
# set (pydicom inflates it in one piece before reading a single element).
DEFLATED_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99"})
# Pictures are reduced by a whole factor as they are decoded, keeping the shortest side at
# KEEP_SHORTEST_SIDE or more (every model input is 224-448, so scores hardly move); a very
# long, thin picture is reduced further, to about _KEEP_PIXELS, while its shortest side
# stays at _MIN_SHORTEST_SIDE or more (the model only sees a centre crop of it anyway).
KEEP_SHORTEST_SIDE = 512
_KEEP_PIXELS = 4 * 1024 * 1024
_MIN_SHORTEST_SIDE = 256
_INFLATE_CHUNK = 1 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageLimits:
    """What one posted image may declare (``api.max_image_pixels`` and friends)."""

    max_pixels: int
    max_frames: int
    max_inflated_bytes: int
    # all pictures of one request together, as held after reduction
    max_decoded_bytes: int = 128 * 1024 * 1024

    @classmethod
    def from_settings(cls, api: object) -> ImageLimits:
        return cls(
            max_pixels=int(api.max_image_pixels),  # type: ignore[attr-defined]
            max_frames=int(api.max_frames),  # type: ignore[attr-defined]
            max_inflated_bytes=int(api.max_inflated_bytes),  # type: ignore[attr-defined]
            max_decoded_bytes=int(api.max_decoded_bytes),  # type: ignore[attr-defined]
        )


def _too_large(index: int, what: str) -> Problem:
    return Problem(413, f"image {index}: {what}", "image-too-large")


def _bad(index: int, what: str) -> Problem:
    return Problem(422, f"image {index}: {what}", "bad-image")


def _check_size(width: int, height: int, limits: ImageLimits, index: int) -> None:
    if width < 1 or height < 1:
        raise _bad(index, f"declares {width}x{height} pixels")
    if width * height > limits.max_pixels:
        raise _too_large(
            index,
            f"{width}x{height} pixels is more than api.max_image_pixels ({limits.max_pixels})",
        )


def _inflated_size(deflated: memoryview, cap: int, index: int) -> int:
    """Bytes the raw deflate stream inflates to, counted without keeping them, at most ``cap``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    for start in range(0, len(deflated), _INFLATE_CHUNK):
        pending = bytes(deflated[start : start + _INFLATE_CHUNK])
        while pending:
            try:
                out = inflater.decompress(pending, _INFLATE_CHUNK)
            except zlib.error:
                raise _bad(index, "deflated data set is corrupt") from None
            total += len(out)
            if total > cap:
                raise _too_large(
                    index,
                    f"deflated data set inflates to more than api.max_inflated_bytes ({cap})",
                )
            pending = inflater.unconsumed_tail
    return total


def check_dicom(data: bytes, limits: ImageLimits, index: int = 0) -> None:
    """Refuse a DICOM Part 10 file whose header declares more than ``limits``.

    Raises
    ------
    Problem
        413 above a limit (inflated size, pixels per frame, frames), 422 for a header that
        cannot be read.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_preamble

    stream = io.BytesIO(data)
    try:
        read_preamble(stream, force=False)
        # read_file_meta_info() wants a path; its helper reads the same from a stream
        meta = pydicom.filereader._read_file_meta_info(stream)
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        raise _bad(index, "DICOM file meta information cannot be read") from None
    if syntax in DEFLATED_SYNTAXES:
        _inflated_size(memoryview(data)[stream.tell() :], limits.max_inflated_bytes, index)
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows = int(header.get("Rows") or 0)
        columns = int(header.get("Columns") or 0)
        frames = int(header.get("NumberOfFrames") or 1)
        bits = int(header.get("BitsAllocated") or 0)
    except Exception:
        raise _bad(index, "DICOM header cannot be read") from None
    if rows or columns:
        _check_size(columns, rows, limits, index)
    if frames > limits.max_frames:
        raise _too_large(
            index, f"{frames} frames is more than api.max_frames ({limits.max_frames})"
        )
    if bits not in (0, 1, 8, 16, 32, 64):
        raise _bad(index, f"BitsAllocated {bits} is not supported")


def reduce_factor(width: int, height: int) -> int:
    """The whole factor a ``width`` x ``height`` picture is reduced by while decoding."""
    shortest = min(width, height)
    by_pixels = math.ceil(math.sqrt(width * height / _KEEP_PIXELS))
    factor = max(shortest // KEEP_SHORTEST_SIDE, min(by_pixels, shortest // _MIN_SHORTEST_SIDE))
    return max(1, factor)


def decode_picture(data: bytes, limits: ImageLimits, index: int = 0) -> np.ndarray:
    """The pixels of a PNG or JPEG, measured before decoding and reduced while decoding."""
    from PIL import Image, UnidentifiedImageError

    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":
        # PIL's open() itself refuses past twice its own bomb bound, without the size: the
        # IHDR chunk, always first, gives it exactly
        width, height = struct.unpack(">II", data[16:24])
        _check_size(width, height, limits, index)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            # open() read the header only: the size is known, nothing is decoded yet
            _check_size(opened.width, opened.height, limits, index)
            factor = reduce_factor(opened.width, opened.height)
            if factor > 1 and opened.format == "JPEG":
                # the JPEG decoder itself scales by 1/2, 1/4 or 1/8: less to hold and to decode
                mode = "L" if opened.mode == "L" else "RGB"
                opened.draft(mode, (opened.width // factor, opened.height // factor))
            image: Image.Image = opened
            image.load()
            if image.mode not in ("L", "I", "I;16", "RGB"):
                image = image.convert("RGB")
            factor = reduce_factor(image.width, image.height)
            if factor > 1:
                sixteen = image.mode == "I;16"
                image = (image.convert("I") if sixteen else image).reduce(factor)
                pixels = np.asarray(image)
                return pixels.astype(np.uint16) if sixteen else pixels
            return np.asarray(image)
    except Problem:
        raise
    except Image.DecompressionBombError:
        raise _too_large(
            index, f"declares more pixels than api.max_image_pixels ({limits.max_pixels})"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise _bad(index, "cannot be decoded") from None


def decode_image(encoded: str, limits: ImageLimits, index: int = 0) -> np.ndarray | bytes:
    """The pixels of a base64 PNG/JPEG, or the checked bytes of a base64 DICOM file.

    Raises
    ------
    Problem
        422 naming the image (by position) that is not base64 or not a supported format;
        413 when its header declares more than ``limits``.
    """
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(index, "not valid base64") from None
    if data[128:132] == b"DICM":
        check_dicom(data, limits, index)
        return data
    if data.startswith((_PNG_SIGNATURE, b"\xff\xd8\xff")):
        return decode_picture(data, limits, index)
    raise _bad(index, "not a PNG, JPEG or DICOM Part 10 file")


def decode_images(encoded: list[str], limits: ImageLimits) -> list[np.ndarray | bytes]:
    """:func:`decode_image` for each of a request's images, one after the other (so the
    full-size pixels of at most one are held at a time), within ``limits.max_decoded_bytes``
    for the reduced pictures together.

    Raises
    ------
    Problem
        As :func:`decode_image`; 413 naming the first image past the request's budget.
    """
    images: list[np.ndarray | bytes] = []
    held = 0
    for index, image in enumerate(encoded):
        decoded = decode_image(image, limits, index)
        if isinstance(decoded, np.ndarray):
            held += decoded.nbytes
            if held > limits.max_decoded_bytes:
                raise _too_large(
                    index,
                    f"images 0-{index} together hold {held} bytes of pixels after reduction, "
                    f"more than api.max_decoded_bytes ({limits.max_decoded_bytes}); send "
                    "fewer images per request",
                )
        images.append(decoded)
    return images


class PredictSlots:
    """At most ``size`` predictions decode and run at once; the next caller is told to retry.

    Refusing at once (503 with ``Retry-After``) instead of queueing keeps memory bounded by
    ``size`` requests, whatever the number of callers.
    """

    def __init__(self, size: int, retry_after_s: int = 2) -> None:
        self.size = size
        self.retry_after_s = retry_after_s
        self._slots = threading.BoundedSemaphore(size)

    def __enter__(self) -> PredictSlots:
        if not self._slots.acquire(blocking=False):
            raise Problem(
                503,
                f"all {self.size} prediction slots are busy (api.max_concurrent_predictions); "
                "retry later",
                "busy",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._slots.release()
