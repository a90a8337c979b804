"""Which studies the retention policy purges, and when: only work that is done and exported
(or ignored), never a pending or dead-lettered export, a failed study, or an SR that is the
only copy. Rows made directly on SQLite; times are given, not waited for."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from triagenode.store import migrate
from triagenode.store.db import Database
from triagenode.store.models import Export, Instance, Result, Series, Study
from triagenode.store.retention import RetentionPolicy, execute_purge, plan_purge

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


def _study(
    session,  # type: ignore[no-untyped-def]
    data: Path,
    name: str,
    state: str,
    done_days_ago: float,
    exports: list[tuple[str, float | None]],
    sr: bool = True,
) -> None:
    done = NOW - timedelta(days=done_days_ago)
    study = Study(study_uid=f"1.2.{name}", state=state, state_changed_at=done)
    session.add(study)
    session.flush()
    series = Series(study_id=study.id, series_uid=f"1.2.{name}.1")
    session.add(series)
    session.flush()
    for number in (1, 2):
        relative = f"spool/1.2.{name}/1.2.{name}.1/{number}.dcm"
        (data / relative).parent.mkdir(parents=True, exist_ok=True)
        (data / relative).write_bytes(b"x" * 10)
        session.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=f"1.2.{name}.1.{number}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size=10,
                sha256="0" * 64,
                file_path=relative,
            )
        )
    if not sr:
        return
    sr_relative = f"results/1.2.{name}/sr.dcm"
    (data / sr_relative).parent.mkdir(parents=True, exist_ok=True)
    (data / sr_relative).write_bytes(b"sr")
    result = Result(
        study_id=study.id, run=1, model_name="m", model_version="v", weights_sha256="0" * 64,
        backend="torch", label_set="chest", findings={}, sr_path=sr_relative, created_at=done,
    )  # fmt: skip
    session.add(result)
    session.flush()
    for index, (state_, sent_days_ago) in enumerate(exports):
        sent_at = None if sent_days_ago is None else NOW - timedelta(days=sent_days_ago)
        session.add(
            Export(
                result_id=result.id, study_uid=study.study_uid, destination=f"d{index}",
                sop_instance_uid=f"1.2.{name}.9", file_path=sr_relative, state=state_,
                sent_at=sent_at,
            )
        )  # fmt: skip


@pytest.fixture
def world(tmp_path: Path) -> tuple[Database, Path]:
    data = tmp_path / "data"
    data.mkdir()
    db = Database(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    migrate.upgrade(db)
    with db.session() as session:
        _study(session, data, "sent", "reported", 20, [("sent", 10), ("sent", 12)])
        _study(session, data, "recent", "reported", 3, [("sent", 2)])
        _study(session, data, "pending", "reported", 20, [("sent", 10), ("pending", None)])
        _study(session, data, "dead", "reported", 20, [("dead", None)])
        _study(session, data, "failed", "failed", 20, [], sr=False)
        _study(session, data, "ignored", "ignored", 20, [], sr=False)
        _study(session, data, "nodest", "reported", 20, [])
    yield db, data
    db.dispose()


def _planned(db: Database, spool: float | None, results: float | None) -> dict[str, tuple]:
    items = plan_purge(db, RetentionPolicy(spool, results), NOW)
    return {i.study_uid.removeprefix("1.2."): (len(i.spool_files), len(i.sr_files)) for i in items}


def test_only_done_and_exported_work_is_purged(world: tuple[Database, Path]) -> None:
    db, _ = world
    # 5 days: the study sent 10 days ago (last export counts, not the first) and the ignored
    # one; the SR never exported (no destination) keeps its SR but not its images
    assert _planned(db, 5, 5) == {"sent": (2, 1), "ignored": (2, 0), "nodest": (2, 0)}
    assert _planned(db, 11, 11) == {"ignored": (2, 0), "nodest": (2, 0)}
    assert _planned(db, 1, None) == {
        "sent": (2, 0), "recent": (2, 0), "ignored": (2, 0), "nodest": (2, 0)
    }  # fmt: skip
    assert _planned(db, None, 1) == {"sent": (0, 1), "recent": (0, 1)}
    assert _planned(db, None, None) == {}


def test_purge_deletes_files_and_is_repeatable(world: tuple[Database, Path]) -> None:
    db, data = world
    policy = RetentionPolicy(5, 5)
    audited: list[str] = []
    (item,) = [i for i in plan_purge(db, policy, NOW) if i.study_uid == "1.2.sent"]
    (data / item.spool_files[0][1]).unlink()  # as if a crash had come between files and rows
    counts = execute_purge(db, data, item, policy, lambda _s, i: audited.append(i.study_uid))
    assert counts == {"spool_files": 2, "spool_bytes": 20, "sr_files": 1, "files_deleted": 2}
    assert audited == ["1.2.sent"]
    assert not (data / "spool" / "1.2.sent").exists()
    assert not (data / "results" / "1.2.sent").exists()
    assert (data / "spool" / "1.2.pending").exists()
    assert "sent" not in _planned(db, 5, 5)


def test_a_path_outside_the_data_folder_is_refused(world: tuple[Database, Path]) -> None:
    db, data = world
    (item,) = [i for i in plan_purge(db, RetentionPolicy(5, None), NOW) if "ignored" in i.study_uid]
    item.spool_files[0] = (item.spool_files[0][0], "../outside.dcm", 1)
    (data.parent / "outside.dcm").write_bytes(b"keep")
    with pytest.raises(ValueError, match="outside the data folder"):
        execute_purge(db, data, item, RetentionPolicy(5, None))
    assert (data.parent / "outside.dcm").exists()
