"""Audit forwarding loses nothing (issue 13, item 4): TCP by default, a batch leaves the
backlog only once the collector read it, restarts resume from the acknowledged row, and the
lag shows on ``/metrics`` and ``/readyz``."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from tests.api_support import build_world
from tests.audit.test_audit_export import RFC5424
from tests.audit.test_audit_hostile import TcpCollector
from tests.peers import wait_for
from triagenode.audit import AuditEventId, AuditLog
from triagenode.audit.atna import AuditSource
from triagenode.audit.syslog import AuditForwarder, SyslogSender
from triagenode.config.settings import SyslogSettings
from triagenode.store.db import Database

SECRET = b"forwarding-test-secret-0123456789"
SOURCE = AuditSource("TRIAGENODE", None, "node1")


def _seqs(messages: list[bytes]) -> list[int]:
    found = []
    for message in messages:
        match = RFC5424.match(message.decode("utf-8"))
        if match:
            found.append(
                int(match.group(8).split('ParticipantObjectID="audit-event-')[1].split('"')[0])
            )
    return found


def test_tcp_is_the_default_protocol(make_settings) -> None:
    assert make_settings().audit.syslog.protocol == "tcp"


def test_a_burst_and_a_collector_restart_lose_nothing(db: Database, tmp_path: Path) -> None:
    log = AuditLog(db, SECRET)
    collector = TcpCollector()
    port = collector.port
    settings = SyslogSettings(enabled=True, port=port, protocol="tcp", ack_timeout_s=5)
    forwarder = AuditForwarder(db, SyslogSender(settings), SOURCE, tmp_path)
    for number in range(300):
        log.record(AuditEventId.query, actor=f"burst{number}")
    assert forwarder.drain(batch=100) == 300
    collector.close()  # the collector goes away...
    for number in range(60):
        log.record(AuditEventId.query, actor=f"while-down{number}")
    assert forwarder.drain() == 0
    assert forwarder.lag() == 60
    # ...the node restarts (a new forwarder on the same folder) and the collector comes back.
    restarted = TcpCollector.__new__(TcpCollector)
    restarted.server = socket.create_server(("127.0.0.1", port))
    restarted.port, restarted.messages = port, []
    threading.Thread(target=restarted._serve, daemon=True).start()
    try:
        again = AuditForwarder(db, SyslogSender(settings), SOURCE, tmp_path)
        assert again.acked_seq() == 300
        assert again.drain() == 60
    finally:
        restarted.close()
    assert _seqs(collector.messages) == list(range(1, 301))
    assert _seqs(restarted.messages) == list(range(301, 361))


class ResettingCollector:
    """Accepts a connection and drops it with a reset, reading nothing: a collector that
    died with the batch unread."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()


def test_a_batch_the_collector_did_not_read_stays_in_the_backlog(
    db: Database, tmp_path: Path
) -> None:
    log = AuditLog(db, SECRET)
    for number in range(3):
        log.record(AuditEventId.query, actor=f"user{number}")
    resetting = ResettingCollector()
    try:
        settings = SyslogSettings(enabled=True, port=resetting.port, ack_timeout_s=2)
        forwarder = AuditForwarder(db, SyslogSender(settings), SOURCE, tmp_path)
        assert forwarder.pump() == 0
        assert forwarder.acked_seq() == 0 and forwarder.lag() == 3
    finally:
        resetting.server.shutdown(socket.SHUT_RDWR)
        resetting.server.close()


def test_legacy_spool_state_is_adopted(db: Database, tmp_path: Path) -> None:
    """The old forwarder's cursor counted rows *spooled*; the rows still in its spool were
    never sent, so they are sent again."""
    log = AuditLog(db, SECRET)
    for number in range(5):
        log.record(AuditEventId.query, actor=f"user{number}")
    (tmp_path / "audit-syslog.seq").write_text("5")
    (tmp_path / "audit-syslog.spool").write_text('"message 4"\n"message 5"\n')
    collector = TcpCollector()
    try:
        settings = SyslogSettings(enabled=True, port=collector.port)
        forwarder = AuditForwarder(db, SyslogSender(settings), SOURCE, tmp_path)
        assert forwarder.acked_seq() == 3
        assert forwarder.drain() == 2
        wait_for(lambda: len(collector.messages) == 2, what="2 messages")
    finally:
        collector.close()
    assert _seqs(collector.messages) == [4, 5]
    assert not (tmp_path / "audit-syslog.spool").exists()


def test_lag_on_metrics_and_readyz(make_settings, db: Database) -> None:
    collector = TcpCollector()
    collector.close()  # nobody listens: everything stays behind
    settings = make_settings(audit={"syslog": {"enabled": True, "port": collector.port}})
    world = build_world(settings, db)
    forwarder = AuditForwarder.from_settings(settings, db)
    assert forwarder.pump() == 0
    behind = forwarder.lag()
    assert behind > 0
    client = TestClient(world.app)
    metrics = client.get("/metrics").text
    assert f"triagenode_audit_forwarding_lag_events {float(behind)}" in metrics
    assert "triagenode_audit_forwarded_seq 0.0" in metrics
    ready = client.get("/readyz").json()
    forwarding = ready["checks"]["audit_forwarding"]
    assert forwarding["lag_events"] == behind and forwarding["acked_seq"] == 0
    assert ready["ready"]  # a collector that is down delays the copy, not the node
