"""Rows committed in parallel with their file's fsync: taken back when the file fails or never
arrived (a crash in between), never for an acknowledged instance; SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from tests import factory
from tests.receiver_fixtures import Node, storescu
from triagenode.scp.receiver import DicomReceiver
from triagenode.store import recovery
from triagenode.store.db import Database
from triagenode.store.ingest import InstanceRecord, StudyIngest
from triagenode.store.models import Instance, Study, utcnow
from triagenode.store.spool import IncomingInstance, SpoolError


def _record(sop: str, size: int = 10) -> InstanceRecord:
    return InstanceRecord(
        study_uid="1.9.2",
        series_uid="1.9.2.1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size=size,
        sha256=sop.replace(".", "0").ljust(64, "0"),
        file_path=f"spool/1.9.2/1.9.2.1/{sop}.dcm",
        calling_ae="CT1",
        received_at=utcnow(),
    )


def _counts(db: Database) -> tuple[list[str], int, int]:
    with db.session() as session:
        sops = sorted(session.execute(select(Instance.sop_instance_uid)).scalars())
        study = session.execute(select(Study)).scalar_one()
        return sops, study.instance_count, study.byte_count


def test_early_rows_of_a_failed_file_are_taken_back(db: Database) -> None:
    ingest = StudyIngest(db)
    try:
        first = ingest.submit(_record("1.9.2.1.1"), commit_early=True)
        first.file_durable(True)
        assert first.wait().created_study and not first.committed_early  # new study waits
        second = ingest.submit(_record("1.9.2.1.2", size=7), commit_early=True)
        assert second.wait() is not None and second.committed_early  # before the file
        second.file_durable(False)
        ingest.unrecord(second.item)
    finally:
        ingest.close()
    assert _counts(db) == (["1.9.2.1.1"], 1, 10)


def test_file_failing_after_early_commit_is_refused_without_rows(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, paths = factory.ct_study(tmp_path / "in", slices=3)
    original = IncomingInstance.place
    calls = []

    def place(self: IncomingInstance, study: str, series: str, sop: str) -> bool:
        calls.append(sop)
        if len(calls) == 2:  # the second instance: its rows commit early, then the disk fails
            self.discard()
            raise SpoolError("injected fsync failure", 5)
        return original(self, study, series, sop)

    monkeypatch.setattr(IncomingInstance, "place", place)
    result = storescu(node.port, paths, "-v", "--no-halt")
    assert "Refused: OutOfResources" in result.stderr  # 0xA700
    instances = node.instances()
    assert len(instances) == 2 and calls[1] not in {i.sop_instance_uid for i in instances}
    (study,) = node.studies()
    assert study.instance_count == 2
    assert study.byte_count == sum(i.size for i in instances)
    assert sorted(p.name for p in node.spool_files()) == sorted(
        f"{i.sop_instance_uid}.dcm" for i in instances
    )


def test_restart_after_a_crash_removes_rows_whose_file_never_arrived(
    node: Node, tmp_path: Path
) -> None:
    _, paths = factory.ct_study(tmp_path / "in", slices=4)
    assert storescu(node.port, paths).returncode == 0
    node.receiver.stop()
    # The crash window: the last instance's rows were committed, its rename never became
    # durable (so it was never acknowledged), and the run did not stop cleanly.
    lost = node.instances()[-1]
    (node.data_dir / lost.file_path).unlink()
    recovery.RunMarker(node.data_dir).mark_running()
    node.receiver = DicomReceiver(node.settings, node.db, node.audit)
    node.receiver.start()

    kept = node.instances()
    assert len(kept) == 3 and lost.sop_instance_uid not in {i.sop_instance_uid for i in kept}
    assert all((node.data_dir / i.file_path).is_file() for i in kept)
    (study,) = node.studies()
    assert (study.instance_count, study.byte_count) == (3, sum(i.size for i in kept))
    # The instance can simply be sent again.
    assert storescu(node.port, paths[-1:]).returncode == 0
    assert len(node.instances()) == 4


def test_clean_stop_needs_no_check_and_unreadable_marker_checks_all(tmp_path: Path) -> None:
    marker = recovery.RunMarker(tmp_path)
    assert marker.unclean_since() == (False, None)
    marker.mark_running()
    # another receiver on the same data folder: a live run is not an unclean one
    neighbour = recovery.RunMarker(tmp_path)
    assert neighbour.unclean_since() == (False, None) and neighbour.others_running()
    marker.mark_stopped()
    assert marker.unclean_since() == (False, None)
    assert not neighbour.others_running()
    crashed = recovery.RunMarker(tmp_path)
    crashed.mark_running()
    del crashed  # its process ended without stopping: the marker stays, unlocked
    unclean, since = neighbour.unclean_since()
    assert unclean and since is not None and since < utcnow()
    neighbour.recovered()
    assert neighbour.unclean_since() == (False, None)
    (tmp_path / recovery.RUNNING_MARKER).write_text("garbage")  # the older, single marker
    assert marker.unclean_since() == (True, None)


def test_restart_after_a_crash_removes_files_whose_row_never_committed(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, paths = factory.ct_study(tmp_path / "in", slices=2)
    assert storescu(node.port, paths).returncode == 0
    node.receiver.stop()
    # The crash window of a new study's first instance: its file was renamed into place,
    # its rows never committed, so it was never acknowledged.
    kept = node.instances()
    orphan = node.data_dir / "spool" / "1.2.9" / "1.2.9.1" / "1.2.9.1.1.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes((node.data_dir / kept[0].file_path).read_bytes())
    recovery.RunMarker(node.data_dir).mark_running()
    with caplog.at_level("WARNING", logger="triagenode.store.recovery"):
        node.receiver = DicomReceiver(node.settings, node.db, node.audit)
        node.receiver.start()
    assert not orphan.exists()
    assert "spool/1.2.9/1.2.9.1/1.2.9.1.1.dcm" in caplog.text
    assert "never acknowledged" in caplog.text
    assert [i.sop_instance_uid for i in node.instances()] == [i.sop_instance_uid for i in kept]
    assert all((node.data_dir / i.file_path).is_file() for i in kept)


def test_clean_restart_leaves_the_spool_alone(node: Node, tmp_path: Path) -> None:
    _, paths = factory.ct_study(tmp_path / "in", slices=1)
    assert storescu(node.port, paths).returncode == 0
    before = utcnow() - timedelta(seconds=5)
    stray = node.data_dir / "spool" / "1.2.9" / "1.2.9.1" / "1.2.9.1.1.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"\0")
    node.restart()  # clean stop: no recovery pass
    assert stray.exists()
    # Only files placed since the given time are looked at; files with rows are kept.
    assert recovery.remove_files_without_rows(node.db, node.data_dir, utcnow()) == 0
    assert recovery.remove_files_without_rows(node.db, node.data_dir, before) == 1
    assert not stray.exists() and len(node.spool_files()) == 1


def test_beside_a_live_receiver_recovery_waits_and_spares_its_work(
    db: Database, tmp_path: Path
) -> None:
    """Receivers sharing a data folder: a start after another's crash checks the crashed
    run's work only once a live neighbour's in-flight instances have settled, and only
    what arrived before the start."""
    live = recovery.RunMarker(tmp_path)
    live.mark_running()
    crashed = recovery.RunMarker(tmp_path)
    crashed.mark_running()
    del crashed  # ended without stopping
    ingest = StudyIngest(db)
    try:
        lost = ingest.submit(_record("1.9.2.1.1"), commit_early=True)
        lost.file_durable(True)  # committed; its file never became durable (none on disk)
        lost.wait()
        starting = recovery.RunMarker(tmp_path)
        later = recovery.recover_unclean_runs(db, tmp_path, starting, grace_s=0.3)
        assert later is not None  # deferred: a neighbour is live
        # the neighbour's instance in flight: rows committed, its file not renamed yet
        flying = ingest.submit(_record("1.9.2.1.2"), commit_early=True)
        flying.file_durable(True)
        flying.wait()
    finally:
        ingest.close()
    later.join(10)
    assert _counts(db)[0] == ["1.9.2.1.2"]
    assert starting.unclean_since() == (False, None)  # the crashed run was dealt with
    starting.mark_stopped()
    live.mark_stopped()
