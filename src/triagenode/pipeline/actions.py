"""Operator actions on a study, shared by the admin API and the CLI.

Each is one transaction on the ``studies`` row: the state change, its history entry
(:class:`~triagenode.store.models.StudyEvent`) and an audit event commit together or not at
all. The tracker and the queue pick the study up from its new state (``stable``).

Both return False when the action does not apply, which the API answers with 409:

- :func:`mark_study_complete` only ends the quiet period of a study that is ``receiving``.
- :func:`reprocess_study` only restarts a study whose processing has ended (``reported``,
  ``failed``, ``ignored`` or ``not_applicable``); a study still waiting or being processed
  will produce a result anyway, and bumping its run under a working worker would make that
  result a stale one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select

from triagenode.audit.events import AuditEventId, AuditLog
from triagenode.domain import Priority, StudyState
from triagenode.pipeline.queue import cancel_pending_jobs
from triagenode.store.db import Database
from triagenode.store.models import Study, StudyEvent, utcnow

__all__ = ["REPROCESSABLE", "mark_study_complete", "reprocess_study"]

log = logging.getLogger(__name__)

# (triage inputs) -> (priority, rule name, label set): TriageRules.prioritize.
Prioritizer = Callable[[dict[str, str]], tuple[Priority, str | None, str | None]]

_DONE = {"reprocess": "reprocess requested", "complete": "marked complete"}
REPROCESSABLE = frozenset(
    {
        StudyState.reported.value,
        StudyState.failed.value,
        StudyState.ignored.value,
        StudyState.not_applicable.value,
    }
)


def _change(
    db: Database,
    audit: AuditLog,
    study_uid: str,
    actor: str,
    action: str,
    allowed_from: frozenset[str],
    prioritizer: Prioritizer | None,
) -> bool:
    with db.write_session() as session:
        # FOR UPDATE on PostgreSQL: two operators reprocessing at once bump the run once.
        study = session.scalar(select(Study).where(Study.study_uid == study_uid).with_for_update())
        if study is None or study.state not in allowed_from:
            return False
        now = utcnow()
        before = study.state
        details: dict[str, object] = {"from_state": before}
        if action == "reprocess":
            study.run += 1
            study.attempts = 0
            study.critical = False  # the new run decides again
            cancelled = cancel_pending_jobs(
                session, study.id, f"superseded by run {study.run}", below_run=study.run
            )
            details.update(run=study.run, cancelled_jobs=cancelled)
        if prioritizer is not None:
            priority, rule, label_set = prioritizer(dict(study.triage_inputs or {}))
            study.priority, study.priority_rule, study.label_set = int(priority), rule, label_set
            details.update(priority=Priority(priority).name, priority_rule=rule)
        study.stable_at = now
        study.state = StudyState.stable.value
        study.state_reason = f"{_DONE[action]} by {actor}"
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
            details=details,
            session=session,
        )
    log.info("study %s: %s by %s (was %s)", study_uid, action, actor, before)
    return True


def reprocess_study(
    db: Database,
    audit: AuditLog,
    study_uid: str,
    actor: str,
    *,
    prioritizer: Prioritizer | None = None,
) -> bool:
    """Classify a finished study again as a new run (so its SR gets a new UID).

    Parameters
    ----------
    db, audit
        The node's database and audit log.
    study_uid
        Study Instance UID.
    actor
        Who asked (API token name or ``cli:<user>``), recorded in the history and audit.
    prioritizer
        When given (``TriageRules.prioritize``), the study is triaged again with the current
        rules; otherwise it keeps its priority.

    Returns
    -------
    bool
        True when the study is now ``stable`` with ``run`` increased and ``attempts`` reset;
        False when it is unknown or not in :data:`REPROCESSABLE`.
    """
    return _change(db, audit, study_uid, actor, "reprocess", REPROCESSABLE, prioritizer)


def mark_study_complete(
    db: Database,
    audit: AuditLog,
    study_uid: str,
    actor: str,
    *,
    prioritizer: Prioritizer | None = None,
) -> bool:
    """End the quiet period of a receiving study now.

    Parameters
    ----------
    db, audit, study_uid, actor
        As for :func:`reprocess_study`.
    prioritizer
        When given, the study is triaged first, so a study completed by hand before the
        tracker looked at it still gets its rule's priority.

    Returns
    -------
    bool
        True when the study was ``receiving`` and is now ``stable``; False otherwise.
    """
    return _change(
        db,
        audit,
        study_uid,
        actor,
        "complete",
        frozenset({StudyState.receiving.value}),
        prioritizer,
    )
