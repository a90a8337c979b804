"""Operator actions on a study, shared by the admin API and the CLI.

These are plain state changes of the ``studies`` row, each with its history entry and an
audit event in the same transaction; the tracker and the queue pick the study up from its
new state.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from triagenode.audit.events import AuditEventId, AuditLog
from triagenode.domain import StudyState
from triagenode.store.db import Database
from triagenode.store.models import Study, StudyEvent, utcnow

__all__ = ["mark_study_complete", "reprocess_study"]

log = logging.getLogger(__name__)


def _change(
    db: Database,
    audit: AuditLog,
    study_uid: str,
    actor: str,
    action: str,
    only_from: set[str] | None,
) -> bool:
    with db.write_session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None or (only_from is not None and study.state not in only_from):
            return False
        now = utcnow()
        before = study.state
        if action == "reprocess":
            study.run += 1
            study.attempts = 0
        else:
            study.stable_at = now
        study.state = StudyState.stable.value
        study.state_reason = f"{action} by {actor}"
        study.state_changed_at = now
        session.add(
            StudyEvent(
                study_id=study.id,
                at=now,
                from_state=before,
                to_state=study.state,
                reason=study.state_reason,
            )
        )
        audit.record(
            AuditEventId.instances_accessed,
            event_type=action,
            action="U",
            actor=actor,
            study_uid=study_uid,
            patient_ref=study.patient_ref,
            details={"from_state": before, "run": study.run},
            session=session,
        )
    log.info("study %s: %s by %s (was %s)", study_uid, action, actor, before)
    return True


def reprocess_study(db: Database, audit: AuditLog, study_uid: str, actor: str) -> bool:
    """Classify the study again as a new run (a new SR UID); False when it is unknown."""
    return _change(db, audit, study_uid, actor, "reprocess", None)


def mark_study_complete(db: Database, audit: AuditLog, study_uid: str, actor: str) -> bool:
    """End the quiet period of a receiving study now; False unless it is receiving."""
    return _change(db, audit, study_uid, actor, "complete", {StudyState.receiving.value})
