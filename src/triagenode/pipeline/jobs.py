"""The job vocabulary of the queue: states, aging, and what a claim or a listing returns.

Kept apart from :mod:`triagenode.pipeline.queue` so that readers (API, CLI, metrics) can use
these types without the claiming machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from triagenode.domain import JobState, Priority
from triagenode.store.models import Job, utcnow

__all__ = [
    "ClaimedJob",
    "QueuedJob",
    "cancel_pending_jobs",
    "effective_priority",
]

LEVELS = sorted(Priority)  # low .. stat
MAX_ERROR = 2000  # characters of an error message kept on the job row


ACTIVE = (JobState.pending.value, JobState.leased.value)


def effective_priority(
    priority: Priority | int, enqueued_at: datetime, now: datetime, aging_after_s: float
) -> Priority:
    """``priority`` raised one level per ``aging_after_s`` waited since ``enqueued_at``,
    at most ``stat``."""
    index = LEVELS.index(Priority(priority))
    waited = (now - enqueued_at).total_seconds()
    steps = int(waited // aging_after_s) if waited > 0 else 0
    return LEVELS[min(len(LEVELS) - 1, index + steps)]


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now holds until ``lease_expires_at`` (renew with heartbeat)."""

    id: int
    study_id: int
    study_uid: str
    kind: str
    run: int
    priority: Priority  # as queued
    effective_priority: Priority  # after aging, what it was claimed at
    attempts: int  # including this one
    enqueued_at: datetime
    lease_owner: str
    lease_expires_at: datetime


@dataclass(frozen=True)
class QueuedJob:
    """A job as listed by :meth:`JobQueue.pending`."""

    id: int
    study_id: int
    study_uid: str
    kind: str
    run: int
    state: JobState
    priority: Priority
    effective_priority: Priority
    attempts: int
    enqueued_at: datetime
    available_at: datetime
    last_error: str | None


def cancel_pending_jobs(
    session: Session, study_id: int, reason: str, *, below_run: int | None = None
) -> int:
    """Cancel the study's pending jobs (only runs below ``below_run`` when given), in the
    caller's transaction.

    Leased jobs are left to finish: their worker holds them. Returns how many were cancelled.
    """
    stmt = (
        update(Job)
        .where(Job.study_id == study_id, Job.state == JobState.pending.value)
        .values(state=JobState.cancelled.value, last_error=reason[:MAX_ERROR], finished_at=utcnow())
    )
    if below_run is not None:
        stmt = stmt.where(Job.run < below_run)
    return cast(CursorResult[Any], session.execute(stmt)).rowcount
