"""Strings from outside cannot stop the audit copy or forge log lines (issue 13, items 1, 6).

The headline: a peer with no credentials opens an association as ``EVIL\\x01\\x02\\x1b[31m``;
it is rejected and audited as received, and afterwards the ATNA export (library, CLI and
API) and the syslog forwarder still carry every event, that one included.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import re
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from lxml import etree
from pydicom.dataset import Dataset

from tests.api_support import build_world, events
from tests.audit.test_audit_export import RFC5424
from tests.peers import wait_for
from tests.receiver_fixtures import Node
from triagenode.audit import AuditEventId, AuditLog, Outcome
from triagenode.audit.atna import AuditSource, schema
from triagenode.audit.encoding import escape_controls, xml_safe
from triagenode.audit.export import export_chunks
from triagenode.audit.syslog import AuditForwarder
from triagenode.cli import main
from triagenode.logs import MASK, build_handler
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

SECRET = b"hostile-test-secret-0123456789"
SOURCE = AuditSource("TRIAGENODE", "Test \x07Hospital", "node\x1b1")
EVIL_AE = "EVIL\x01\x02\x1b[31m"
# Every C0 control, DEL, lone surrogates (invalid UTF-8 read with surrogateescape, and a
# surrogate half), and the characters XML and syslog structured data treat specially.
HOSTILE = [chr(c) for c in range(0x20)] + ["\x7f", "\udcff", "\ud800", "\ufffe", '"]\\<&']
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


# A scripted peer ---------------------------------------------------------------------------


def _item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def associate_rq(calling_ae: bytes, called_ae: bytes = b"TRIAGENODE") -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) for Verification, with any bytes as calling AE."""
    context = (
        bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2")
    )
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.1")
    body = (
        struct.pack(">HH", 1, 0)
        + called_ae.ljust(16, b" ")
        + calling_ae.ljust(16, b" ")
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def associate(port: int, calling_ae: bytes) -> int:
    """Send the request; the type of the PDU the node answers with (3 = A-ASSOCIATE-RJ)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(associate_rq(calling_ae))
        return sock.recv(1)[0]


# A real syslog collector on loopback ----------------------------------------------------------


class TcpCollector:
    """Accepts RFC 6587 octet-counted messages and closes each connection after the
    sender's end, as rsyslog does; keeps what it got."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.messages: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            buffer = b""
            with conn:
                while chunk := conn.recv(65536):
                    buffer += chunk
                    while b" " in buffer:
                        length, rest = buffer.split(b" ", 1)
                        if len(rest) < int(length):
                            break
                        self.messages.append(rest[: int(length)])
                        buffer = rest[int(length) :]

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would leave the
        # port listening until that call returns.
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


@pytest.fixture
def collector() -> Iterator[TcpCollector]:
    server = TcpCollector()
    yield server
    server.close()


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """What the node's own log handler writes, while the test runs."""
    stream = io.StringIO()
    handler = build_handler(stream)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


def _assert_atna_export(data: bytes, count: int | None) -> etree._Element:
    document = etree.fromstring(data)
    validator = schema("triagenode-audit-export.rng")
    assert validator.validate(document), validator.error_log
    if count is not None:
        assert len(document.findall("AuditMessage")) == count
    return document


def _assert_syslog_export(data: bytes, count: int) -> None:
    lines = data.decode("utf-8").split("\n")
    assert lines[-1] == ""
    assert len(lines) - 1 == count
    for line in lines[:-1]:
        match = RFC5424.match(line)
        assert match, line[:200]
        assert schema().validate(etree.fromstring(match.group(8)))


# The headline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_rejected_evil_calling_ae_cannot_stop_export_or_forwarding(
    node_factory: object,
    collector: TcpCollector,
    captured_log: io.StringIO,
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    node: Node = node_factory(  # type: ignore[operator]
        scp={"allowed_calling_aets": ["MODALITY1"]},
        audit={"syslog": {"enabled": True, "port": collector.port, "ack_timeout_s": 5}},
    )
    assert associate(node.port, EVIL_AE.encode("ascii")) == 0x03  # A-ASSOCIATE-RJ
    assert associate(node.port, b"BAD\xffX\x00Y") == 0x03  # not ASCII, NUL inside

    def alerts() -> list[AuditEvent]:
        with node.db.session() as session:
            return list(
                session.query(AuditEvent).filter(AuditEvent.event_type == "association-rejected")
            )

    wait_for(lambda: len(alerts()) == 2, what="two audited rejections")
    # Stored as received; NUL is the one thing no database can hold, so it is escaped.
    assert sorted(row.actor for row in alerts()) == ["BAD\ufffdX\\x00Y", EVIL_AE]

    # The node's log: one line per record, the escape sequence visible and inert.
    lines = captured_log.getvalue().splitlines()
    rejected = [line for line in lines if "association rejected" in line]
    assert len(rejected) == 2
    assert any("calling_ae=EVIL\\x01\\x02\\x1b[31m " in line for line in rejected)
    assert all(LINE_START.match(line) for line in lines)
    assert "\x1b" not in captured_log.getvalue()

    # The forwarder sends both rows and keeps going with what comes after.
    forwarder = AuditForwarder.from_settings(node.settings, node.db, node.audit)
    assert forwarder.drain() == 2
    node.audit.record(AuditEventId.query, actor="auditor", details={"after": True})
    assert forwarder.drain() == 1
    assert forwarder.lag() == 0 and not forwarder.quarantine.exists()
    wait_for(lambda: len(collector.messages) >= 5, what="3 events and 2 checkpoints")
    audit_messages = [m for m in collector.messages if b"DICOM+RFC3881" in m]
    assert len(audit_messages) == 3
    users = []
    for message in audit_messages:
        match = RFC5424.match(message.decode("utf-8"))
        assert match is not None
        xml = etree.fromstring(match.group(8))
        assert schema().validate(xml)
        users.append(xml.find("ActiveParticipant").get("UserID"))
    assert xml_safe(EVIL_AE) == "EVIL\\x01\\x02\\x1b[31m"
    assert xml_safe(EVIL_AE) in users and "auditor" in users

    # The ATNA export, through the library and through the real CLI.
    data = b"".join(export_chunks(node.db, "atna-xml", SOURCE))
    _assert_atna_export(data, 3)
    config = tmp_path / "triagenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{node.data_dir}"\n[database]\nurl = "{node.settings.database_url}"\n'
        '[audit]\nsecret = "test-secret-0123456789abcdef"\n',
        encoding="utf-8",
    )
    capsysbinary.readouterr()
    assert main(["audit", "export", "--config", str(config), "--format", "atna-xml"]) == 0
    _assert_atna_export(capsysbinary.readouterr().out, 3)
    assert main(["audit", "export", "--config", str(config), "--format", "syslog"]) == 0
    _assert_syslog_export(capsysbinary.readouterr().out, 4)  # the first export's event too


