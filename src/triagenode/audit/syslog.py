"""RFC 5424 syslog lines of audit messages, and forwarding them to a collector.

Each audit row becomes one syslog message whose MSG is the PS3.15 audit message XML, as IHE
ATNA's Record Audit Event transaction (ITI-20) sends it. Forwarding writes every message to a
spool file first and only removes it once the collector took it, so a collector that is down
loses nothing: :meth:`SyslogForwarder.flush` is retried until it succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
from collections.abc import Iterable
from datetime import timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select

from triagenode.audit.atna import AuditSource, audit_message, to_bytes
from triagenode.config.settings import Settings, SyslogSettings
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

__all__ = ["AuditForwarder", "SyslogForwarder", "SyslogSpool", "syslog_line"]

log = logging.getLogger(__name__)

# Facility 10 (security/authorization, "authpriv"), severity 5 (notice) for success,
# 4 (warning) for failures: PRI = facility * 8 + severity.
_FACILITY = 10
_APP_NAME = "triagenode"
# ITI-20 names the DICOM audit message schema in MSGID.
_MSGID = "DICOM+RFC3881"
_BOM = "\ufeff"


def syslog_line(row: Any, source: AuditSource) -> str:
    """One RFC 5424 message (no trailing newline) carrying the row's audit message XML."""
    severity = 5 if int(row.outcome) == 0 else 4
    at = row.at.astimezone(timezone.utc).isoformat(timespec="microseconds")
    xml = to_bytes(audit_message(row, source), declaration=False).decode("utf-8")
    header = (
        f"<{_FACILITY * 8 + severity}>1 {at.replace('+00:00', 'Z')} "
        f"{source.hostname or '-'} {_APP_NAME} {os.getpid()} {_MSGID} -"
    )
    return f"{header} {_BOM}{xml}"


class SyslogSpool:
    """Messages waiting for the collector: one JSON string per line, fsynced on append."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, messages: Iterable[str]) -> int:
        lines = [json.dumps(m, ensure_ascii=False) + "\n" for m in messages]
        if not lines:
            return 0
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        return len(lines)

    def pending(self) -> list[str]:
        with self._lock:
            if not self.path.exists():
                return []
            text = self.path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def drop_first(self, count: int) -> None:
        """Remove the ``count`` oldest messages (they reached the collector)."""
        with self._lock:
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            rest = lines[count:]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(rest), encoding="utf-8")
            os.replace(tmp, self.path)


class SyslogForwarder:
    """Sends spooled messages over UDP (RFC 5426), TCP (RFC 6587) or TLS (RFC 5425)."""

    def __init__(self, settings: SyslogSettings, spool: SyslogSpool, timeout: float = 5.0):
        self.settings = settings
        self.spool = spool
        self.timeout = timeout

    def submit(self, messages: Iterable[str]) -> int:
        return self.spool.append(messages)

    def _connect(self) -> socket.socket:
        address = (self.settings.host, self.settings.port)
        if self.settings.protocol == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(address)
            return sock
        sock = socket.create_connection(address, timeout=self.timeout)
        if self.settings.protocol == "tls":
            context = ssl.create_default_context(
                cafile=str(self.settings.tls_ca) if self.settings.tls_ca else None
            )
            sock = context.wrap_socket(sock, server_hostname=self.settings.host)
        return sock

    def flush(self) -> int:
        """Send every spooled message; returns how many the collector took.

        A message leaves the spool only after it was written to the socket, so a failure
        part-way keeps the rest for the next flush (a collector may then see a duplicate,
        never a gap).
        """
        pending = self.spool.pending()
        if not pending:
            return 0
        sent = 0
        try:
            with self._connect() as sock:
                for message in pending:
                    data = message.encode("utf-8")
                    if self.settings.protocol == "udp":
                        sock.send(data)
                    else:  # octet counting framing: "LEN SP MSG"
                        sock.sendall(str(len(data)).encode("ascii") + b" " + data)
                    sent += 1
                if isinstance(sock, ssl.SSLSocket):
                    sock.unwrap()  # close_notify, so the collector sees a clean end
        except OSError as exc:
            log.warning(
                "syslog collector %s:%d (%s) unreachable, %d message(s) spooled: %s",
                self.settings.host,
                self.settings.port,
                self.settings.protocol,
                len(pending) - sent,
                exc.strerror or exc.__class__.__name__,
            )
        if sent:
            self.spool.drop_first(sent)
        return sent


class AuditForwarder:
    """Copies new audit rows to the syslog collector, resuming after its last sent row.

    The position (``seq``) of the last spooled row is kept in ``<data_dir>/audit-syslog.seq``.
    """

    def __init__(
        self, db: Database, forwarder: SyslogForwarder, source: AuditSource, cursor: Path
    ) -> None:
        self.db = db
        self.forwarder = forwarder
        self.source = source
        self.cursor = Path(cursor)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings, db: Database) -> AuditForwarder:
        data_dir = Path(settings.node.data_dir)
        forwarder = SyslogForwarder(
            settings.audit.syslog, SyslogSpool(data_dir / "audit-syslog.spool")
        )
        return cls(
            db, forwarder, AuditSource.from_settings(settings), data_dir / "audit-syslog.seq"
        )

    def _last_seq(self) -> int:
        try:
            return int(self.cursor.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def pump(self, batch: int = 500) -> int:
        """Spool rows written since the last pump, then try to send the spool.

        Returns the number of messages the collector took.
        """
        last = self._last_seq()
        with self.db.session() as session:
            rows = session.scalars(
                select(AuditEvent)
                .where(AuditEvent.seq > last)
                .order_by(AuditEvent.seq)
                .limit(batch)
            ).all()
        if rows:
            self.forwarder.submit(syslog_line(row, self.source) for row in rows)
            tmp = self.cursor.with_suffix(".tmp")
            tmp.write_text(str(rows[-1].seq))
            os.replace(tmp, self.cursor)
        return self.forwarder.flush()

    def start(self, interval_s: float = 2.0, max_backoff_s: float = 60.0) -> threading.Thread:
        """Pump in a daemon thread until :meth:`stop`; backs off while the collector is down."""

        def loop() -> None:
            wait = interval_s
            while not self._stop.is_set():
                try:
                    self.pump()
                    backlog = len(self.forwarder.spool.pending())
                except Exception:  # keep forwarding alive; the rows stay in the database
                    log.exception("audit forwarding failed")
                    backlog = 1
                wait = min(wait * 2, max_backoff_s) if backlog else interval_s
                self._stop.wait(wait)

        self._thread = threading.Thread(target=loop, name="audit-syslog", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
