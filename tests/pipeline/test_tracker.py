"""Study tracker: quiet periods per priority, triage hook, restarts; the studies CLI."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from triagenode.audit.events import AuditLog
from triagenode.cli import main
from triagenode.domain import Priority
from triagenode.pipeline.tracker import StudyTracker
from triagenode.store.db import Database
from triagenode.store.ingest import InstanceRecord, StudyIngest
from triagenode.store.models import Study, StudyEvent, utcnow

SECRET = b"test-secret-0123456789abcdef"


def receive(db: Database, study_uid: str, n: int = 1, **inputs: str) -> None:
    ingest = StudyIngest(db)
    for i in range(n):
        ingest.record(
            InstanceRecord(
                study_uid=study_uid,
                series_uid=f"{study_uid}.1",
                sop_instance_uid=f"{study_uid}.1.{i + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size=100,
                sha256="0" * 64,
                file_path=f"spool/{study_uid}/x/{i}.dcm",
                calling_ae="CT1",
                received_at=utcnow(),
                triage_inputs=dict(inputs),
            )
        )


def state(db: Database, study_uid: str) -> Study:
    with db.session() as session:
        return session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()


def test_quiet_period_per_priority_from_prioritizer(make_settings: Any, db: Database) -> None:
    settings = make_settings(study={"stable_after_s": 60, "stable_after_by_priority": {"stat": 5}})

    def prioritizer(inputs: dict[str, str]) -> tuple[Priority, str | None, str | None]:
        if inputs.get("StudyDescription") == "CT HEAD STROKE":
            return Priority.stat, "stroke", "head-ct"
        return Priority.routine, None, None

    receive(db, "1.2.1", StudyDescription="CT HEAD STROKE")
    receive(db, "1.2.2", StudyDescription="CT ABDOMEN")
    tracker = StudyTracker(settings, db, AuditLog(db, SECRET), prioritizer)
    stroke = state(db, "1.2.1")
    assert tracker.poll(utcnow()) == []
    assert tracker.poll(utcnow() + timedelta(seconds=10)) == [stroke.id]
    stroke = state(db, "1.2.1")
    assert (stroke.state, stroke.priority, stroke.priority_rule, stroke.label_set) == (
        "stable",
        int(Priority.stat),
        "stroke",
        "head-ct",
    )
    assert state(db, "1.2.2").state == "receiving"
    assert tracker.poll(utcnow() + timedelta(seconds=61)) == [state(db, "1.2.2").id]


def test_new_instance_reopens_and_becomes_stable_again(make_settings: Any, db: Database) -> None:
    settings = make_settings()
    tracker = StudyTracker(settings, db, AuditLog(db, SECRET))
    receive(db, "1.3.1", n=2)
    assert len(tracker.poll(utcnow() + timedelta(seconds=5))) == 1
    receive(db, "1.3.1", n=3)  # instance 3 is new, 1-2 are duplicates
    study = state(db, "1.3.1")
    assert (study.state, study.run, study.instance_count) == ("receiving", 2, 3)
    assert len(tracker.poll(utcnow() + timedelta(seconds=5))) == 1
    with db.session() as session:
        events = session.execute(select(StudyEvent).order_by(StudyEvent.id)).scalars().all()
    assert [e.to_state for e in events] == ["receiving", "stable", "receiving", "stable"]


def test_mark_complete(make_settings: Any, db: Database) -> None:
    tracker = StudyTracker(make_settings(), db, AuditLog(db, SECRET))
    receive(db, "1.4.1")
    assert tracker.mark_complete("1.4.1", "tester")
    assert not tracker.mark_complete("1.4.1", "tester")  # already stable
    assert not tracker.mark_complete("9.9.9", "tester")
    assert state(db, "1.4.1").state == "stable"


@pytest.fixture
def _keep_root_logging() -> Any:
    """main() installs a stderr handler; remove it so later tests do not log to a dead stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("_keep_root_logging")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_studies_cli(
    make_settings: Any, db: Database, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    settings = make_settings(database={"url": db.url})
    receive(db, "1.5.1", n=2)
    receive(db, "1.5.2")
    config = tmp_path / "triagenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{settings.node.data_dir}"\n[database]\nurl = "{db.url}"\n'
        '[audit]\nsecret = "test-secret-0123456789abcdef"\n'
    )
    assert main(["studies", "--config", str(config), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["study_uid"]: r["instances"] for r in rows} == {"1.5.1": 2, "1.5.2": 1}
    assert set(rows[0]) == {
        "study_uid",
        "state",
        "priority",
        "instances",
        "bytes",
        "first_received_at",
        "last_received_at",
        "stable_at",
        "delivery",  # sent, or held by shadow mode (empty before a result exists)
    }
    assert rows[0]["delivery"] == ""
    assert main(["studies", "complete", "1.5.1", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["studies", "--config", str(config), "--state", "stable"]) == 0
    table = capsys.readouterr().out
    assert "1.5.1" in table and "1.5.2" not in table and "STUDY_UID" in table
