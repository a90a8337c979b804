"""A scripted DICOM peer for the receiver's error branches: PDUs built byte by byte.

Real senders (DCMTK, pynetdicom) never send what these tests need to send, so the bytes are
written here from PS3.8 9.3 and PS3.7 E.1 directly.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable

__all__ = [
    "CT",
    "EXPLICIT",
    "IMPLICIT",
    "MR",
    "VERIFICATION",
    "Peer",
    "associate_rq",
    "command",
    "p_data",
    "pdv",
]

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)


def associate_rq(
    contexts: Iterable[tuple[int, str, list[str]]] = ((1, CT, [EXPLICIT]),),
    *,
    called: str = "TRIAGENODE",
    calling: str = "BADPEER",
    version: int = 1,
    application_context: str = APPLICATION_CONTEXT,
    max_pdu: int = 16384,
    user_items: bytes = b"",
) -> bytes:
    """An A-ASSOCIATE-RQ PDU; ``contexts`` as ``(id, abstract syntax, transfer syntaxes)``."""
    parts = [_item(0x10, application_context.encode())]
    for context_id, abstract, syntaxes in contexts:
        body = struct.pack(">BxBx", context_id, 0) + _item(0x30, abstract.encode())
        body += b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        parts.append(_item(0x20, body))
    parts.append(_item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + user_items))
    body = struct.pack(">H2x", version) + _ae(called) + _ae(calling) + bytes(32)
    body += b"".join(parts)
    return struct.pack(">BxI", 0x01, len(body)) + body


def role_selection(uid: str, scu: int, scp: int) -> bytes:
    raw = uid.encode()
    return _item(0x54, struct.pack(">H", len(raw)) + raw + bytes([scu, scp]))


def async_window(invoked: int, performed: int) -> bytes:
    return _item(0x53, struct.pack(">HH", invoked, performed))


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def command(
    field: int,
    *,
    message_id: int = 1,
    sop_class: str | None = CT,
    sop_instance: str | None = None,
    has_dataset: bool = True,
) -> bytes:
    """A request command set (Implicit VR Little Endian, ascending tags)."""
    parts = []
    if sop_class is not None:
        parts.append(_element(0x00000002, _uid(sop_class)))
    parts.append(_element(0x00000100, struct.pack("<H", field)))
    parts.append(_element(0x00000110, struct.pack("<H", message_id)))
    parts.append(_element(0x00000700, struct.pack("<H", 0)))
    parts.append(_element(0x00000800, struct.pack("<H", 0x0000 if has_dataset else 0x0101)))
    if sop_instance is not None:
        parts.append(_element(0x00001000, _uid(sop_instance)))
    body = b"".join(parts)
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def pdv(context_id: int, data: bytes, *, is_command: bool, last: bool) -> bytes:
    control = (0x01 if is_command else 0x00) | (0x02 if last else 0x00)
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BxI", 0x04, len(body)) + body


RELEASE_RQ = struct.pack(">BxII", 0x05, 4, 0)
ABORT = struct.pack(">BxIBBBB", 0x07, 4, 0, 0, 0, 0)


class Peer:
    """One TCP connection to the node, with PDU-level reads."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def pdu(self) -> tuple[int, bytes]:
        """The next PDU as ``(type, body)``."""
        pdu_type, length = struct.unpack(">BxI", self._exactly(6))
        return pdu_type, self._exactly(length)

    def associate(self, request: bytes | None = None) -> bytes:
        """Send an A-ASSOCIATE-RQ and return the A-ASSOCIATE-AC body (fails otherwise)."""
        self.send(request if request is not None else associate_rq())
        pdu_type, body = self.pdu()
        assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got type {pdu_type}: {body!r}"
        return body

    def response_status(self) -> int:
        """The Status of the next DIMSE response (a one-PDV command)."""
        pdu_type, body = self.pdu()
        assert pdu_type == 0x04, f"expected P-DATA-TF, got type {pdu_type}"
        data = body[6:]
        offset = 0
        while offset + 8 <= len(data):
            group, element, length = struct.unpack_from("<HHI", data, offset)
            if (group, element) == (0x0000, 0x0900):
                return int(struct.unpack_from("<H", data, offset + 8)[0])
            offset += 8 + length
        raise AssertionError("response without Status")

    def expect_abort(self) -> int:
        """The reason of an A-ABORT the node sends next."""
        pdu_type, body = self.pdu()
        assert pdu_type == 0x07, f"expected A-ABORT, got type {pdu_type}"
        return body[3]

    def expect_reject(self) -> tuple[int, int, int]:
        pdu_type, body = self.pdu()
        assert pdu_type == 0x03, f"expected A-ASSOCIATE-RJ, got type {pdu_type}"
        return body[1], body[2], body[3]

    def closed_within(self, seconds: float) -> float:
        """Seconds until the node closes the connection (fails after ``seconds``)."""
        start = time.monotonic()
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError as exc:
            raise AssertionError(f"connection still open after {seconds} s") from exc
        except OSError:
            pass
        return time.monotonic() - start

    def close(self) -> None:
        self.sock.close()
