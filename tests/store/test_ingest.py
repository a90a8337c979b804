"""Instance rows through the group-committing writer, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from triagenode.errors import StorageError
from triagenode.store.db import Database
from triagenode.store.ingest import InstanceRecord, StudyIngest
from triagenode.store.models import Instance, Study, utcnow


def record(sop: str, study: str = "1.9.1", size: int = 10) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size=size,
        sha256="a" * 64,
        file_path=f"spool/{study}/{study}.1/{sop}.dcm",
        calling_ae="CT1",
        received_at=utcnow(),
        modality="CT",
        triage_inputs={"Modality": "CT"},
    )


def test_a_file_that_failed_rolls_back_only_its_rows(db: Database) -> None:
    ingest = StudyIngest(db)
    try:
        pending = [ingest.submit(record(f"1.9.1.1.{i}")) for i in range(3)]
        for i, p in enumerate(pending):
            p.file_durable(i != 1)  # the second instance's file could not be stored
        assert pending[0].wait().created_study
        with pytest.raises(StorageError):
            pending[1].wait()
        assert not pending[2].wait().replaced
    finally:
        ingest.close()
    with db.session() as session:
        sops = session.execute(select(Instance.sop_instance_uid)).scalars().all()
        study = session.execute(select(Study)).scalar_one()
    assert sorted(sops) == ["1.9.1.1.0", "1.9.1.1.2"]
    assert (study.instance_count, study.byte_count) == (2, 20)


def test_duplicate_updates_the_one_row(db: Database) -> None:
    ingest = StudyIngest(db)
    try:
        ingest.record(record("1.9.2.1", study="1.9.2", size=10))
        outcome = ingest.record(record("1.9.2.1", study="1.9.2", size=30))
    finally:
        ingest.close()
    assert outcome.replaced
    with db.session() as session:
        [row] = session.execute(select(Instance)).scalars().all()
        study = session.execute(select(Study)).scalar_one()
    assert (row.size, row.replaced_count) == (30, 1)
    assert (study.instance_count, study.byte_count) == (1, 30)


def test_stale_cached_series_is_recovered(db: Database) -> None:
    from sqlalchemy import text

    ingest = StudyIngest(db)
    try:
        ingest.record(record("1.9.3.1", study="1.9.3"))
        with db.engine.begin() as connection:  # an operator removed the series meanwhile
            connection.execute(text("DELETE FROM instances"))
            connection.execute(
                text("INSERT INTO series (study_id, series_uid) SELECT id, 'x' FROM studies")
            )
            connection.execute(text("DELETE FROM series WHERE series_uid <> 'x'"))
        outcome = ingest.record(record("1.9.3.2", study="1.9.3"))
    finally:
        ingest.close()
    with db.session() as session:
        [row] = session.execute(select(Instance)).scalars().all()
    assert row.series_id == outcome.series_id


def _finish(db: Database, study_uid: str) -> None:
    """Mark a study reported, as the pipeline does after its SR."""
    with db.session() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        study.state = "reported"


def test_identical_resend_does_not_reopen_a_reported_study(db: Database) -> None:
    ingest = StudyIngest(db)
    try:
        ingest.record(record("1.9.4.1", study="1.9.4"))
        _finish(db, "1.9.4")
        again = ingest.record(record("1.9.4.1", study="1.9.4"))  # same bytes from the PACS
        assert again.replaced and again.reopened_from is None
        changed = record("1.9.4.1", study="1.9.4")
        changed = InstanceRecord(**{**changed.__dict__, "sha256": "b" * 64})
        reopened = ingest.record(changed)  # new content: the work must be redone
    finally:
        ingest.close()
    assert reopened.reopened_from == "reported"
    with db.session() as session:
        study = session.execute(select(Study)).scalar_one()
    assert (study.state, study.run, study.instance_count) == ("receiving", 2, 1)


def test_own_sr_coming_back_does_not_reopen_the_study(db: Database) -> None:
    from triagenode.store.models import Result

    ingest = StudyIngest(db)
    try:
        ingest.record(record("1.9.5.1", study="1.9.5"))
        _finish(db, "1.9.5")
        with db.session() as session:
            study_id = session.execute(select(Study.id)).scalar_one()
            session.add(
                Result(
                    study_id=study_id,
                    run=1,
                    model_name="demo",
                    model_version="1",
                    weights_sha256="c" * 64,
                    backend="torch",
                    label_set="ct",
                    findings={},
                    sr_sop_instance_uid="1.9.5.99.1",
                )
            )
        sr = record("1.9.5.99.1", study="1.9.5")
        sr = InstanceRecord(
            **{
                **sr.__dict__,
                "series_uid": "1.9.5.99",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
            }
        )
        outcome = ingest.record(sr)
    finally:
        ingest.close()
    assert outcome.reopened_from is None
    with db.session() as session:
        study = session.execute(select(Study)).scalar_one()
    assert (study.state, study.run, study.instance_count) == ("reported", 1, 2)
