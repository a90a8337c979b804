"""Association negotiation PDUs (PS3.8 9.3.2-9.3.4), read and written by hand.

A sender such as DCMTK ``storescu`` proposes a presentation context for every storage SOP
class, over a hundred of them; pynetdicom's PDU classes validate every UID with regular
expressions and took about 20 ms of GIL-holding Python per association, serialising
concurrent senders. Only the few fields the node uses are read here, in a single pass.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from triagenode.scp.status import RejectReason

__all__ = [
    "APPLICATION_CONTEXT",
    "AssociateRequest",
    "PresentationContextRQ",
    "accept_pdu",
    "parse_associate_rq",
    "reject_pdu",
]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_FIXED = 74  # PDU header (6) + version, reserved, called/calling AE, reserved (68)


@dataclass(frozen=True)
class PresentationContextRQ:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ the node acts on."""

    called_ae_raw: bytes  # 16 bytes, echoed in the A-ASSOCIATE-AC
    calling_ae_raw: bytes
    application_context_name: str = ""
    maximum_length_received: int = 0
    contexts: list[PresentationContextRQ] = field(default_factory=list)

    @property
    def called_ae_title(self) -> str:
        return self.called_ae_raw.decode("ascii", "replace").strip()

    @property
    def calling_ae_title(self) -> str:
        return self.calling_ae_raw.decode("ascii", "replace").strip()


def _uid(value: bytes) -> str:
    # UIDs in negotiation items are not padded, but some peers add a NUL or space anyway.
    return value.rstrip(b"\0 ").decode("ascii")


def _items(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    """``(type, value)`` of each item or sub-item in ``data[offset:]`` (2-byte lengths)."""
    items = []
    end = len(data)
    while offset < end:
        if offset + 4 > end:
            raise ValueError("truncated item header")
        item_type = data[offset]
        (length,) = struct.unpack_from(">H", data, offset + 2)
        offset += 4
        if offset + length > end:
            raise ValueError("item longer than its PDU")
        items.append((item_type, data[offset : offset + length]))
        offset += length
    return items


def parse_associate_rq(raw: bytes) -> AssociateRequest:
    """Parse a whole A-ASSOCIATE-RQ PDU (header included).

    Raises
    ------
    ValueError
        When the PDU is malformed.
    """
    if len(raw) < _FIXED or raw[0] != 0x01:
        raise ValueError("not an A-ASSOCIATE-RQ")
    request = AssociateRequest(called_ae_raw=raw[10:26], calling_ae_raw=raw[26:42])
    for item_type, value in _items(raw, _FIXED):
        if item_type == 0x10:
            request.application_context_name = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ValueError("short presentation context item")
            abstract, transfer = "", []
            for sub_type, sub_value in _items(value, 4):
                if sub_type == 0x30:
                    abstract = _uid(sub_value)
                elif sub_type == 0x40:
                    transfer.append(_uid(sub_value))
            request.contexts.append(PresentationContextRQ(value[0], abstract, tuple(transfer)))
        elif item_type == 0x50:
            for sub_type, sub_value in _items(value, 0):
                if sub_type == 0x51 and len(sub_value) == 4:
                    (request.maximum_length_received,) = struct.unpack(">I", sub_value)
    return request


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def accept_pdu(
    request: AssociateRequest,
    abstract_syntaxes: frozenset[str],
    transfer_syntaxes: frozenset[str],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version_name: str,
) -> tuple[bytes, dict[int, tuple[str, str]]]:
    """The A-ASSOCIATE-AC for ``request`` and the accepted contexts ``{id: (sop, ts)}``.

    A context is accepted with the first transfer syntax the requestor proposed that the
    node knows, so the sender never has to convert its files.
    """
    parts = [_item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
    accepted: dict[int, tuple[str, str]] = {}
    for context in request.contexts:
        offered = context.transfer_syntaxes
        chosen = next((ts for ts in offered if ts in transfer_syntaxes), None)
        if context.abstract_syntax not in abstract_syntaxes:
            result, syntax = 0x03, (offered[0] if offered else "1.2.840.10008.1.2")
        elif chosen is None:
            result, syntax = 0x04, (offered[0] if offered else "1.2.840.10008.1.2")
        else:
            result, syntax = 0x00, chosen
            accepted[context.context_id] = (context.abstract_syntax, chosen)
        body = struct.pack(">BxBx", context.context_id, result)
        parts.append(_item(0x21, body + _item(0x40, syntax.encode("ascii"))))
    user = (
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, implementation_class_uid.encode("ascii"))
        + _item(0x55, implementation_version_name.encode("ascii"))
    )
    parts.append(_item(0x50, user))
    body = (
        struct.pack(">H2x", 1)
        + request.called_ae_raw
        + request.calling_ae_raw
        + bytes(32)
        + b"".join(parts)
    )
    return struct.pack(">BxI", 0x02, len(body)) + body, accepted


def reject_pdu(reason: RejectReason) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(
        ">BxIxBBB", 0x03, 4, int(reason.result), int(reason.source), int(reason.diagnostic)
    )
