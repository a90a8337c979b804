"""The few PS3.8 PDUs and PS3.7 command sets the receiver reads and writes itself.

Association negotiation is in :mod:`triagenode.scp.negotiation`. The data phase, where the
time goes, is handled here: P-DATA-TF items are parsed straight off the socket and their
payload streamed to the spool without building PDU objects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from triagenode.scp.status import AbortReason

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_RQ_TYPE",
    "A_RELEASE_RQ",
    "C_ECHO_RQ",
    "C_STORE_RQ",
    "P_DATA_TF",
    "abort_pdu",
    "decode_command",
    "encode_response",
    "p_data_pdus",
    "release_rp_pdu",
]

A_ASSOCIATE_RQ_TYPE = 0x01
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_ABORT = 0x07

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
NO_DATASET = 0x0101

# Command set element tags (group 0000), PS3.7 E.1.
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_RESPONDED = 0x00000120
PRIORITY = 0x00000700
DATASET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE = 0x00001000


def decode_command(data: bytes) -> dict[int, bytes]:
    """Elements of a command set (always Implicit VR Little Endian) as ``{tag: value}``."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        elements[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return elements


def command_uid(elements: dict[int, bytes], tag: int) -> str | None:
    value = elements.get(tag)
    return value.rstrip(b"\0 ").decode("ascii", "replace") if value else None


def command_us(elements: dict[int, bytes], tag: int) -> int | None:
    value = elements.get(tag)
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str | None,
    sop_instance_uid: str | None = None,
    error_comment: str | None = None,
) -> bytes:
    """A response command set (C-STORE-RSP, C-ECHO-RSP...) in ascending tag order."""
    parts = []
    if sop_class_uid:
        parts.append(_implicit(AFFECTED_SOP_CLASS, _even(sop_class_uid.encode(), b"\0")))
    parts.append(_implicit(COMMAND_FIELD, struct.pack("<H", command_field | 0x8000)))
    parts.append(_implicit(MESSAGE_ID_RESPONDED, struct.pack("<H", message_id)))
    parts.append(_implicit(DATASET_TYPE, struct.pack("<H", NO_DATASET)))
    parts.append(_implicit(STATUS, struct.pack("<H", status)))
    if error_comment:
        text = error_comment.encode("ascii", "replace")[:64]
        parts.append(_implicit(ERROR_COMMENT, _even(text, b" ")))
    if sop_instance_uid:
        parts.append(_implicit(AFFECTED_SOP_INSTANCE, _even(sop_instance_uid.encode(), b"\0")))
    body = b"".join(parts)
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def p_data_pdus(context_id: int, data: bytes, is_command: bool, max_pdu: int) -> Iterable[bytes]:
    """P-DATA-TF PDUs carrying ``data`` in fragments that fit the peer's maximum PDU."""
    # Each PDU holds one PDV item: 4-byte item length, context id, message control header.
    room = (max_pdu - 6) if max_pdu else len(data) or 1
    room = max(room, 1)
    offset = 0
    while True:
        chunk = data[offset : offset + room]
        offset += len(chunk)
        last = offset >= len(data)
        header = (0x01 if is_command else 0x00) | (0x02 if last else 0x00)
        item = struct.pack(">IBB", len(chunk) + 2, context_id, header) + chunk
        yield struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item
        if last:
            return


def release_rp_pdu() -> bytes:
    return struct.pack(">BBII", 0x06, 0, 4, 0)


def abort_pdu(reason: AbortReason) -> bytes:
    # Source 2: the service provider (the node's DUL) aborts.
    return struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, 0x02, int(reason))
