"""RFC 5424 syslog lines of audit messages, and forwarding them to a collector.

Each audit row becomes one syslog message whose MSG is the PS3.15 audit message XML, as IHE
ATNA's Record Audit Event transaction (ITI-20) sends it. After each batch a signed checkpoint
of the chain head follows (MSGID ``CHECKPOINT``, structured data only), so the collector's
copy also proves how long the chain was.

The database is the backlog: :class:`AuditForwarder` keeps the ``seq`` of the last row the
collector *acknowledged* in ``<data_dir>/audit-syslog.acked`` and sends every row after it, so
nothing is lost while the collector is down or the node restarts. Over TCP (RFC 6587 octet
counting, the default) and TLS (RFC 5425) a batch counts as acknowledged once the collector
has read it to the end and closed its side (TLS: answered ``close_notify``); a failure before
that sends the batch again, so a collector may see a duplicate but never a gap. UDP
(RFC 5426) has no acknowledgement and can lose messages.

A row that cannot be rendered is quarantined (``audit-syslog.quarantine``), raised as a
security alert, sent in a defanged form, and forwarding goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from triagenode.audit.atna import AuditSource, audit_message, defanged, to_bytes
from triagenode.audit.checkpoint import Checkpoint, CheckpointSigner, checkpoint_paths
from triagenode.audit.encoding import printusascii, sd_param_value
from triagenode.config.settings import Settings, SyslogSettings
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

if TYPE_CHECKING:
    from triagenode.audit.events import AuditLog

__all__ = [
    "AuditForwarder",
    "AuditForwardingCollector",
    "SyslogSender",
    "checkpoint_line",
    "forwarding_status",
    "read_syslog_checkpoints",
    "syslog_line",
]

log = logging.getLogger(__name__)

# Facility 10 (security/authorization, "authpriv"), severity 5 (notice) for success,
# 4 (warning) for failures: PRI = facility * 8 + severity.
_FACILITY = 10
_APP_NAME = "triagenode"
# ITI-20 names the DICOM audit message schema in MSGID.
_MSGID = "DICOM+RFC3881"
_CHECKPOINT_MSGID = "CHECKPOINT"
# SD-ID with the documentation Private Enterprise Number of RFC 5612.
_CHECKPOINT_SD_ID = "checkpoint@32473"
_BOM = "\ufeff"
ACKED_FILE = "audit-syslog.acked"
QUARANTINE_FILE = "audit-syslog.quarantine"
_LEGACY_CURSOR = "audit-syslog.seq"
_LEGACY_SPOOL = "audit-syslog.spool"


def _header(severity: int, at: datetime, hostname: str | None, msgid: str) -> str:
    stamp = at.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return (
        f"<{_FACILITY * 8 + severity}>1 {stamp.replace('+00:00', 'Z')} "
        f"{printusascii(hostname, 255)} {_APP_NAME} {os.getpid()} {msgid}"
    )


def syslog_line(row: Any, source: AuditSource) -> str:
    """One RFC 5424 message (no trailing newline) carrying the row's audit message XML."""
    severity = 5 if int(row.outcome) == 0 else 4
    xml = to_bytes(audit_message(row, source), declaration=False).decode("utf-8")
    return f"{_header(severity, row.at, source.hostname, _MSGID)} - {_BOM}{xml}"


def checkpoint_line(checkpoint: Checkpoint, source: AuditSource) -> str:
    """A checkpoint as an RFC 5424 message: all in one structured-data element, no MSG."""
    params = " ".join(
        f'{name}="{sd_param_value(value)}"'
        for name, value in (
            ("seq", checkpoint.seq),
            ("hash", checkpoint.row_hash),
            ("at", checkpoint.at),
            ("sig", checkpoint.signature),
        )
    )
    at = datetime.now(timezone.utc)
    return f"{_header(5, at, source.hostname, _CHECKPOINT_MSGID)} [{_CHECKPOINT_SD_ID} {params}]"


