"""Audit exports: ATNA XML valid against the PS3.15 schema, RFC 5424 lines, forwarding."""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from lxml import etree

from tests.factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME
from tests.peers import free_port, wait_for
from triagenode.audit import AuditEventId, AuditLog, Outcome
from triagenode.audit.atna import AuditSource, schema
from triagenode.audit.export import export_chunks
from triagenode.audit.syslog import AuditForwarder, SyslogSender
from triagenode.config.settings import SyslogSettings
from triagenode.store.db import Database

SECRET = b"export-test-secret-0123456789"
SOURCE = AuditSource("TRIAGENODE", "Test Hospital", "node1.example")
# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
RFC5424 = re.compile(
    r"^<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) (\S+) (\S+) (\S+) (-|\[.*\]) "
    "\ufeff(<AuditMessage>.*</AuditMessage>)$"
)


def _fill(log: AuditLog) -> None:
    log.record(AuditEventId.application_activity, event_type="start", actor="TRIAGENODE")
    log.record(
        AuditEventId.instances_transferred,
        event_type="received",
        action="C",
        actor="CT_SCANNER",
        actor_address="10.0.0.7",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        patient_id=PATIENT_ID,
        details={"instances": 3, "bytes": 12345},
    )
    log.record(
        AuditEventId.security_alert,
        event_type="bad_token",
        outcome=Outcome.minor_failure,
        actor="anonymous",
        actor_address="127.0.0.1",
        details={"reason": "unknown bearer token\nfrom a scanner"},
    )
    log.record(
        AuditEventId.export,
        event_type="sent",
        action="R",
        actor="PACS",
        actor_address="pacs.example:104",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        patient_ref=log.patient_ref(PATIENT_ID),
    )


def _export(db: Database, fmt: str) -> bytes:
    return b"".join(export_chunks(db, fmt, SOURCE))  # type: ignore[arg-type]


def test_atna_xml_export_validates_against_the_schema(db: Database) -> None:
    log = AuditLog(db, SECRET)
    _fill(log)
    data = _export(db, "atna-xml")
    document = etree.fromstring(data)
    validator = schema("triagenode-audit-export.rng")
    assert validator.validate(document), validator.error_log
    messages = document.findall("AuditMessage")
    assert len(messages) == 4
    single = schema()
    for message in messages:
        assert single.validate(message), single.error_log
    received = messages[1]
    assert received.find("EventIdentification/EventID").get("csd-code") == "110104"
    objects = {
        o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
        for o in received.findall("ParticipantObjectIdentification")
    }
    assert objects["110180"] == "1.2.826.0.1.3680043.8.498.1"
    assert objects["PSEUDONYM"] == log.patient_ref(PATIENT_ID)
    details = {
        d.get("type"): base64.b64decode(d.get("value")).decode()
        for d in received.iter("ParticipantObjectDetail")
    }
    assert details["seq"] == "2" and details["instances"] == "3"
    failure = messages[2].find("EventIdentification")
    assert failure.get("EventOutcomeIndicator") == "4"
    assert failure.findtext("EventOutcomeDescription") == "unknown bearer token from a scanner"
    for phi in (PATIENT_ID, PATIENT_NAME, BIRTH_DATE):
        assert phi.encode() not in data


def test_schema_rejects_a_broken_message(db: Database) -> None:
    _fill(AuditLog(db, SECRET))
    document = etree.fromstring(_export(db, "atna-xml"))
    message = document.find("AuditMessage")
    message.find("EventIdentification").set("EventOutcomeIndicator", "3")
    assert not schema().validate(message)
    message.find("EventIdentification").set("EventOutcomeIndicator", "0")
    message.remove(message.find("AuditSourceIdentification"))
    assert not schema().validate(message)


def test_syslog_and_jsonl_exports(db: Database) -> None:
    _fill(AuditLog(db, SECRET))
    lines = _export(db, "syslog").decode("utf-8").splitlines()
    assert len(lines) == 4
    for line in lines:
        match = RFC5424.match(line)
        assert match, line[:120]
        pri = int(match.group(1))
        assert pri // 8 == 10 and pri % 8 in (4, 5)
        assert (match.group(3), match.group(4), match.group(6)) == (
            "node1.example",
            "triagenode",
            "DICOM+RFC3881",
        )
        assert schema().validate(etree.fromstring(match.group(8)))
    assert int(RFC5424.match(lines[2]).group(1)) == 84  # the failure is a warning
    records = [json.loads(line) for line in _export(db, "jsonl").splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[1]["details"] == {"bytes": 12345, "instances": 3}


def _collector(protocol: str, port: int, received: list[bytes], context=None) -> socket.socket:
    """A minimal syslog collector on localhost that keeps every message it gets."""
    if protocol == "udp":
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", port))

        def serve_udp() -> None:
            while True:
                try:
                    received.append(server.recv(65535))
                except OSError:
                    return

        threading.Thread(target=serve_udp, daemon=True).start()
        return server
    server = socket.create_server(("127.0.0.1", port))

    def serve_tcp() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            buffer = b""
            try:
                if context is not None:
                    conn = context.wrap_socket(conn, server_side=True)
                with conn:
                    while chunk := conn.recv(65536):
                        buffer += chunk
                        while b" " in buffer:  # octet counting: "LEN SP MSG"
                            length, rest = buffer.split(b" ", 1)
                            if len(rest) < int(length):
                                break
                            received.append(rest[: int(length)])
                            buffer = rest[int(length) :]
            except OSError:  # one bad connection must not stop the collector
                continue

    threading.Thread(target=serve_tcp, daemon=True).start()
    return server


def _tls_material(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "collector.pem", folder / "collector.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("protocol", ["udp", "tcp", "tls"])
def test_forwarding_keeps_events_while_the_collector_is_down(
    db: Database, tmp_path: Path, protocol: str
) -> None:
    log = AuditLog(db, SECRET)
    _fill(log)
    port = free_port()
    context = None
    settings = SyslogSettings(enabled=True, host="127.0.0.1", port=port, protocol=protocol)
    if protocol == "tls":
        cert, key = _tls_material(tmp_path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        settings = SyslogSettings(
            enabled=True, host="127.0.0.1", port=port, protocol="tls", tls_ca=cert
        )
    forwarder = AuditForwarder(db, SyslogSender(settings, timeout=2), SOURCE, tmp_path)
    received: list[bytes] = []
    if protocol != "udp":  # a UDP sender cannot tell that nobody listens
        assert forwarder.pump() == 0
        assert forwarder.acked_seq() == 0 and forwarder.lag() == 4
    server = _collector(protocol, port, received, context)
    try:
        assert forwarder.pump() == 4
        assert forwarder.acked_seq() == 4 and forwarder.lag() == 0
        log.record(AuditEventId.query, actor="auditor", actor_address="127.0.0.1")
        assert forwarder.pump() == 1
        wait_for(lambda: len(received) == 5, timeout=10, what="5 syslog messages")
    finally:
        server.close()
    seqs = []
    for message in received:
        match = RFC5424.match(message.decode("utf-8"))
        assert match
        xml = etree.fromstring(match.group(8))
        seqs.append(
            next(
                base64.b64decode(d.get("value")).decode()
                for d in xml.iter("ParticipantObjectDetail")
                if d.get("type") == "seq"
            )
        )
    assert seqs == ["1", "2", "3", "4", "5"]
