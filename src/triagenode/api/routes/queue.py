"""``/api/v1/queue``: jobs waiting for or held by a worker, by priority."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import func, select

from triagenode.api.deps import DbDep, require
from triagenode.api.routes.studies import priority_name
from triagenode.api.schemas import QueueJobOut, QueueOut, QueuePriorityOut
from triagenode.api.tokens import Principal, Role
from triagenode.audit.events import AuditEventId
from triagenode.domain import JobState, Priority
from triagenode.store.models import Job, Study

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/queue", tags=["queue"])
Reader = Annotated[Principal, Depends(require(Role.auditor, AuditEventId.query))]
_ACTIVE = (JobState.pending.value, JobState.leased.value)


@router.get("", response_model=QueueOut, summary="Pending and leased jobs, highest priority first")
def get_queue(db: DbDep, _: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> QueueOut:
    with db.session() as session:
        counts = session.execute(
            select(Job.priority, Job.state, func.count())
            .where(Job.state.in_(_ACTIVE))
            .group_by(Job.priority, Job.state)
        ).all()
        rows = session.execute(
            select(Job, Study.study_uid)
            .outerjoin(Study, Study.id == Job.study_id)
            .where(Job.state.in_(_ACTIVE))
            .order_by(Job.priority.desc(), Job.enqueued_at, Job.id)
            .limit(limit)
        ).all()
        jobs = [
            QueueJobOut(
                id=job.id,
                study_uid=study_uid,
                kind=job.kind,
                state=job.state,
                priority=priority_name(job.priority),
                run=job.run,
                attempts=job.attempts,
                enqueued_at=job.enqueued_at,
                available_at=job.available_at,
                lease_owner=job.lease_owner,
                lease_expires_at=job.lease_expires_at,
            )
            for job, study_uid in rows
        ]
    table = {p.value: dict.fromkeys(_ACTIVE, 0) for p in Priority}
    for priority, state, count in counts:
        table.setdefault(priority, dict.fromkeys(_ACTIVE, 0))[state] = count
    by_priority = [
        QueuePriorityOut(priority=priority_name(p), **table[p]) for p in sorted(table, reverse=True)
    ]
    return QueueOut(by_priority=by_priority, jobs=jobs)
