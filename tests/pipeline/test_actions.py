"""Operator actions: mark a study complete, reprocess it; history, audit, queue effects."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from triagenode.audit.events import AuditLog
from triagenode.config.triage import TriageSettings
from triagenode.domain import Priority, StudyState
from triagenode.pipeline.actions import mark_study_complete, reprocess_study
from triagenode.pipeline.queue import JobQueue
from triagenode.pipeline.triage import TriageRules
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent, Job, Study, StudyEvent

UID = "1.2.826.0.1.3680043.10.5.1"


@pytest.fixture
def audit(db: Database) -> AuditLog:
    return AuditLog(db, b"actions-test-secret-0123456789")


def add_study(db: Database, state: StudyState, **values: object) -> int:
    with db.session() as session:
        study = Study(study_uid=UID, state=state.value, patient_ref="ab" * 32, **values)
        session.add(study)
        session.flush()
        return study.id


def study_row(db: Database) -> Study:
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == UID))
        assert study is not None
        return study


def history(db: Database) -> list[StudyEvent]:
    with db.session() as session:
        return list(session.scalars(select(StudyEvent).order_by(StudyEvent.id)))


def audit_events(db: Database) -> list[AuditEvent]:
    with db.session() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def test_mark_complete_makes_a_receiving_study_stable(db: Database, audit: AuditLog) -> None:
    add_study(db, StudyState.receiving)
    assert mark_study_complete(db, audit, UID, "operator-1")
    study = study_row(db)
    assert study.state == "stable" and study.stable_at is not None
    assert study.state_reason == "marked complete by operator-1"
    [event] = history(db)
    assert (event.from_state, event.to_state) == ("receiving", "stable")
    [record] = audit_events(db)
    assert record.event_id == "110103" and record.event_type == "complete"
    assert record.actor == "operator-1" and record.study_uid == UID
    assert record.patient_ref == "ab" * 32 and record.action == "U"


@pytest.mark.parametrize("state", [StudyState.stable, StudyState.queued, StudyState.reported])
def test_mark_complete_refuses_other_states(
    db: Database, audit: AuditLog, state: StudyState
) -> None:
    add_study(db, state)
    assert not mark_study_complete(db, audit, UID, "operator-1")
    assert study_row(db).state == state.value
    assert history(db) == [] and audit_events(db) == []


def test_unknown_study_is_refused(db: Database, audit: AuditLog) -> None:
    assert not mark_study_complete(db, audit, "1.2.3.4", "operator-1")
    assert not reprocess_study(db, audit, "1.2.3.4", "operator-1")
    assert audit_events(db) == []


def test_mark_complete_can_triage_first(db: Database, audit: AuditLog) -> None:
    inputs = {"Modality": "CT", "StudyDescription": "CODE STROKE"}
    add_study(db, StudyState.receiving, triage_inputs=inputs)
    rules = TriageRules(TriageSettings())
    assert mark_study_complete(db, audit, UID, "op", prioritizer=rules.prioritize)
    study = study_row(db)
    assert (study.priority, study.priority_rule) == (int(Priority.stat), "code-stroke")
    assert audit_events(db)[0].details["priority"] == "stat"  # type: ignore[index]


@pytest.mark.parametrize("state", [StudyState.reported, StudyState.failed, StudyState.ignored])
def test_reprocess_starts_a_new_run(
    db: Database, audit: AuditLog, make_settings, state: StudyState
) -> None:  # type: ignore[no-untyped-def]
    study_id = add_study(db, state, run=2, attempts=3, critical=True)
    queue = JobQueue(db, make_settings())
    stale = queue.enqueue(study_id, Priority.routine, 2)  # e.g. left behind by a crash
    assert reprocess_study(db, audit, UID, "admin")
    study = study_row(db)
    assert (study.state, study.run, study.attempts, study.critical) == ("stable", 3, 0, False)
    assert study.state_reason == "reprocess requested by admin"
    [event] = history(db)
    assert (event.from_state, event.to_state) == (state.value, "stable")
    [record] = audit_events(db)
    assert record.event_type == "reprocess"
    assert record.details == {"from_state": state.value, "run": 3, "cancelled_jobs": 1}
    with db.session() as session:
        job = session.get(Job, stale)
        assert job is not None and job.state == "cancelled"
    # The new run is queued as new work, not deduplicated against the old run.
    assert queue.enqueue(study_id, Priority.routine, 3) != stale


@pytest.mark.parametrize(
    "state",
    [StudyState.receiving, StudyState.stable, StudyState.queued, StudyState.processing],
)
def test_reprocess_refuses_unfinished_studies(
    db: Database, audit: AuditLog, state: StudyState
) -> None:
    add_study(db, state)
    assert not reprocess_study(db, audit, UID, "admin")
    assert study_row(db).run == 1 and audit_events(db) == []


def test_reprocess_twice_needs_the_first_to_finish(db: Database, audit: AuditLog) -> None:
    add_study(db, StudyState.reported)
    assert reprocess_study(db, audit, UID, "a")
    assert not reprocess_study(db, audit, UID, "b")  # now stable: the first one is pending
    assert study_row(db).run == 2
