"""``/api/v1/exports``: the outbox of SRs to destinations, and retrying a dead one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import func, select

from triagenode.api.deps import AuditDep, CallAuditDep, DbDep, SettingsDep, require
from triagenode.api.problems import Problem
from triagenode.api.routes._paging import Limit, Offset
from triagenode.api.routes.studies import export_out
from triagenode.api.schemas import ActionResult, ExportOut, Page
from triagenode.api.tokens import Principal, Role
from triagenode.audit.events import AuditEventId, AuditLog
from triagenode.config.settings import Settings
from triagenode.delivery.outbox import ExportOutbox
from triagenode.domain import ExportState
from triagenode.store.db import Database
from triagenode.store.models import Export

__all__ = ["requeue_export", "router"]

router = APIRouter(prefix="/api/v1/exports", tags=["exports"])
Reader = Annotated[Principal, Depends(require(Role.auditor, AuditEventId.query))]
Retrier = Annotated[Principal, Depends(require(Role.operator, AuditEventId.export, "U", "retry"))]


@router.get("", response_model=Page[ExportOut], summary="Exports, newest first")
def list_exports(
    db: DbDep,
    _: Reader,
    state: Annotated[str | None, Query(max_length=16)] = None,
    destination: Annotated[str | None, Query(max_length=64)] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[ExportOut]:
    filters = []
    if state:
        filters.append(Export.state == state)
    if destination:
        filters.append(Export.destination == destination)
    if study_uid:
        filters.append(Export.study_uid == study_uid)
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(Export).where(*filters)) or 0
        rows = session.scalars(
            select(Export).where(*filters).order_by(Export.id.desc()).offset(offset).limit(limit)
        ).all()
        items = [export_out(r) for r in rows]
    return Page[ExportOut](items=items, total=total, limit=limit, offset=offset)


def requeue_export(db: Database, audit: AuditLog, settings: Settings, export_id: int) -> bool:
    """Queue a dead or pending export again, due now (the outbox records the audit event)."""
    return bool(ExportOutbox(db, audit, settings).retry(export_id))


@router.post(
    "/{export_id}/retry", response_model=ActionResult, summary="Send a dead export again now"
)
def retry_export(
    export_id: int,
    db: DbDep,
    audit: AuditDep,
    settings: SettingsDep,
    _: Retrier,
    call: CallAuditDep,
) -> ActionResult:
    with db.session() as session:
        row = session.get(Export, export_id)
        if row is None:
            raise Problem(404, f"no export {export_id}", "not-found")
        call.study_uid, state = row.study_uid, row.state
    call.details["export_id"] = export_id
    if not requeue_export(db, audit, settings, export_id):
        raise Problem(
            409, f"export {export_id} is {state}; only dead exports are retried", "conflict"
        )
    return ActionResult(
        export_id=export_id, action="retry", changed=True, state=ExportState.pending.value
    )
