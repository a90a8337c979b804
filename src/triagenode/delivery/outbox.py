"""The export outbox: one durable row per (SR, destination), with retries and dead letters.

A row moves ``pending -> sending -> sent``; a failed attempt puts it back to ``pending``
with a later ``next_attempt_at`` (exponential backoff), and after
``export.max_attempts`` failures it becomes ``dead`` until an operator requeues it.

While a row is ``sending``, ``next_attempt_at`` holds the end of its lease: a row left in
``sending`` by a crash becomes due again when the lease runs out (and
:meth:`ExportOutbox.requeue_sending` releases them all at once when the node starts). A
crash between the PACS's success and our commit therefore re-sends the same SR, with the
same SOP Instance UID, which a PACS stores as the same instance: never a second SR. (With
several nodes on one PostgreSQL database, the start-up release can likewise re-send a row
another node has in flight; again the same UID, never a second SR.)

Each destination is its own queue (a *lane*): :meth:`ExportOutbox.claim` and
:meth:`ExportOutbox.next_due_at` take the destination to serve, so a destination that does not
answer holds up only its own rows.
"""

from __future__ import annotations

import builtins
import logging
import random
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from triagenode.audit.events import AuditLog
from triagenode.config.settings import Settings
from triagenode.domain import ExportState
from triagenode.store.db import Database
from triagenode.store.models import Export, utcnow

