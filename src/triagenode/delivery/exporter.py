"""Send SRs from the outbox to the configured destinations (pynetdicom C-STORE SCU).

Each destination has its own sending *lane*: ``export.senders`` threads that claim only that
destination's due rows, so a PACS that does not answer delays only its own SRs (by up to
``export.timeout_s`` per attempt), never those of a healthy one. Within a lane, rows with a
higher priority (stat, critical) are claimed and sent first. One more thread fails the rows
of destinations that are no longer configured, so they end dead instead of waiting forever.

A lane pass claims its due rows, opens one association, sends each file as stored (no decode
and re-encode), and records every attempt: success marks the row sent; a refused or aborted
association, a timeout or a failure status puts it back with exponential backoff, until
``export.max_attempts`` makes it dead. The rows are the state: a restart releases the rows
it left in ``sending`` and carries on.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session

from triagenode.audit.events import AuditEventId, AuditLog, Outcome
from triagenode.config.settings import Destination, Settings
from triagenode.delivery.outbox import ExportOutbox, ExportRow, backoff_delay
from triagenode.domain import ExportState
from triagenode.errors import ConfigError
from triagenode.metrics import EXPORT_ATTEMPTS, EXPORT_FAILURES
from triagenode.store.models import utcnow

__all__ = [
    "ExportOutbox",
    "ExportRow",
    "Exporter",
    "backoff_delay",
    "client_context",
]

log = logging.getLogger(__name__)

# C-STORE statuses that mean "stored": success and the PS3.4 B.2.3 warnings (coercion,
# elements discarded, data set does not match the SOP class).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def client_context(destination: Destination) -> ssl.SSLContext:
    """TLS context for associations to ``destination`` (server verified, optional client cert).

    Raises
    ------
    ConfigError
        When the CA, certificate or key file cannot be loaded.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(destination.tls_ca) if destination.tls_ca else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if destination.tls_cert is not None:
            context.load_cert_chain(
                str(destination.tls_cert),
                str(destination.tls_key) if destination.tls_key else None,
            )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"destinations.{destination.name}: cannot load TLS files ({exc})"
        ) from None
    return context


# The lane of rows whose destination is no longer configured (never a valid name: it has
# characters ``destinations.name`` refuses).
_UNCONFIGURED = "(unconfigured)"


@dataclass
class _Lane:
    """The rows of one destination and the threads sending them.

    ``destination`` is None for the lane of rows whose destination is no longer configured.
    """

    name: str
    destination: Destination | None
    wake: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class _Prepared:
    row: ExportRow
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str | None


