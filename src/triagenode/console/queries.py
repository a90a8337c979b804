"""What the console's pages show, read with paginated, indexed queries.

Each function returns plain view objects; nothing here knows about HTML. Patient IDs come
in only as search text and leave only as their keyed hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session as OrmSession

from triagenode.api.schemas import without_phi
from triagenode.audit.events import AuditEventId
from triagenode.domain import ExportState, JobState, Priority, StudyState
from triagenode.pipeline.actions import REPROCESSABLE
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent, Export, Job, Result, Study, StudyEvent, utcnow

__all__ = [
    "PAGE_SIZE",
    "AuditFilter",
    "AuditPage",
    "ExportsView",
    "StudyRow",
    "StudyView",
    "WorklistFilter",
    "WorklistPage",
    "audit_page",
    "exports_view",
    "priority_name",
    "study_view",
    "worklist",
]

PAGE_SIZE = 50
MAX_PAGE = 10_000  # deeper than anyone scrolls; bounds the offset handed to the database
EVENT_NAMES = {e.value: e.meaning for e in AuditEventId}


def priority_name(value: int) -> str:
    try:
        return Priority(value).name
    except ValueError:
        return str(value)


@dataclass(frozen=True)
class WorklistFilter:
    state: str | None = None
    priority: int | None = None
    modality: str | None = None
    search: str | None = None  # a study UID or a patient ID (hashed before it is used)
    page: int = 1


@dataclass(frozen=True)
class FindingView:
    name: str
    meaning: str
    score: float
    threshold: float
    present: bool
    critical: bool
    calibrated: bool


@dataclass
class StudyRow:
    study_uid: str
    state: str
    state_reason: str | None
    priority: str
    modality: str | None
    label_set: str | None
    instance_count: int
    critical: bool
    first_received_at: datetime
    age: timedelta
    time_to_sr: timedelta | None = None
    above: list[FindingView] = field(default_factory=list)


@dataclass
class WorklistPage:
    lanes: list[tuple[str, list[StudyRow]]]
    total: int
    page: int
    pages: int


def _study_row(s: Study, now: datetime) -> StudyRow:
    """A study's worklist row, before its result is added."""
    return StudyRow(
        study_uid=s.study_uid,
        state=s.state,
        state_reason=s.state_reason,
        priority=priority_name(s.priority),
        modality=s.modality,
        label_set=s.label_set,
        instance_count=s.instance_count,
        critical=s.critical,
        first_received_at=s.first_received_at,
        age=now - s.first_received_at,
    )


def _findings(data: dict[str, Any] | None) -> list[FindingView]:
    out = []
    for item in (data or {}).get("findings") or []:
        if not isinstance(item, dict):
            continue
        try:
            out.append(
                FindingView(
                    name=str(item.get("name", "")),
                    meaning=str((item.get("code") or {}).get("meaning") or item.get("name", "")),
                    score=float(item.get("score", 0.0)),
                    threshold=float(item.get("threshold", 0.0)),
                    present=bool(item.get("present")),
                    critical=bool(item.get("critical")),
                    calibrated=bool(item.get("calibrated")),
                )
            )
        except (TypeError, ValueError):
            continue  # a malformed entry is left out, not allowed to stop the page
    return out