__all__ = ["ExportOutbox", "ExportRow", "backoff_delay"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportRow:
    """A snapshot of one outbox row."""

    id: int
    result_id: int | None
    study_uid: str
    destination: str
    sop_instance_uid: str
    file_path: str
    priority: int
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None

    @classmethod
    def of(cls, row: Export) -> ExportRow:
        return cls(
            id=row.id,
            result_id=row.result_id,
            study_uid=row.study_uid,
            destination=row.destination,
            sop_instance_uid=row.sop_instance_uid,
            file_path=row.file_path,
            priority=row.priority,
            state=row.state,
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at,
            last_error=row.last_error,
            created_at=row.created_at,
            sent_at=row.sent_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def backoff_delay(attempts: int, initial_s: float, max_s: float, *, jitter: float = 0.1) -> float:
    """Seconds to wait after the ``attempts``-th failure: ``initial * 2**(attempts-1)``,
    capped at ``max_s``, plus up to ``jitter`` of itself so many rows do not retry in step.
    """
    base = min(initial_s * 2.0 ** max(attempts - 1, 0), max_s)
    return base + random.uniform(0, jitter * base)


class ExportOutbox:
    """The ``exports`` table as a queue of SRs to send.

    Parameters
    ----------
    db
        The node's database.
    audit
        The audit log; kept beside the rows so callers that requeue can audit it.
    settings
        ``destinations`` (one row per destination) and ``export`` (attempts, backoff).
    """

    def __init__(self, db: Database, audit: AuditLog, settings: Settings) -> None:
        self.db = db
        self.audit = audit
        self.settings = settings

    @property
    def lease_s(self) -> float:
        """How long a claimed row may stay ``sending`` before it is due again (at least)."""
        return 4 * self.settings.export.timeout_s + 30.0

    def _lease_for(self, rows: int) -> float:
        # A pass sends its rows one after another, each bounded by the export timeout: the
        # lease must outlast the whole pass or another exporter could take a row mid-pass.
        return self.lease_s + rows * self.settings.export.timeout_s

    def _relative(self, file_path: Path | str) -> str:
        path = Path(file_path)
        data_dir = Path(self.settings.node.data_dir).absolute()
        if path.is_absolute():
            try:
                return str(path.relative_to(data_dir))
            except ValueError:
                return str(path)
        return str(path)

    def absolute_path(self, row: ExportRow) -> Path:
        """The SR file of ``row`` (stored relative to ``node.data_dir`` when inside it)."""
        path = Path(row.file_path)
        return path if path.is_absolute() else Path(self.settings.node.data_dir) / path

    # Enqueue --------------------------------------------------------------------------------

    def enqueue(
        self,
        result_id: int | None,
        study_uid: str,
        sop_instance_uid: str,
        file_path: Path | str,
        priority: int,
        session: Session | None = None,
        *,
        kind: str = "sr",
    ) -> list[int]:
        """One row per configured destination that takes ``kind`` for the object
        ``sop_instance_uid`` (the SR, or a summary SC, PDF or KOS).

        Idempotent: a (destination, SOP Instance UID) that already has a row keeps it (its
        id is returned), so enqueuing the same object twice never sends it twice. With
        ``session`` the rows join the caller's transaction (e.g. the one storing the result).

        Parameters
        ----------
        kind
            What the object is, as ``destinations[].send`` names it (``sr``,
            ``summary-sc``, ``summary-pdf``, ``kos``): only destinations whose ``send``
            lists it get a row.

        Returns
        -------
        list[int]
            Row ids in the order of ``settings.destinations``; empty when none takes it.
        """
        if session is not None:
            return self._enqueue(
                session, result_id, study_uid, sop_instance_uid, file_path, priority, kind
            )
        with self.db.write_session() as own:
            return self._enqueue(
                own, result_id, study_uid, sop_instance_uid, file_path, priority, kind
            )

    def wanted(self, kind: str) -> bool:
        """Whether any configured destination takes objects of ``kind``."""
        return any(kind in d.send for d in self.settings.destinations)

    def _enqueue(
        self,
        session: Session,
        result_id: int | None,
        study_uid: str,
        sop_instance_uid: str,
        file_path: Path | str,
        priority: int,
        kind: str = "sr",
    ) -> list[int]:
        ids: list[int] = []
        stored_path = self._relative(file_path)
        for destination in self.settings.destinations:
            if kind not in destination.send:
                continue
            existing = session.scalar(
                select(Export.id).where(
                    Export.destination == destination.name,
                    Export.sop_instance_uid == sop_instance_uid,
                )
            )
            if existing is not None:
                ids.append(existing)
                continue
            row = Export(
                result_id=result_id,
                study_uid=study_uid,
                destination=destination.name,
                sop_instance_uid=sop_instance_uid,
                file_path=stored_path,
                priority=int(priority),
                state=ExportState.pending.value,
                attempts=0,
                next_attempt_at=utcnow(),
                created_at=utcnow(),
            )
            try:
                # A savepoint: a concurrent enqueue of the same SR loses only this insert.
                with session.begin_nested():
                    session.add(row)
                ids.append(row.id)
            except IntegrityError:
                winner = session.scalar(
                    select(Export.id).where(
                        Export.destination == destination.name,
                        Export.sop_instance_uid == sop_instance_uid,
                    )
                )
                if winner is None:  # the conflict was something else: let it surface
                    raise
                ids.append(winner)
        if not self.settings.destinations:
            log.warning("no destinations configured: SR %s is not exported", sop_instance_uid)
        elif not ids:
            log.info("no destination takes %s: %s is not exported", kind, sop_instance_uid)
        else:
            log.info(
                "export queued %s sop=%s rows=%s priority=%d", kind, sop_instance_uid, ids, priority
            )
        return ids

    # Queries --------------------------------------------------------------------------------

    @staticmethod
    def _due_clause(now: datetime) -> Any:
        return and_(
            Export.state.in_([ExportState.pending.value, ExportState.sending.value]),
            Export.next_attempt_at <= now,
        )

    @staticmethod
    def _lane_clause(destination: str | None, not_in: Collection[str] | None) -> Any:
        """Rows of one destination, or of every destination outside ``not_in``."""
        clauses = []
        if destination is not None:
            clauses.append(Export.destination == destination)
        if not_in is not None:
            clauses.append(Export.destination.not_in(list(not_in)))
        return and_(true(), *clauses)

    @staticmethod
    def _order() -> tuple[Any, ...]:
        return (Export.priority.desc(), Export.created_at, Export.id)

    def due(self, now: datetime | None = None, limit: int = 100) -> list[ExportRow]:
        """Rows to send now (pending and past ``next_attempt_at``, or ``sending`` with an
        expired lease): highest priority first, then oldest."""
        now = now or utcnow()
        with self.db.session() as session:
            rows = session.scalars(
                select(Export).where(self._due_clause(now)).order_by(*self._order()).limit(limit)
            )
            return [ExportRow.of(r) for r in rows]

    def claim(
        self,
        now: datetime | None = None,
        limit: int = 32,
        *,
        destination: str | None = None,
        not_in: Collection[str] | None = None,
    ) -> list[ExportRow]:
        """Take up to ``limit`` due rows for sending: they become ``sending`` under a lease.

        Parameters
        ----------
        destination
            Only rows for this destination (one sending lane); every destination when None.
        not_in
            Only rows whose destination is none of these (rows of destinations no longer
            configured).
        """
        now = now or utcnow()
        with self.db.write_session() as session:
            rows = list(
                session.scalars(
                    select(Export)
                    .where(self._due_clause(now), self._lane_clause(destination, not_in))
                    .order_by(*self._order())
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            lease_end = now + timedelta(seconds=self._lease_for(len(rows)))
            for row in rows:
                row.state = ExportState.sending.value
                row.next_attempt_at = lease_end
            return [ExportRow.of(r) for r in rows]

    def get(self, export_id: int) -> ExportRow | None:
        with self.db.session() as session:
            row = session.get(Export, export_id)
            return ExportRow.of(row) if row is not None else None

    def list(
        self, state: str | ExportState | None = None, limit: int | None = None
    ) -> list[ExportRow]:
        """Rows, newest first; only those in ``state`` when given."""
        query = select(Export).order_by(Export.created_at.desc(), Export.id.desc())
        if state is not None:
            query = query.where(Export.state == ExportState(state).value)
        if limit is not None:
            query = query.limit(limit)
        with self.db.session() as session:
            return [ExportRow.of(r) for r in session.scalars(query)]

    def counts(self) -> dict[str, int]:
        """Rows per state (every state present, zero when empty)."""
        counts = {s.value: 0 for s in ExportState}
        for row in self.list():
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts

    def next_due_at(
        self, *, destination: str | None = None, not_in: Collection[str] | None = None
    ) -> datetime | None:
        """When the earliest pending or sending row becomes due; None when none waits.

        ``destination`` and ``not_in`` narrow it to one lane, as in :meth:`claim`.
        """
        with self.db.session() as session:
            return session.scalar(
                select(Export.next_attempt_at)
                .where(
                    Export.state.in_([ExportState.pending.value, ExportState.sending.value]),
                    self._lane_clause(destination, not_in),
                )
                .order_by(Export.next_attempt_at)
                .limit(1)
            )

    # Outcomes -------------------------------------------------------------------------------

    def mark_sent(
        self, export_id: int, now: datetime | None = None, session: Session | None = None
    ) -> ExportRow:
        """The destination accepted the SR; in ``session``'s transaction when given."""
        now = now or utcnow()
        if session is None:
            with self.db.write_session() as own:
                return self.mark_sent(export_id, now, own)
        row = session.get_one(Export, export_id)
        row.state = ExportState.sent.value
        row.attempts += 1
        row.sent_at = now
        row.last_error = None
        return ExportRow.of(row)

    def mark_failed(self, export_id: int, error: str, now: datetime | None = None) -> ExportRow:
        """An attempt failed: back to ``pending`` after a backoff, or ``dead`` at the limit."""
        now = now or utcnow()
        export = self.settings.export
        with self.db.write_session() as session:
            row = session.get_one(Export, export_id)
            row.attempts += 1
            row.last_error = error[:2000]
            if row.attempts >= export.max_attempts:
                row.state = ExportState.dead.value
            else:
                row.state = ExportState.pending.value
                delay = backoff_delay(row.attempts, export.backoff_initial_s, export.backoff_max_s)
                row.next_attempt_at = now + timedelta(seconds=delay)
            return ExportRow.of(row)

    # Operator actions -----------------------------------------------------------------------

    def requeue_sending(self) -> int:
        """Release every ``sending`` row now (at start-up, when no send can be in flight)."""
        with self.db.write_session() as session:
            result = session.execute(
                update(Export)
                .where(Export.state == ExportState.sending.value)
                .values(state=ExportState.pending.value, next_attempt_at=utcnow())
            )
            count = int(getattr(result, "rowcount", 0) or 0)
        if count:
            log.warning("requeued %d export(s) left in sending by an earlier run", count)
        return count

    def _requeue(self, where: Any, reason: str) -> builtins.list[int]:
        with self.db.write_session() as session:
            rows = list(session.scalars(select(Export).where(where).with_for_update()))
            for row in rows:
                row.state = ExportState.pending.value
                row.attempts = 0
                row.next_attempt_at = utcnow()
            ids = [r.id for r in rows]
        for row_id in ids:
            log.info("export %d requeued (%s)", row_id, reason)
        return ids

    def retry(self, export_id: int) -> bool:
        """Requeue one dead (or pending) row to be sent now; False when it is sent or absent.

        Its attempt counter restarts, so it gets the full ``max_attempts`` again.
        """
        where = and_(
            Export.id == export_id,
            or_(Export.state == ExportState.dead.value, Export.state == ExportState.pending.value),
        )
        return bool(self._requeue(where, "retry"))

    def retry_all_dead(self) -> int:
        """Requeue every dead row; returns how many."""
        return len(self._requeue(Export.state == ExportState.dead.value, "retry all dead"))
