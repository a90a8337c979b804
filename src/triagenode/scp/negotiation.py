"""Association negotiation PDUs (PS3.8 9.3.2-9.3.4), read and written by hand.

A sender such as DCMTK ``storescu`` proposes a presentation context for every storage SOP
class, over a hundred of them; pynetdicom's PDU classes validate every UID with regular
expressions, GIL-holding Python that serialised concurrent senders (docs/performance.md).
Only the few fields the node uses are read here, in a single pass.
"""

from __future__ import annotations

import struct
from collections.abc import Container
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
# PS3.8 9.3.2.2: presentation context IDs are odd integers 1-255, so at most 128 per request.
MAX_CONTEXTS = 128


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
    protocol_version: int = 1  # bit 0 set: version 1, the only one PS3.8 defines
    application_context_name: str = ""
    maximum_length_received: int = 0
    contexts: list[PresentationContextRQ] = field(default_factory=list)
    # PS3.7 D.3.3.4 SCP/SCU role selection: {abstract syntax: (SCU role, SCP role)}.
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)
    # PS3.7 D.3.3.3 asynchronous operations window (invoked, performed), when proposed.
    async_window: tuple[int, int] | None = None
    # PS3.7 D.3.3.7 user identity: (type, positive response requested), when proposed.
    user_identity: tuple[int, bool] | None = None

    @property
    def supports_version_1(self) -> bool:
        return bool(self.protocol_version & 0x0001)

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
    (request.protocol_version,) = struct.unpack_from(">H", raw, 6)
    seen: set[int] = set()
    for item_type, value in _items(raw, _FIXED):
        if item_type == 0x10:
            request.application_context_name = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ValueError("short presentation context item")
            context_id = value[0]
            if not context_id % 2 or context_id in seen:
                raise ValueError(f"presentation context ID {context_id} even or repeated")
            seen.add(context_id)
            if len(seen) > MAX_CONTEXTS:
                raise ValueError("more than 128 presentation contexts")
            abstract, transfer = "", []
            for sub_type, sub_value in _items(value, 4):
                if sub_type == 0x30:
                    abstract = _uid(sub_value)
                elif sub_type == 0x40:
                    transfer.append(_uid(sub_value))
            request.contexts.append(PresentationContextRQ(context_id, abstract, tuple(transfer)))
        elif item_type == 0x50:
            _user_information(request, value)
    return request


def _user_information(request: AssociateRequest, value: bytes) -> None:
    for sub_type, sub_value in _items(value, 0):
        if sub_type == 0x51 and len(sub_value) == 4:
            (request.maximum_length_received,) = struct.unpack(">I", sub_value)
        elif sub_type == 0x53 and len(sub_value) == 4:
            request.async_window = struct.unpack(">HH", sub_value)
        elif sub_type == 0x54:
            if len(sub_value) < 2:
                raise ValueError("short role selection item")
            (uid_length,) = struct.unpack_from(">H", sub_value)
            if len(sub_value) != uid_length + 4:
                raise ValueError("bad role selection item length")
            uid = _uid(sub_value[2 : 2 + uid_length])
            request.roles[uid] = (sub_value[-2], sub_value[-1])
        elif sub_type == 0x58:
            if len(sub_value) < 2:
                raise ValueError("short user identity item")
            request.user_identity = (sub_value[0], bool(sub_value[1]))


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def accept_pdu(
    request: AssociateRequest,
    abstract_syntaxes: Container[str],
    transfer_syntaxes: Container[str],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version_name: str,
) -> tuple[bytes, dict[int, tuple[str, str]]]:
    """The A-ASSOCIATE-AC for ``request`` and the accepted contexts ``{id: (sop, ts)}``.

    A context is accepted with the first transfer syntax the requestor proposed that the
    node knows, so the sender never has to convert its files.

    Extended negotiation (PS3.7 D.3.3): a proposed asynchronous operations window is
    answered 1/1 (the node performs one operation at a time); each role selection item for
    an accepted SOP class is answered with the requestor's SCU role accepted as proposed
    and the SCP role refused (the node never sends on an association it accepted). A user
    identity item gets no answer: the node does not verify identities, and PS3.7 D.3.3.7
    lets the requestor decide whether to go on without a server response.
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
        parts.append(_item(0x21, body + _item(0x40, syntax.encode("ascii", "replace"))))
    user = (
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, implementation_class_uid.encode("ascii"))
        + _item(0x55, implementation_version_name.encode("ascii"))
    )
    if request.async_window is not None:
        user += _item(0x53, struct.pack(">HH", 1, 1))
    accepted_sops = {sop for sop, _ in accepted.values()}
    for uid, (scu_role, _scp_role) in request.roles.items():
        if uid in accepted_sops:
            raw_uid = uid.encode("ascii")
            roles = bytes([1 if scu_role else 0, 0])
            user += _item(0x54, struct.pack(">H", len(raw_uid)) + raw_uid + roles)
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