def worklist(db: Database, wanted: WorklistFilter, patient_ref: str | None) -> WorklistPage:
    """One page of studies, stat first, newest first within a priority.

    ``patient_ref`` is the keyed hash of the search text, so the text matches a study UID
    or a patient ID without the ID being stored or compared in clear.
    """
    filters: list[ColumnElement[bool]] = []
    if wanted.state:
        filters.append(Study.state == wanted.state)
    if wanted.priority is not None:
        filters.append(Study.priority == wanted.priority)
    if wanted.modality:
        filters.append(Study.modality == wanted.modality)
    if wanted.search:
        matches = [Study.study_uid == wanted.search]
        if patient_ref:
            matches.append(Study.patient_ref == patient_ref)
        filters.append(or_(*matches))
    page = max(1, min(wanted.page, MAX_PAGE))
    now = utcnow()
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(Study).where(*filters)) or 0
        studies = session.scalars(
            select(Study)
            .where(*filters)
            .order_by(Study.priority.desc(), Study.last_received_at.desc(), Study.id.desc())
            .offset((page - 1) * PAGE_SIZE)
            .limit(PAGE_SIZE)
        ).all()
        latest = _latest_results(session, [s.id for s in studies])
        rows = []
        for s in studies:
            row = _study_row(s, now)
            result = latest.get(s.id)
            if result is not None:
                if result.sr_sop_instance_uid:
                    row.time_to_sr = result.created_at - s.first_received_at
                row.above = [f for f in _findings(result.findings) if f.present]
                row.above.sort(key=lambda f: -f.score)
            rows.append(row)
    lanes: list[tuple[str, list[StudyRow]]] = []
    for row in rows:
        if not lanes or lanes[-1][0] != row.priority:
            lanes.append((row.priority, []))
        lanes[-1][1].append(row)
    return WorklistPage(lanes, total, page, max(1, -(-total // PAGE_SIZE)))


def _latest_results(session: OrmSession, study_ids: list[int]) -> dict[int, Result]:
    if not study_ids:
        return {}
    latest: dict[int, Result] = {}
    for result in session.scalars(
        select(Result).where(Result.study_id.in_(study_ids)).order_by(Result.id)
    ):
        latest[result.study_id] = result
    return latest


@dataclass
class ResultView:
    run: int
    model: str
    model_version: str
    is_demo: bool
    backend: str
    label_set: str
    label_set_reason: str
    aggregation: str
    calibration: str
    top_finding: str | None
    critical: bool
    findings: list[FindingView]
    series_skipped: list[dict[str, Any]]
    images_used: int
    images_failed: list[dict[str, Any]]
    sr_sop_instance_uid: str | None
    created_at: datetime


@dataclass
class StudyView:
    row: StudyRow
    study_id: int
    patient_ref: str | None
    priority_rule: str | None
    run: int
    attempts: int
    stable_at: datetime | None
    last_received_at: datetime
    events: list[StudyEvent]
    result: ResultView | None
    earlier_runs: list[int]
    exports: list[Export]
    can_reprocess: bool
    can_complete: bool


def _result_view(result: Result) -> ResultView:
    data = without_phi(result.findings or {})
    skipped = [s for s in data.get("series_skipped") or [] if isinstance(s, dict)]
    failed = [s for s in data.get("images_failed") or [] if isinstance(s, dict)]
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    return ResultView(
        run=result.run,
        model=str(model.get("display_name") or result.model_name),
        model_version=result.model_version,
        is_demo=result.is_demo,
        backend=result.backend,
        label_set=result.label_set,
        label_set_reason=str(data.get("label_set_reason") or ""),
        aggregation=str(data.get("aggregation") or ""),
        calibration=str(data.get("calibration") or "none"),
        top_finding=result.top_finding,
        critical=result.critical,
        findings=_findings(data),
        series_skipped=skipped,
        images_used=len(data.get("images_used") or []),
        images_failed=failed,
        sr_sop_instance_uid=result.sr_sop_instance_uid,
        created_at=result.created_at,
    )


def study_view(db: Database, study_uid: str) -> StudyView | None:
    """Everything the study page shows, or None for an unknown study."""
    with db.session() as session:
        s = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if s is None:
            return None
        events = list(
            session.scalars(
                select(StudyEvent).where(StudyEvent.study_id == s.id).order_by(StudyEvent.id)
            )
        )
        results = list(
            session.scalars(select(Result).where(Result.study_id == s.id).order_by(Result.id))
        )
        exports = list(
            session.scalars(select(Export).where(Export.study_uid == study_uid).order_by(Export.id))
        )
        latest = _latest_results(session, [s.id])
        row = _study_row(s, utcnow())
        result = _result_view(latest[s.id]) if s.id in latest else None
        if result is not None and result.sr_sop_instance_uid:
            row.time_to_sr = result.created_at - s.first_received_at
        return StudyView(
            row=row,
            study_id=s.id,
            patient_ref=s.patient_ref,
            priority_rule=s.priority_rule,
            run=s.run,
            attempts=s.attempts,
            stable_at=s.stable_at,
            last_received_at=s.last_received_at,
            events=events,
            result=result,
            earlier_runs=[r.run for r in results[:-1]],
            exports=exports,
            can_reprocess=s.state in REPROCESSABLE,
            can_complete=s.state == StudyState.receiving.value,
        )


@dataclass
class ExportsView:
    state: str
    counts: dict[str, int]
    exports: list[Export]
    jobs: dict[str, int]
    total: int
    page: int
    pages: int


_ACTIVE_JOBS = (JobState.pending.value, JobState.leased.value)
EXPORT_STATES = tuple(
    s.value for s in (ExportState.dead, ExportState.pending, ExportState.sending, ExportState.sent)
)


def exports_view(db: Database, state: str, page: int) -> ExportsView:
    """Exports in one state (dead letters first by default), and the queue's counts."""
    page = max(1, min(page, MAX_PAGE))
    with db.session() as session:
        counts = dict(
            session.execute(select(Export.state, func.count()).group_by(Export.state)).all()
        )
        jobs = dict(
            session.execute(
                select(Job.state, func.count())
                .where(Job.state.in_(_ACTIVE_JOBS))
                .group_by(Job.state)
            ).all()
        )
        rows = list(
            session.scalars(
                select(Export)
                .where(Export.state == state)
                .order_by(Export.priority.desc(), Export.id.desc())
                .offset((page - 1) * PAGE_SIZE)
                .limit(PAGE_SIZE)
            )
        )
    total = int(counts.get(state, 0))
    return ExportsView(
        state=state,
        counts={k: int(counts.get(k, 0)) for k in EXPORT_STATES},
        exports=rows,
        jobs={k: int(jobs.get(k, 0)) for k in _ACTIVE_JOBS},
        total=total,
        page=page,
        pages=max(1, -(-total // PAGE_SIZE)),
    )


@dataclass(frozen=True)
class AuditFilter:
    start: datetime | None = None
    end: datetime | None = None
    event_id: str | None = None
    actor: str | None = None
    study_uid: str | None = None
    outcome: int | None = None
    before: int | None = None  # show events with a sequence number below this one


@dataclass
class AuditPage:
    events: list[AuditEvent]
    total: int
    next_before: int | None


def audit_page(db: Database, wanted: AuditFilter, patient_ref: str | None) -> AuditPage:
    """Audit events, newest first, a page at a time by sequence number."""
    filters: list[ColumnElement[bool]] = []
    if wanted.start is not None:
        filters.append(AuditEvent.at >= wanted.start)
    if wanted.end is not None:
        filters.append(AuditEvent.at < wanted.end)
    for column, value in (
        (AuditEvent.event_id, wanted.event_id),
        (AuditEvent.actor, wanted.actor),
        (AuditEvent.study_uid, wanted.study_uid),
        (AuditEvent.outcome, wanted.outcome),
        (AuditEvent.patient_ref, patient_ref),
    ):
        if value is not None:
            filters.append(column == value)
    query = select(AuditEvent).where(*filters)
    if wanted.before is not None:
        query = query.where(AuditEvent.seq < wanted.before)
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(AuditEvent).where(*filters)) or 0
        rows = list(session.scalars(query.order_by(AuditEvent.seq.desc()).limit(PAGE_SIZE)))
    following = rows[-1].seq if len(rows) == PAGE_SIZE and rows[-1].seq else None
    return AuditPage(rows, total, following)
