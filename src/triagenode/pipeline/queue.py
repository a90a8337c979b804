"""The persistent priority queue: job rows claimed highest priority first, under a lease.

Order
    Highest *effective* priority first, oldest first within it. A job's effective priority
    is its own raised one level per ``triage.aging_after_s`` waited, capped at ``stat``, so
    a backlog of routine work is never starved by a stream of urgent studies.
Claims stay O(log n)
    Within one base priority, the oldest job has waited longest and so has the highest
    effective priority of its level. A claim therefore reads only the head of each of the
    four levels (one index seek each on ``ix_jobs_claim``), compares the heads' effective
    priorities and takes the best: four rows, however long the backlog.
Leases
    A claim sets ``lease_owner`` and ``lease_expires_at``; the worker renews it with
    :meth:`JobQueue.heartbeat`. A worker that dies (kill -9) simply stops renewing: the next
    claim after expiry puts the job back (its attempt counted), or fails it once
    ``study.max_attempts`` claims have all died.
Concurrency
    On PostgreSQL each head is read with ``SELECT ... FOR UPDATE SKIP LOCKED``, so workers
    in any number of processes and machines never claim the same job and never wait on each
    other. On SQLite the claim runs under :meth:`Database.write_session` (``BEGIN
    IMMEDIATE``), which serialises claimers of one database file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Select, func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from triagenode.config.settings import Settings
from triagenode.domain import JobState, Priority, StudyState
from triagenode.pipeline.jobs import (
    ACTIVE,
    LEVELS,
    MAX_ERROR,
    ClaimedJob,
    QueuedJob,
    cancel_pending_jobs,
    effective_priority,
)
from triagenode.store.db import Database
from triagenode.store.models import Job, Study, utcnow
from triagenode.store.study_state import set_study_state

__all__ = [
    "ClaimedJob",
    "JobQueue",
    "QueuedJob",
    "cancel_pending_jobs",
    "effective_priority",
]

log = logging.getLogger(__name__)


class JobQueue:
    """Jobs in the database, claimed by priority under leases.

    Parameters
    ----------
    db
        The node's database (SQLite or PostgreSQL).
    settings
        Uses ``triage.aging_after_s``, ``triage.lease_s``, ``triage.retry_backoff_s``,
        ``triage.retry_backoff_max_s`` and ``study.max_attempts``.
    """

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._triage = settings.triage
        self._max_attempts = settings.study.max_attempts

    # Producing ---------------------------------------------------------------------------

    def enqueue(
        self,
        study_id: int,
        priority: Priority | int | str,
        run: int,
        kind: str = "classify",
        session: Session | None = None,
        *,
        now: datetime | None = None,
    ) -> int:
        """Queue a job; idempotent while a job for (study, run, kind) is pending or leased.

        Parameters
        ----------
        study_id, run, kind
            What to do: ``kind`` of work on run ``run`` of the study.
        priority
            A :class:`Priority`, its value or its name. When the job is already pending at a
            lower priority it is raised (never lowered).
        session
            Join the caller's transaction (e.g. the one moving the study to ``queued``);
            otherwise the job is committed in a transaction of its own.

        Returns
        -------
        int
            The id of the new or the existing active job.
        """
        level = Priority.parse(priority)
        moment = now or utcnow()
        if session is None:
            with self._db.write_session() as own:
                return self._enqueue(own, study_id, level, run, kind, moment)
        return self._enqueue(session, study_id, level, run, kind, moment)

    def _enqueue(
        self, session: Session, study_id: int, level: Priority, run: int, kind: str, now: datetime
    ) -> int:
        existing = self._active(session, study_id, run, kind)
        if existing is None:
            job = Job(
                study_id=study_id,
                kind=kind,
                state=JobState.pending.value,
                priority=int(level),
                run=run,
                enqueued_at=now,
                available_at=now,
                attempts=0,
            )
            try:
                # Another node may insert the same job at the same moment: the partial unique
                # index uq_jobs_active rejects the second, which then finds the first.
                with session.begin_nested():
                    session.add(job)
                    session.flush()
            except IntegrityError:
                existing = self._active(session, study_id, run, kind)
                if existing is None:
                    raise
            else:
                log.debug("job %d queued: study id %d %s", job.id, study_id, level.name)
                return job.id
        if existing.state == JobState.pending.value and existing.priority < level:
            existing.priority = int(level)
        return existing.id

    @staticmethod
    def _active(session: Session, study_id: int, run: int, kind: str) -> Job | None:
        return session.scalars(
            select(Job).where(
                Job.study_id == study_id,
                Job.run == run,
                Job.kind == kind,
                Job.state.in_(ACTIVE),
            )
        ).first()

    def cancel(
        self,
        study_id: int,
        reason: str,
        session: Session | None = None,
        *,
        below_run: int | None = None,
    ) -> int:
        """Cancel the study's pending jobs; see :func:`cancel_pending_jobs`."""
        if session is None:
            with self._db.write_session() as own:
                return cancel_pending_jobs(own, study_id, reason, below_run=below_run)
        return cancel_pending_jobs(session, study_id, reason, below_run=below_run)

    # Consuming ---------------------------------------------------------------------------

    def claim(self, worker_id: str, now: datetime | None = None) -> ClaimedJob | None:
        """Take the most urgent available job and lease it to ``worker_id``.

        Returns
        -------
        ClaimedJob or None
            None when no job is available (empty queue, or all in retry back-off).
        """
        now = now or utcnow()
        with self._db.write_session() as session:
            self._expire_leases(session, now)
            heads = [job for level in reversed(LEVELS) if (job := self._head(session, level, now))]
            if not heads:
                return None
            aging = self._triage.aging_after_s

            def rank(job: Job) -> tuple[Priority, float, int]:
                effective = effective_priority(job.priority, job.enqueued_at, now, aging)
                return (effective, -job.enqueued_at.timestamp(), -job.id)

            job = max(heads, key=rank)
            job.state = JobState.leased.value
            job.lease_owner = worker_id
            job.lease_expires_at = now + timedelta(seconds=self._triage.lease_s)
            job.attempts += 1
            study_uid = session.scalar(select(Study.study_uid).where(Study.id == job.study_id))
            claimed = ClaimedJob(
                id=job.id,
                study_id=job.study_id,
                study_uid=study_uid or "",
                kind=job.kind,
                run=job.run,
                priority=Priority(job.priority),
                effective_priority=rank(job)[0],
                attempts=job.attempts,
                enqueued_at=job.enqueued_at,
                lease_owner=worker_id,
                lease_expires_at=job.lease_expires_at,
            )
        log.debug(
            "job %d claimed by %s: study %s %s (effective %s), attempt %d",
            claimed.id,
            worker_id,
            claimed.study_uid,
            claimed.priority.name,
            claimed.effective_priority.name,
            claimed.attempts,
        )
        return claimed

    def _locking(self, stmt: Select[Any]) -> Select[Any]:
        if self._db.is_sqlite:
            return stmt  # BEGIN IMMEDIATE already holds the database's write lock
        return stmt.with_for_update(skip_locked=True)

    def _head(self, session: Session, level: Priority, now: datetime) -> Job | None:
        stmt = (
            select(Job)
            .where(
                Job.state == JobState.pending.value,
                Job.priority == int(level),
                Job.available_at <= now,
            )
            .order_by(Job.enqueued_at, Job.id)
            .limit(1)
        )
        return session.scalars(self._locking(stmt)).first()

    def _expire_leases(self, session: Session, now: datetime) -> None:
        stmt = select(Job).where(Job.state == JobState.leased.value, Job.lease_expires_at < now)
        for job in session.scalars(self._locking(stmt)).all():
            owner = job.lease_owner
            if job.attempts >= self._max_attempts:
                reason = f"lease of {owner} expired; {job.attempts} attempts used"
                job.state = JobState.failed.value
                job.finished_at = now
                if job.kind == "classify":
                    # No worker is left to record the outcome: the queue does it.
                    set_study_state(session, job.study_id, StudyState.failed, reason)
                log.warning("job %d failed: %s", job.id, reason)
            else:
                reason = f"lease of {owner} expired (attempt {job.attempts})"
                job.state = JobState.pending.value
                job.available_at = now
                log.warning("job %d back in the queue: %s", job.id, reason)
            job.lease_owner = None
            job.lease_expires_at = None
            job.last_error = reason

    def heartbeat(self, job_id: int, worker_id: str, now: datetime | None = None) -> bool:
        """Extend the lease by ``triage.lease_s``; False when ``worker_id`` lost it."""
        now = now or utcnow()
        return self._update_own(
            job_id, worker_id, lease_expires_at=now + timedelta(seconds=self._triage.lease_s)
        )

    @contextmanager
    def keep_alive(
        self, job_id: int, worker_id: str, interval_s: float | None = None
    ) -> Iterator[threading.Event]:
        """Renew the lease in the background while the ``with`` block processes the job.

        Heartbeats every ``interval_s`` (default a third of ``triage.lease_s``), so a slow
        study keeps its lease while a dead worker's lapses. The yielded event is set when the
        lease was lost (the job expired and another worker took it): the holder should stop
        and not report the result.
        """
        lost = threading.Event()
        stop = threading.Event()
        interval = interval_s if interval_s is not None else self._triage.lease_s / 3

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    if not self.heartbeat(job_id, worker_id):
                        lost.set()
                        log.warning("job %d: %s lost its lease", job_id, worker_id)
                        return
                except Exception:  # database briefly away: the next beat may still make it
                    log.warning("job %d: heartbeat failed", job_id, exc_info=True)

        thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join(interval + 30)

    def complete(self, job_id: int, worker_id: str, now: datetime | None = None) -> bool:
        """Mark the job done; False (and nothing changed) when ``worker_id`` lost the lease,
        in which case the job's new holder completes it."""
        return self._update_own(
            job_id,
            worker_id,
            state=JobState.done.value,
            finished_at=now or utcnow(),
            lease_owner=None,
            lease_expires_at=None,
        )

    def fail(
        self,
        job_id: int,
        worker_id: str,
        error: str,
        retry: bool,
        now: datetime | None = None,
    ) -> JobState:
        """Record a failed attempt.

        Parameters
        ----------
        error
            Why, kept on the job row (no PHI).
        retry
            Try again after a back-off (``triage.retry_backoff_s`` doubled per attempt, at
            most ``retry_backoff_max_s``) unless ``study.max_attempts`` are used up; False
            fails the job now (the input can never succeed).

        Returns
        -------
        JobState
            ``pending`` (will be retried), ``failed`` (final), or the job's unchanged state
            when ``worker_id`` no longer holds its lease.
        """
        now = now or utcnow()
        with self._db.write_session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise LookupError(f"job {job_id} does not exist")
            if job.state != JobState.leased.value or job.lease_owner != worker_id:
                log.warning("job %d: %s failed it but no longer holds its lease", job_id, worker_id)
                return JobState(job.state)
            job.last_error = error[:MAX_ERROR]
            job.lease_owner = None
            job.lease_expires_at = None
            if retry and job.attempts < self._max_attempts:
                delay = min(
                    self._triage.retry_backoff_max_s,
                    self._triage.retry_backoff_s * 2 ** max(job.attempts - 1, 0),
                )
                job.state = JobState.pending.value
                job.available_at = now + timedelta(seconds=delay)
                log.info("job %d will retry in %.0f s (attempt %d)", job_id, delay, job.attempts)
            else:
                job.state = JobState.failed.value
                job.finished_at = now
                log.warning("job %d failed after %d attempts", job_id, job.attempts)
            return JobState(job.state)

    def _update_own(self, job_id: int, worker_id: str, **values: Any) -> bool:
        stmt = (
            update(Job)
            .where(
                Job.id == job_id,
                Job.state == JobState.leased.value,
                Job.lease_owner == worker_id,
            )
            .values(**values)
        )
        with self._db.session() as session:
            return cast(CursorResult[Any], session.execute(stmt)).rowcount == 1

    # Looking -----------------------------------------------------------------------------

    def depth(self) -> dict[Priority, int]:
        """Pending jobs per queued priority (every level present, zeros included)."""
        counts = dict.fromkeys(LEVELS, 0)
        with self._db.session() as session:
            rows = session.execute(
                select(Job.priority, func.count())
                .where(Job.state == JobState.pending.value)
                .group_by(Job.priority)
            ).all()
        for priority, count in rows:
            counts[Priority(priority)] = int(count)
        return counts

    def leased(self) -> int:
        """How many jobs workers hold right now."""
        with self._db.session() as session:
            return int(
                session.scalar(select(func.count()).where(Job.state == JobState.leased.value)) or 0
            )

    def pending(self, limit: int = 100, now: datetime | None = None) -> list[QueuedJob]:
        """Pending jobs in the order they would be claimed (ignoring back-off)."""
        now = now or utcnow()
        aging = self._triage.aging_after_s
        with self._db.session() as session:
            rows = session.execute(
                select(Job, Study.study_uid)
                .join(Study, Study.id == Job.study_id)
                .where(Job.state == JobState.pending.value)
            ).all()
        listed = [
            QueuedJob(
                id=job.id,
                study_id=job.study_id,
                study_uid=uid,
                kind=job.kind,
                run=job.run,
                state=JobState(job.state),
                priority=Priority(job.priority),
                effective_priority=effective_priority(job.priority, job.enqueued_at, now, aging),
                attempts=job.attempts,
                enqueued_at=job.enqueued_at,
                available_at=job.available_at,
                last_error=job.last_error,
            )
            for job, uid in rows
        ]
        listed.sort(key=lambda j: (-j.effective_priority, j.enqueued_at, j.id))
        return listed[:limit]
