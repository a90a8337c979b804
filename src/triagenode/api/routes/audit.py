"""``/api/v1/audit``: search, verify and export the audit trail (auditor role).

A patient is searched by ID, which the server turns into its HMAC: the ID itself is never
stored, logged or recorded in the event of the search.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select

from triagenode.api.deps import AuditDep, CallAuditDep, DbDep, SettingsDep, require
from triagenode.api.routes._paging import (
    Cursor,
    Limit,
    Offset,
    as_utc,
    decode_cursor,
    encode_cursor,
)
from triagenode.api.schemas import AuditEventOut, Page, VerifyOut
from triagenode.api.tokens import Principal, Role
from triagenode.audit.atna import AuditSource
from triagenode.audit.checkpoint import checkpoint_paths, load_public_key, read_checkpoints
from triagenode.audit.events import AuditEventId, Outcome
from triagenode.audit.export import EXPORT_FORMATS, export_chunks
from triagenode.store.models import AuditEvent

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])
Auditor = Annotated[Principal, Depends(require(Role.auditor, AuditEventId.audit_log_used, "R"))]
_NAMES = {e.value: e.meaning for e in AuditEventId}


def _out(row: AuditEvent) -> AuditEventOut:
    return AuditEventOut(
        seq=row.seq,
        at=row.at,
        event_id=row.event_id,
        event_name=_NAMES.get(row.event_id),
        event_type=row.event_type,
        action=row.action,
        outcome=row.outcome,
        actor=row.actor,
        actor_address=row.actor_address,
        study_uid=row.study_uid,
        patient_ref=row.patient_ref,
        details=row.details,
        prev_hash=row.prev_hash,
        row_hash=row.row_hash,
    )


@router.get("", response_model=Page[AuditEventOut], summary="Search the trail, newest first")
def search(
    db: DbDep,
    audit: AuditDep,
    _: Auditor,
    call: CallAuditDep,
    start: Annotated[datetime | None, Query(alias="from")] = None,
    end: Annotated[datetime | None, Query(alias="to")] = None,
    event_id: Annotated[str | None, Query(max_length=16, description="DCM code")] = None,
    event_type: Annotated[str | None, Query(max_length=64)] = None,
    actor: Annotated[str | None, Query(max_length=128)] = None,
    study_uid: Annotated[str | None, Query(max_length=64)] = None,
    patient_id: Annotated[
        str | None, Query(max_length=64, description="Turned into its HMAC; never stored")
    ] = None,
    outcome: Annotated[int | None, Query(ge=0, le=255, description="0, 4, 8 or 12")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
    cursor: Cursor = None,
) -> Page[AuditEventOut]:
    start, end = as_utc(start, "from"), as_utc(end, "to")
    filters = []
    if start is not None:
        filters.append(AuditEvent.at >= start)
    if end is not None:
        filters.append(AuditEvent.at < end)
    for column, value in (
        (AuditEvent.event_id, event_id),
        (AuditEvent.event_type, event_type),
        (AuditEvent.actor, actor),
        (AuditEvent.study_uid, study_uid),
        (AuditEvent.outcome, outcome),
    ):
        if value is not None:
            filters.append(column == value)
    if patient_id:
        reference = audit.patient_ref(patient_id)
        filters.append(AuditEvent.patient_ref == reference)
        # The search is itself about that patient: record it under the pseudonym.
        call.patient_ref = reference
    call.study_uid = study_uid
    query = select(AuditEvent).where(*filters)
    if cursor:
        (before,) = decode_cursor(cursor, int)
        query = query.where(AuditEvent.seq < before)
        offset = 0
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(AuditEvent).where(*filters)) or 0
        rows = session.scalars(
            query.order_by(AuditEvent.seq.desc()).offset(offset).limit(limit)
        ).all()
        items = [_out(r) for r in rows]
    following = encode_cursor(rows[-1].seq) if len(rows) == limit and rows[-1].seq else None
    call.details.update(count=len(items))
    return Page[AuditEventOut](
        items=items, total=total, limit=limit, offset=offset, next_cursor=following
    )


@router.get("/verify", response_model=VerifyOut, summary="Walk the hash chain")
def verify_chain(
    audit: AuditDep,
    settings: SettingsDep,
    _: Auditor,
    call: CallAuditDep,
    expect_head: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9]+:[0-9a-fA-F]{64}$",
            description="SEQ:HASH of an earlier report: also detects deleted newest rows",
        ),
    ] = None,
) -> VerifyOut:
    anchor = None
    if expect_head:
        seq, digest = expect_head.split(":")
        anchor = (int(seq), digest.lower())
    # The node's own checkpoint file, as `triagenode audit verify` checks it by default: it
    # is what reveals deleted newest rows.
    checkpoint_file, _key, public_path = checkpoint_paths(settings)
    checkpoints, public_key = None, None
    if checkpoint_file.is_file() and public_path.is_file():
        checkpoints, public_key = read_checkpoints(checkpoint_file), load_public_key(public_path)
    report = audit.verify(anchor, checkpoints, public_key)
    call.event_type = "verify"
    call.details.update(ok=report.ok, count=report.count)
    if not report.ok and report.problem is not None:
        audit.record(
            AuditEventId.security_alert,
            event_type="integrity_failure",
            outcome=Outcome.serious_failure,
            actor=call.actor,
            details={
                "kind": report.problem.kind,
                "seq": report.problem.seq,
                "reason": report.problem.message,
            },
        )
    return VerifyOut.model_validate(report.to_dict())


@router.get(
    "/export",
    summary="Export the trail as ATNA XML, RFC 5424 syslog lines or JSON lines",
    response_class=StreamingResponse,
)
def export(
    db: DbDep,
    settings: SettingsDep,
    _: Auditor,
    call: CallAuditDep,
    format: Literal["atna-xml", "syslog", "jsonl"] = "atna-xml",
    start: Annotated[datetime | None, Query(alias="from")] = None,
    end: Annotated[datetime | None, Query(alias="to")] = None,
) -> StreamingResponse:
    call.event_type = "export"
    call.details.update(format=format)
    # checked before the first byte is streamed: a bad filter is a 422, not a cut-off file
    start, end = as_utc(start, "from"), as_utc(end, "to")
    suffix = {"atna-xml": "xml", "syslog": "log", "jsonl": "jsonl"}[format]
    return StreamingResponse(
        export_chunks(db, format, AuditSource.from_settings(settings), start, end),
        media_type=EXPORT_FORMATS[format],
        headers={"Content-Disposition": f'attachment; filename="audit.{suffix}"'},
    )
