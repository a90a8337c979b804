"""``/api/v1/studies``: the studies the node holds, their history, results and exports."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import ColumnElement, and_, func, or_, select

from triagenode.api.deps import AuditDep, CallAuditDep, DbDep, require
from triagenode.api.problems import Problem
from triagenode.api.routes._paging import (
    Cursor,
    Limit,
    Offset,
    as_utc,
    decode_cursor,
    encode_cursor,
)
from triagenode.api.schemas import (
    ActionResult,
    ExportOut,
    Page,
    ResultOut,
    SeriesOut,
    StudyDetail,
    StudyEventOut,
    StudySummary,
    without_phi,
)
from triagenode.api.tokens import Principal, Role
from triagenode.audit.events import AuditEventId
from triagenode.domain import Priority, StudyState
from triagenode.pipeline import actions
from triagenode.store.models import Export, Instance, Result, Series, Study, StudyEvent

__all__ = ["export_out", "priority_name", "router"]

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])

Reader = Annotated[Principal, Depends(require(Role.auditor, AuditEventId.query))]
Reprocessor = Annotated[
    Principal,
    Depends(require(Role.operator, AuditEventId.instances_accessed, "U", "reprocess")),
]
Completer = Annotated[
    Principal,
    Depends(require(Role.operator, AuditEventId.instances_accessed, "U", "complete")),
]


def priority_name(value: int) -> str:
    try:
        return Priority(value).name
    except ValueError:
        return str(value)


def _parse_priority(value: str) -> int:
    try:
        return int(Priority.parse(int(value) if value.isdigit() else value))
    except ValueError as exc:
        raise Problem(422, str(exc), "invalid-request") from None


def _summary(study: Study) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "state": study.state,
        "priority": priority_name(study.priority),
        "modality": study.modality,
        "calling_ae": study.calling_ae,
        "label_set": study.label_set,
        "critical": study.critical,
        "instance_count": study.instance_count,
        "first_received_at": study.first_received_at,
        "last_received_at": study.last_received_at,
        "stable_at": study.stable_at,
        "run": study.run,
    }


def export_out(row: Export) -> ExportOut:
    return ExportOut(
        id=row.id,
        study_uid=row.study_uid,
        destination=row.destination,
        sop_instance_uid=row.sop_instance_uid,
        priority=priority_name(row.priority),
        state=row.state,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        created_at=row.created_at,
        sent_at=row.sent_at,
    )


@router.get("", response_model=Page[StudySummary], summary="List studies, newest first")
def list_studies(
    db: DbDep,
    _: Reader,
    call: CallAuditDep,
    state: Annotated[list[StudyState] | None, Query()] = None,
    priority: Annotated[
        str | None, Query(description="stat, urgent, routine, low or 10-40")
    ] = None,
    received_from: datetime | None = None,
    received_to: datetime | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
    cursor: Cursor = None,
) -> Page[StudySummary]:
    received_from = as_utc(received_from, "received_from")
    received_to = as_utc(received_to, "received_to")
    filters: list[ColumnElement[bool]] = []
    if state:
        filters.append(Study.state.in_([s.value for s in state]))
    if priority is not None:
        filters.append(Study.priority == _parse_priority(priority))
    if received_from is not None:
        filters.append(Study.last_received_at >= received_from)
    if received_to is not None:
        filters.append(Study.last_received_at < received_to)
    query = select(Study).where(*filters)
    if cursor:
        at, last_id = decode_cursor(cursor, datetime, int)
        query = query.where(
            or_(Study.last_received_at < at, and_(Study.last_received_at == at, Study.id < last_id))
        )
        offset = 0
    query = query.order_by(Study.last_received_at.desc(), Study.id.desc())
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(Study).where(*filters)) or 0
        rows = session.scalars(query.offset(offset).limit(limit)).all()
        items = [StudySummary(**_summary(r)) for r in rows]
    following = None
    if len(rows) == limit:
        following = encode_cursor(rows[-1].last_received_at.isoformat(), rows[-1].id)
    call.details.update(count=len(items))
    return Page[StudySummary](
        items=items, total=total, limit=limit, offset=offset, next_cursor=following
    )


@router.get("/{study_uid}", response_model=StudyDetail, summary="One study in full")
def get_study(study_uid: str, db: DbDep, _: Reader, call: CallAuditDep) -> StudyDetail:
    call.study_uid = study_uid
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise Problem(404, f"no study {study_uid}", "not-found")
        call.patient_ref = study.patient_ref
        history = session.scalars(
            select(StudyEvent).where(StudyEvent.study_id == study.id).order_by(StudyEvent.id)
        ).all()
        series = session.execute(
            select(Series, func.count(Instance.id))
            .outerjoin(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study.id)
            .group_by(Series.id)
            .order_by(Series.id)
        ).all()
        results = session.scalars(
            select(Result).where(Result.study_id == study.id).order_by(Result.run, Result.id)
        ).all()
        exports = session.scalars(
            select(Export).where(Export.study_uid == study_uid).order_by(Export.id)
        ).all()
        return StudyDetail(
            **_summary(study),
            state_reason=study.state_reason,
            priority_rule=study.priority_rule,
            byte_count=study.byte_count,
            attempts=study.attempts,
            series_count=len(series),
            stored_instance_count=sum(count for _, count in series),
            history=[
                StudyEventOut(
                    at=e.at, from_state=e.from_state, to_state=e.to_state, reason=e.reason
                )
                for e in history
            ],
            series=[
                SeriesOut(
                    series_uid=s.series_uid,
                    modality=s.modality,
                    body_part=s.body_part,
                    instance_count=count,
                )
                for s, count in series
            ],
            results=[
                ResultOut(
                    run=r.run,
                    model_name=r.model_name,
                    model_version=r.model_version,
                    is_demo=r.is_demo,
                    backend=r.backend,
                    label_set=r.label_set,
                    top_finding=r.top_finding,
                    critical=r.critical,
                    findings=without_phi(r.findings or {}),
                    sr_sop_instance_uid=r.sr_sop_instance_uid,
                    sr_series_uid=r.sr_series_uid,
                    created_at=r.created_at,
                    current=r is results[-1],
                    supersedes=(r.findings or {}).get("supersedes"),
                )
                for r in results
            ],
            sr_sop_instance_uid=results[-1].sr_sop_instance_uid if results else None,
            exports=[export_out(x) for x in exports],
        )


def _act(db: Any, audit: Any, call: Any, study_uid: str, actor: str, action: str) -> ActionResult:
    call.study_uid = study_uid
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise Problem(404, f"no study {study_uid}", "not-found")
        call.patient_ref = study.patient_ref
        state = study.state
    act = actions.reprocess_study if action == "reprocess" else actions.mark_study_complete
    if not act(db, audit, study_uid, actor):
        raise Problem(409, f"study {study_uid} cannot be marked {action} while {state}", "conflict")
    with db.session() as session:
        state = session.scalar(select(Study.state).where(Study.study_uid == study_uid))
    return ActionResult(study_uid=study_uid, action=action, changed=True, state=state)


@router.post(
    "/{study_uid}/reprocess", response_model=ActionResult, summary="Classify again as a new run"
)
def reprocess(
    study_uid: str, db: DbDep, audit: AuditDep, who: Reprocessor, call: CallAuditDep
) -> ActionResult:
    return _act(db, audit, call, study_uid, who.name, "reprocess")


@router.post(
    "/{study_uid}/complete",
    response_model=ActionResult,
    summary="End a receiving study's quiet period now",
)
def complete(
    study_uid: str, db: DbDep, audit: AuditDep, who: Completer, call: CallAuditDep
) -> ActionResult:
    return _act(db, audit, call, study_uid, who.name, "complete")
