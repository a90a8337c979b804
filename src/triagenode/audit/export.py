"""Audit trail exports: ATNA XML, RFC 5424 syslog lines and JSON lines, by time range."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Literal

from lxml import etree
from sqlalchemy import select

from triagenode.audit.atna import AuditSource, audit_message, defanged
from triagenode.audit.syslog import syslog_line
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

__all__ = ["EXPORT_FORMATS", "ExportFormat", "event_dict", "export_chunks", "iter_events"]

log = logging.getLogger(__name__)

ExportFormat = Literal["atna-xml", "syslog", "jsonl"]
EXPORT_FORMATS: dict[str, str] = {
    "atna-xml": "application/xml",
    "syslog": "text/plain; charset=utf-8",
    "jsonl": "application/x-ndjson",
}


def event_dict(row: Any) -> dict[str, Any]:
    """A row as plain JSON-able data, hashes included so a copy can be re-verified."""
    return {
        "seq": row.seq,
        "at": row.at.isoformat(),
        "event_id": row.event_id,
        "event_type": row.event_type,
        "action": row.action,
        "outcome": row.outcome,
        "actor": row.actor,
        "actor_address": row.actor_address,
        "study_uid": row.study_uid,
        "patient_ref": row.patient_ref,
        "details": row.details,
        "prev_hash": row.prev_hash,
        "row_hash": row.row_hash,
    }


def iter_events(
    db: Database,
    start: datetime | None = None,
    end: datetime | None = None,
    batch: int = 1000,
) -> Iterator[AuditEvent]:
    """Rows with ``start <= at < end`` in chain order, read in batches."""
    after = 0
    while True:
        query = select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq)
        if start is not None:
            query = query.where(AuditEvent.at >= start)
        if end is not None:
            query = query.where(AuditEvent.at < end)
        with db.session() as session:
            rows = session.scalars(query.limit(batch)).all()
        yield from rows
        if len(rows) < batch:
            return
        after = rows[-1].seq or after


def _xml(row: Any, source: AuditSource) -> bytes:
    data: bytes = etree.tostring(audit_message(row, source), encoding="UTF-8")
    return data + b"\n"


def _syslog(row: Any, source: AuditSource) -> bytes:
    return syslog_line(row, source).encode("utf-8") + b"\n"


def _jsonl(row: Any, _source: AuditSource) -> bytes:
    # ASCII escapes keep a lone surrogate (from an old row) from stopping the encoder.
    return json.dumps(event_dict(row), ensure_ascii=True).encode("ascii") + b"\n"


_RENDERERS: dict[str, Callable[[Any, AuditSource], bytes]] = {
    "atna-xml": _xml,
    "syslog": _syslog,
    "jsonl": _jsonl,
}


def export_chunks(
    db: Database,
    fmt: ExportFormat,
    source: AuditSource,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Iterator[bytes]:
    """The export as byte chunks, so large ranges stream instead of filling memory."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(
            f"unknown audit export format {fmt!r}; allowed: {', '.join(EXPORT_FORMATS)}"
        )
    if fmt == "atna-xml":
        yield b'<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages>\n'
    render = _RENDERERS[fmt]
    for row in iter_events(db, start, end):
        try:
            chunk = render(row, source)
        except Exception as exc:  # one row must never cut an export short
            log.error(
                "audit row %s cannot be exported as %s (%s); written defanged",
                row.seq,
                fmt,
                type(exc).__name__,
            )
            chunk = render(defanged(row), source)
        yield chunk
    if fmt == "atna-xml":
        yield b"</AuditMessages>\n"