_SD_PARAM = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def read_syslog_checkpoints(path: Path) -> Iterator[Checkpoint | str]:
    """The checkpoints in a collector's file of received messages (other lines skipped)."""
    marker = f"[{_CHECKPOINT_SD_ID} "
    with Path(path).open("r", encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            start = line.find(marker)
            if start < 0:
                continue
            params = {
                k: re.sub(r"\\(.)", r"\1", v)
                for k, v in _SD_PARAM.findall(line[start + len(marker) :])
            }
            try:
                yield Checkpoint.from_mapping(params)  # type: ignore[arg-type]
            except (KeyError, ValueError):
                yield f"line {number} of {path} holds a damaged checkpoint"


class SyslogSender:
    """Sends a batch of messages over UDP (RFC 5426), TCP (RFC 6587) or TLS (RFC 5425) and
    returns only once the collector acknowledged it (see the module docstring).

    Raises
    ------
    OSError
        When the collector cannot be reached or did not acknowledge the whole batch.
    """

    def __init__(self, settings: SyslogSettings, timeout: float | None = None) -> None:
        self.settings = settings
        self.timeout = settings.ack_timeout_s if timeout is None else timeout

    def _connect(self) -> socket.socket:
        address = (self.settings.host, self.settings.port)
        if self.settings.protocol == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(address)
            return sock
        sock = socket.create_connection(address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.settings.protocol == "tls":
            context = ssl.create_default_context(
                cafile=str(self.settings.tls_ca) if self.settings.tls_ca else None
            )
            sock = context.wrap_socket(sock, server_hostname=self.settings.host)
        return sock

    def send(self, messages: list[str]) -> None:
        if not messages:
            return
        with self._connect() as sock:
            if self.settings.protocol == "udp":
                for message in messages:
                    sock.send(message.encode("utf-8"))
                return
            frames = []
            for message in messages:  # octet counting framing: "LEN SP MSG"
                data = message.encode("utf-8")
                frames.append(str(len(data)).encode("ascii") + b" " + data)
            sock.sendall(b"".join(frames))
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock = sock.unwrap()  # close_notify answered: the collector read it all
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    return  # the collector closed after reading our close_notify
            sock.shutdown(socket.SHUT_WR)
            # The collector closes its side once it has read everything; a reset (it died
            # with data unread) or a timeout raises OSError and the batch is sent again.
            while sock.recv(4096):
                pass


class AuditForwarder:
    """Copies audit rows to the syslog collector, resuming after the last acknowledged row.

    Parameters
    ----------
    db
        The node's database: the backlog.
    sender
        How to reach the collector.
    source
        How the node names itself.
    state_dir
        Where ``audit-syslog.acked`` and ``audit-syslog.quarantine`` live.
    signer
        Signs the checkpoint sent after each batch; None for none.
    audit
        Records a security alert for each quarantined row; None for none.
    """

    def __init__(
        self,
        db: Database,
        sender: SyslogSender,
        source: AuditSource,
        state_dir: Path,
        signer: CheckpointSigner | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.db = db
        self.sender = sender
        self.source = source
        self.state_dir = Path(state_dir)
        self.signer = signer
        self.audit = audit
        self.cursor = self.state_dir / ACKED_FILE
        self.quarantine = self.state_dir / QUARANTINE_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, db: Database, audit: AuditLog | None = None
    ) -> AuditForwarder:
        _file, key, _public = checkpoint_paths(settings)
        return cls(
            db,
            SyslogSender(settings.audit.syslog),
            AuditSource.from_settings(settings),
            Path(settings.node.data_dir),
            CheckpointSigner.load_or_create(key),
            audit,
        )

    # The acknowledged position --------------------------------------------------------

    def acked_seq(self) -> int:
        """The ``seq`` of the last row the collector acknowledged (0 for none)."""
        try:
            return int(self.cursor.read_text().strip() or 0)
        except FileNotFoundError:
            return self._adopt_legacy_state()

    def _save_acked(self, seq: int) -> None:
        tmp = self.cursor.with_suffix(".tmp")
        with tmp.open("w") as handle:
            handle.write(str(seq))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.cursor)

    def _adopt_legacy_state(self) -> int:
        """Earlier versions kept ``audit-syslog.seq`` (last row *spooled*) and a spool of
        unsent messages: the acknowledged position is the spooled one less what
        was still waiting."""
        legacy = self.state_dir / _LEGACY_CURSOR
        if not legacy.exists():
            return 0
        spool = self.state_dir / _LEGACY_SPOOL
        waiting = 0
        if spool.exists():
            waiting = sum(1 for line in spool.read_text("utf-8").splitlines() if line.strip())
        acked = max(int(legacy.read_text().strip() or 0) - waiting, 0)
        self._save_acked(acked)
        legacy.unlink()
        spool.unlink(missing_ok=True)
        return acked

    # Forwarding ------------------------------------------------------------------------

    def _render(self, row: Any) -> str | None:
        try:
            return syslog_line(row, self.source)
        except Exception as exc:  # one row must never stop forwarding
            return self._quarantine(row, exc)

    def _quarantine(self, row: Any, exc: Exception) -> str | None:
        log.error(
            "audit row %s cannot be written as syslog (%s); quarantined, forwarding goes on",
            row.seq,
            type(exc).__name__,
        )
        entry = {"seq": row.seq, "error": type(exc).__name__, "at": datetime.now(timezone.utc)}
        fd = os.open(self.quarantine, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(entry, default=str) + "\n").encode("utf-8"))
        finally:
            os.close(fd)
        if self.audit is not None:
            from triagenode.audit.events import AuditEventId, Outcome

            try:
                self.audit.record(
                    AuditEventId.security_alert,
                    event_type="forwarding_quarantine",
                    outcome=Outcome.serious_failure,
                    actor=self.source.source_id,
                    details={"seq": row.seq, "error": type(exc).__name__},
                )
            except Exception:
                log.exception("could not record the quarantine of audit row %s", row.seq)
        try:
            return syslog_line(defanged(row), self.source)
        except Exception:
            return None

    def pump(self, batch: int = 500) -> int:
        """Send the rows after the acknowledged one, at most ``batch``, with a checkpoint.

        Returns how many rows the collector acknowledged (0 when it could not be reached:
        they are sent again next time).
        """
        acked = self.acked_seq()
        with self.db.session() as session:
            rows = session.scalars(
                select(AuditEvent)
                .where(AuditEvent.seq > acked)
                .order_by(AuditEvent.seq)
                .limit(batch)
            ).all()
        if not rows:
            return 0
        messages = [m for m in map(self._render, rows) if m is not None]
        last = rows[-1]
        if self.signer is not None and last.seq and last.row_hash:
            messages.append(checkpoint_line(self.signer.sign(last.seq, last.row_hash), self.source))
        try:
            self.sender.send(messages)
        except OSError as exc:
            settings = self.sender.settings
            log.warning(
                "syslog collector %s:%d (%s) did not take %d audit event(s), kept for later: %s",
                settings.host,
                settings.port,
                settings.protocol,
                len(rows),
                exc.strerror or exc.__class__.__name__,
            )
            return 0
        self._save_acked(int(last.seq or acked))
        return len(rows)

    def drain(self, batch: int = 500) -> int:
        """Pump until the backlog is empty or the collector stops acknowledging."""
        total = 0
        while (sent := self.pump(batch)) == batch:
            total += sent
        return total + sent

    def start(self, interval_s: float = 2.0, max_backoff_s: float = 60.0) -> threading.Thread:
        """Pump in a daemon thread until :meth:`stop`; backs off while the collector is down."""

        def loop() -> None:
            wait = interval_s
            while not self._stop.is_set():
                try:
                    self.drain()
                    behind = self.lag() > 0
                except Exception:  # keep forwarding alive; the rows stay in the database
                    log.exception("audit forwarding failed")
                    behind = True
                wait = min(wait * 2, max_backoff_s) if behind else interval_s
                self._stop.wait(wait)

        self._thread = threading.Thread(target=loop, name="audit-syslog", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def lag(self) -> int:
        """Rows written but not yet acknowledged by the collector."""
        with self.db.session() as session:
            head = session.scalar(select(func.max(AuditEvent.seq))) or 0
        return max(int(head) - self.acked_seq(), 0)


def forwarding_status(settings: Settings, db: Database) -> dict[str, Any]:
    """How far behind the syslog copy is, from the files the forwarder keeps (so any
    process on the data folder can report it): ``enabled``, ``acked_seq``, ``head_seq``,
    ``lag_events``, ``quarantined``."""
    if not settings.audit.syslog.enabled:
        return {"enabled": False}
    data_dir = Path(settings.node.data_dir)
    try:
        acked = int((data_dir / ACKED_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        acked = 0
    with db.session() as session:
        head = int(session.scalar(select(func.max(AuditEvent.seq))) or 0)
    quarantine = data_dir / QUARANTINE_FILE
    quarantined = len(quarantine.read_bytes().splitlines()) if quarantine.exists() else 0
    return {
        "enabled": True,
        "acked_seq": acked,
        "head_seq": head,
        "lag_events": max(head - acked, 0),
        "quarantined": quarantined,
    }


class AuditForwardingCollector(Collector):
    """Prometheus gauges of :func:`forwarding_status`, read at scrape time."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            status = forwarding_status(self.settings, self.db)
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: audit forwarding state unavailable: %s", type(exc).__name__)
            return
        if not status["enabled"]:
            return
        yield GaugeMetricFamily(
            "triagenode_audit_forwarding_lag_events",
            "Audit events not yet acknowledged by the syslog collector",
            value=status["lag_events"],
        )
        yield GaugeMetricFamily(
            "triagenode_audit_forwarded_seq",
            "Chain position of the last audit event the syslog collector acknowledged",
            value=status["acked_seq"],
        )
        yield GaugeMetricFamily(
            "triagenode_audit_forwarding_quarantined",
            "Audit events that could not be rendered as written and were sent defanged",
            value=status["quarantined"],
        )