# Every control character in every externally supplied field ------------------------------------


def test_every_control_character_in_every_field_exports(db: Database) -> None:
    log = AuditLog(db, SECRET)
    for char in HOSTILE:
        value = f"A{char}B"
        log.record(
            AuditEventId.security_alert,
            event_type=f"rejected{char}",
            outcome=Outcome.minor_failure,
            actor=value,
            actor_address=f"10.0.0.1{char}",
            study_uid=f"1.2.3{char}",
            details={"path": f"/api/v1/studies/1.2.3{char}", f"key{char}": value, "reason": value},
        )
    count = len(HOSTILE)
    with db.session() as session:
        stored = [r.actor for r in session.query(AuditEvent).order_by(AuditEvent.seq)]
    # Kept as received, except NUL and surrogates, which neither database can hold.
    assert stored[1] == "A\x01B" and stored[0] == "A\\x00B" and stored[0x21] == "A\\udcffB"
    assert log.verify().ok
    _assert_atna_export(b"".join(export_chunks(db, "atna-xml", SOURCE)), count)
    _assert_syslog_export(b"".join(export_chunks(db, "syslog", SOURCE)), count)
    jsonl = b"".join(export_chunks(db, "jsonl", SOURCE)).decode("ascii").splitlines()
    assert len(jsonl) == count
    document = etree.fromstring(b"".join(export_chunks(db, "atna-xml", SOURCE)))
    for message, char in zip(document.findall("AuditMessage"), HOSTILE, strict=True):
        user = message.find("ActiveParticipant").get("UserID")
        assert user.startswith("A") and user.endswith("B")
        if len(char) == 1 and (ord(char) < 0x20 or char == "\x7f"):
            assert user == f"A\\x{ord(char):02x}B"
        details = {
            d.get("type"): base64.b64decode(d.get("value")).decode("utf-8")
            for d in message.iter("ParticipantObjectDetail")
        }
        assert details["seq"]


