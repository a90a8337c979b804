"""The Part 10 file header the node writes in front of received dataset bytes.

PS3.10 7.1: a 128-byte preamble, ``DICM`` and the File Meta Information group in Explicit VR
Little Endian. The receiver builds it from the C-STORE request, so the dataset that follows
is stored exactly as it arrived.
"""

from __future__ import annotations

import struct

from triagenode import __version__

__all__ = ["IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME", "file_meta_bytes"]

# Derived once under the 2.25 (UUID) root: stable across releases of the node.
IMPLEMENTATION_CLASS_UID = "2.25.227380536453410727383297467049118702409"
IMPLEMENTATION_VERSION_NAME = f"TRIAGENODE_{__version__}"[:16]


def _element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    # Explicit VR Little Endian, PS3.5 7.1.2: OB has a 4-byte length after two reserved bytes.
    if vr == b"OB":
        return struct.pack("<HH2s2xI", tag[0], tag[1], vr, len(value)) + value
    return struct.pack("<HH2sH", tag[0], tag[1], vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str | None
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1) for one instance."""
    body = b"".join(
        [
            _element((0x0002, 0x0001), b"OB", b"\x00\x01"),
            _element((0x0002, 0x0002), b"UI", _ui(sop_class_uid)),
            _element((0x0002, 0x0003), b"UI", _ui(sop_instance_uid)),
            _element((0x0002, 0x0010), b"UI", _ui(transfer_syntax_uid)),
            _element((0x0002, 0x0012), b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _element((0x0002, 0x0013), b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        ]
        + ([_element((0x0002, 0x0016), b"AE", _text(source_ae))] if source_ae else [])
    )
    group_length = _element((0x0002, 0x0000), b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body