class Exporter:
    """Sends due outbox rows: :meth:`start` the lanes' threads, or :meth:`send_due` one pass.

    Parameters
    ----------
    outbox
        Where the rows are.
    settings
        ``scp.ae_title`` (our calling AE title), ``destinations`` and ``export``.
    audit
        Every attempt is an audit event (DICOM Instances Transferred, "sent").
    """

    def __init__(self, outbox: ExportOutbox, settings: Settings, audit: AuditLog) -> None:
        self.outbox = outbox
        self.settings = settings
        self.audit = audit
        self.batch_size = 32
        self.poll_interval_s = 0.5
        self._stop = threading.Event()
        self._lanes = [_Lane(d.name, d) for d in settings.destinations]
        self._lanes.append(_Lane(_UNCONFIGURED, None))
        self._threads: list[threading.Thread] = []

    # One pass -------------------------------------------------------------------------------

    def send_due(self, now: datetime | None = None) -> int:
        """One pass of every lane, one after another (for tests and tools; the running node
        uses :meth:`start`, where the lanes do not wait for each other).

        Returns
        -------
        int
            How many rows were attempted (sent or failed); 0 when nothing was due.
        """
        return sum(self._lane_pass(lane, now) for lane in self._lanes)

    def _lane_rows(self, lane: _Lane) -> dict[str, Any]:
        """The outbox's filter for ``lane``'s rows (see :meth:`ExportOutbox.claim`)."""
        if lane.destination is None:
            return {"not_in": [d.name for d in self.settings.destinations]}
        return {"destination": lane.name}

    def _lane_pass(self, lane: _Lane, now: datetime | None = None) -> int:
        """Claim the lane's due rows (highest priority first) and try each once."""
        rows = self.outbox.claim(now, limit=self.batch_size, **self._lane_rows(lane))
        if lane.destination is None:
            for row in rows:
                self._failed(row, None, f"destination {row.destination!r} is no longer configured")
        elif rows:
            self._send_group(lane.destination, rows)
        return len(rows)

    def _prepare(self, row: ExportRow) -> _Prepared | str:
        path = self.outbox.absolute_path(row)
        try:
            header = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["PatientID", "SOPClassUID"]
            )
        except FileNotFoundError:
            return f"SR file {path} is missing"
        except Exception as exc:  # unreadable file: a permanent problem of this row
            return f"SR file {path} is unreadable: {exc}"
        meta = header.file_meta
        return _Prepared(
            row=row,
            path=path,
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            transfer_syntax_uid=str(meta.TransferSyntaxUID),
            patient_id=header.get("PatientID") or None,
        )

    def _associate(
        self,
        destination: Destination,
        items: Sequence[_Prepared],
        timeout: float | None = None,
    ) -> tuple[Association | None, str | None]:
        """Open an association for ``items`` (or for C-ECHO when there are none)."""
        timeout = timeout or self.settings.export.timeout_s
        ae = AE(ae_title=self.settings.scp.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        contexts = {(p.sop_class_uid, p.transfer_syntax_uid) for p in items}
        if items:
            ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in sorted(contexts)]
        else:
            ae.requested_contexts = [build_context(Verification)]
        tls_args = None
        if destination.tls:
            tls_args = (client_context(destination), destination.host)
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=tls_args,
        )
        if assoc.is_established:
            return assoc, None
        if assoc.is_rejected:
            return None, f"association rejected by {_peer(destination)}{_reject_detail(assoc)}"
        answered = getattr(getattr(assoc, "acceptor", None), "primitive", None) is not None
        if assoc.is_aborted and answered:
            return None, f"association aborted by {_peer(destination)}"
        # pynetdicom reports a refused or timed-out connection as an abort without answer.
        return None, (
            f"cannot connect to {_peer(destination)} "
            "(connection refused, unreachable, or no answer in time)"
        )

    def _send_group(self, destination: Destination, rows: Sequence[ExportRow]) -> None:
        prepared: list[_Prepared] = []
        for row in rows:
            item = self._prepare(row)
            if isinstance(item, str):
                self._failed(row, destination, item)
            else:
                prepared.append(item)
        if not prepared:
            return
        try:
            assoc, error = self._associate(destination, prepared)
        except ConfigError as exc:
            assoc, error = None, str(exc)
        if assoc is None:
            for item in prepared:
                self._failed(item.row, destination, error or "association failed", item)
            return
        try:
            for item in prepared:
                if not assoc.is_established:
                    self._failed(item.row, destination, "association ended before sending", item)
                    continue
                try:
                    status = assoc.send_c_store(item.path)
                except Exception as exc:  # a pynetdicom error must not stop the other rows
                    self._failed(item.row, destination, f"C-STORE error: {exc}", item)
                    continue
                code = int(status.Status) if "Status" in status else None
                if code in _STORED:
                    self._sent(item, destination, code)
                elif code is None:
                    self._failed(
                        item.row, destination, "no C-STORE response (timeout or abort)", item
                    )
                else:
                    comment = status.get("ErrorComment", "")
                    self._failed(
                        item.row,
                        destination,
                        f"C-STORE failed with status 0x{code:04X} {comment}".strip(),
                        item,
                    )
        finally:
            if assoc.is_established:
                assoc.release()

    # Outcomes -------------------------------------------------------------------------------

    def _sent(self, item: _Prepared, destination: Destination, code: int) -> None:
        EXPORT_ATTEMPTS.labels(destination=destination.name).inc()
        # The sent state and its audit event in one transaction: one commit (one fsync) less
        # per SR, and a state that is never recorded without its event.
        with self.outbox.db.write_session() as session:
            row = self.outbox.mark_sent(item.row.id, session=session)
            self._audit(row, destination, Outcome.success, item, status=code, session=session)
        log.info(
            "export %d sent sop=%s to %s (status 0x%04X, attempt %d)",
            row.id,
            row.sop_instance_uid,
            destination.name,
            code,
            row.attempts,
        )

    def _failed(
        self,
        row: ExportRow,
        destination: Destination | None,
        error: str,
        item: _Prepared | None = None,
    ) -> None:
        EXPORT_ATTEMPTS.labels(destination=row.destination).inc()
        EXPORT_FAILURES.labels(destination=row.destination).inc()
        updated = self.outbox.mark_failed(row.id, error)
        dead = updated.state == ExportState.dead.value
        log.warning(
            "export %d to %s failed (attempt %d%s): %s",
            row.id,
            row.destination,
            updated.attempts,
            ", dead" if dead else f", next at {updated.next_attempt_at:%H:%M:%S}",
            error,
        )
        outcome = Outcome.serious_failure if dead else Outcome.minor_failure
        self._audit(updated, destination, outcome, item, error=error)

    def _audit(
        self,
        row: ExportRow,
        destination: Destination | None,
        outcome: Outcome,
        item: _Prepared | None,
        *,
        status: int | None = None,
        error: str | None = None,
        session: Session | None = None,
    ) -> None:
        details: dict[str, object] = {
            "export_id": row.id,
            "destination": row.destination,
            "sop_instance_uid": row.sop_instance_uid,
            "attempts": row.attempts,
            "state": row.state,
        }
        if status is not None:
            details["status"] = f"0x{status:04X}"
        if error is not None:
            details["error"] = error

        def record(in_session: Session | None) -> None:
            self.audit.record(
                AuditEventId.instances_transferred,
                event_type="sent",
                action="R",  # PS3.15 A.5.3.4: the sending side reads the instances
                outcome=outcome,
                actor=_peer(destination) if destination else row.destination,
                actor_address=destination.host if destination else None,
                study_uid=row.study_uid,
                patient_id=item.patient_id if item else None,
                details=details,
                session=in_session,
            )

        if session is not None:  # a failure rolls back the row's state too
            record(session)
            return
        try:
            record(None)
        except Exception:  # the row's state is committed; a lost audit row is logged loudly
            log.exception("export %d: audit event could not be recorded", row.id)

    # Threads ----------------------------------------------------------------------------------

    def wake(self) -> None:
        """Start the next pass of every lane now (e.g. right after an SR was enqueued)."""
        for lane in self._lanes:
            lane.wake.set()

    def echo(self, destination: Destination, timeout: float = 3.0) -> bool:
        """C-ECHO ``destination``: True when it answered with success."""
        try:
            assoc, _ = self._associate(destination, (), timeout)
        except ConfigError:
            return False
        if assoc is None:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and status.get("Status") == 0
        finally:
            if assoc.is_established:
                assoc.release()

    def run_forever(self, stop_event: threading.Event) -> None:
        """Run the lanes (:meth:`start`) until ``stop_event`` is set, then :meth:`stop`."""
        self.start()
        try:
            stop_event.wait()
        finally:
            self.stop()

    def _passes(self, lane: _Lane) -> None:
        while not self._stop.is_set():
            try:
                attempted = self._lane_pass(lane)
            except Exception:  # e.g. the database is away: keep the thread, try again later
                log.exception("export pass to %s failed", lane.name)
                attempted = 0
            if attempted:
                continue
            lane.wake.wait(self._idle_wait(lane))
            lane.wake.clear()

    def _idle_wait(self, lane: _Lane) -> float:
        try:
            next_due = self.outbox.next_due_at(**self._lane_rows(lane))
        except Exception:
            return self.poll_interval_s
        if next_due is None:
            return self.poll_interval_s
        return max(0.0, min(self.poll_interval_s, (next_due - utcnow()).total_seconds()))

    def start(self) -> None:
        """Release rows left in ``sending``, then start every lane's threads.

        Each destination gets ``export.senders`` threads of its own; the rows of destinations
        no longer configured get one. Claims are atomic, so no two threads send the same row;
        with more than one per lane, an SR queued while another thread of the lane is in the
        middle of a pass (a stat result behind a routine one) is sent at once instead of
        after that pass.
        """
        if self._threads:
            return
        self._stop.clear()
        self.outbox.requeue_sending()
        for lane in self._lanes:
            senders = 1 if lane.destination is None else self.settings.export.senders
            for index in range(senders):
                thread = threading.Thread(
                    target=self._passes,
                    args=(lane,),
                    name=f"triagenode-export-{lane.name}-{index}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the threads after their current passes."""
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()


def _peer(destination: Destination) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _reject_detail(assoc: Association) -> str:
    primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    parts = [
        getattr(primitive, attribute, None)
        for attribute in ("result_str", "source_str", "reason_str")
    ]
    parts = [p for p in parts if p]
    return f" ({', '.join(str(p) for p in parts)})" if parts else ""