def test_escaping_functions_are_total() -> None:
    for char in [*HOSTILE, "\u2028", "\x85", "\U0001f600", "é"]:
        value = f"x{char}y"
        safe = xml_safe(value)
        etree.fromstring(f'<a b="{_attr(safe)}">{_text(safe)}</a>'.encode())
        assert "\n" not in escape_controls(value) and "\r" not in escape_controls(value)
    assert xml_safe("é\U0001f600") == "é\U0001f600"  # printable text is left alone


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;")


def test_forwarder_quarantines_a_row_it_cannot_render_and_goes_on(
    db: Database, collector: TcpCollector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: even a row no escaping could save does not stop forwarding."""
    from triagenode.audit import syslog
    from triagenode.config.settings import SyslogSettings

    log = AuditLog(db, SECRET)
    for actor in ("one", "poison", "three"):
        log.record(AuditEventId.query, actor=actor)
    real = syslog.syslog_line

    def fragile(row, source):  # type: ignore[no-untyped-def]
        if row.actor == "poison" and isinstance(row, AuditEvent):  # not its defanged copy
            raise ValueError("cannot render")
        return real(row, source)

    monkeypatch.setattr(syslog, "syslog_line", fragile)
    settings = SyslogSettings(enabled=True, port=collector.port, protocol="tcp")
    forwarder = AuditForwarder(db, syslog.SyslogSender(settings), SOURCE, tmp_path, audit=log)
    assert forwarder.drain() == 3
    assert forwarder.drain() == 1  # the alert about the quarantine
    assert forwarder.lag() == 0
    assert '"seq": 2' in forwarder.quarantine.read_text()
    [alert] = [r for r in _rows(db) if r.event_type == "forwarding_quarantine"]
    assert alert.details["seq"] == 2 and alert.outcome == Outcome.serious_failure
    wait_for(lambda: len(collector.messages) >= 4, what="4 messages")
    assert any(b"poison" in m for m in collector.messages)  # sent in its defanged form


def _rows(db: Database) -> list[AuditEvent]:
    with db.session() as session:
        return list(session.query(AuditEvent).order_by(AuditEvent.seq))


# The admin API: a NUL in a path value, a newline to forge a log line -----------------------------


def test_api_path_values_cannot_break_export_or_forge_log_lines(
    make_settings, db: Database, captured_log: io.StringIO
) -> None:
    world = build_world(make_settings(), db)
    client = TestClient(world.app, raise_server_exceptions=False)
    headers = world.auth("auditor")
    forged = "2026-01-01 00:00:00,000 INFO triagenode: admin token created"
    # a NUL can name nothing in either database: a 400 on both, never a 500 from the driver
    assert client.get("/api/v1/studies/1.2.3%00", headers=headers).status_code == 400
    assert client.get("/api/v1/audit?study_uid=1.2%00", headers=headers).status_code == 400
    assert client.get(f"/api/v1/studies/1.2.3%0a{forged}", headers=headers).status_code == 404
    paths = [e.details.get("path") for e in events(world) if e.details]
    assert "/api/v1/studies/1.2.3\\x00" in paths  # NUL: escaped for the database
    assert f"/api/v1/studies/1.2.3\n{forged}" in paths  # a newline: kept as received
    for fmt in ("atna-xml", "syslog"):
        response = client.get("/api/v1/audit/export", params={"format": fmt}, headers=headers)
        assert response.status_code == 200
        if fmt == "atna-xml":
            _assert_atna_export(response.content, None)
        else:
            for line in response.content.decode("utf-8").splitlines():
                assert RFC5424.match(line), line[:200]
    output = captured_log.getvalue()
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in output.splitlines())
    assert "1.2.3\\x0a2026-01-01" in output


# pydicom's validation warnings quote element values -------------------------------------------


def test_pydicom_validation_warnings_are_masked(captured_log: io.StringIO) -> None:
    from triagenode.logs import configure_logging

    configure_logging("INFO")  # routes warnings into logging, where PhiGuard masks them
    try:
        ds = Dataset()
        ds.PatientBirthDate = "1970-01-31"  # not a DA: pydicom quotes the value back
        ds.PatientName = "DOE^JOHN"
    finally:
        logging.captureWarnings(False)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_triagenode", False)]:
            root.removeHandler(handler)
    output = captured_log.getvalue()
    assert "Invalid value for VR DA" in output
    assert "1970-01-31" not in output and MASK in output
    logging.getLogger("pydicom").warning("value 'SMITH^JANE' is odd", extra={"patient_id": "123"})
    assert "SMITH^JANE" not in captured_log.getvalue()
