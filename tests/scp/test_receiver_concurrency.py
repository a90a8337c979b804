"""Several senders at once, and a restart in the middle of a study (SQLite and PostgreSQL)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests import factory
from tests.orthanc import orthanc_server
from tests.peers import wait_for
from tests.receiver_fixtures import Node, dataset_part, storescu
from triagenode.pipeline.tracker import StudyTracker
from triagenode.store.models import StudyEvent, utcnow


def test_four_senders_at_once_all_stored(node: Node, tmp_path: Path) -> None:
    # Two studies, each sent by two senders at once, so associations race on the same rows.
    groups = []
    for s in range(2):
        _, paths = factory.ct_study(tmp_path / f"study{s}", slices=100, size=16)
        groups += [paths[0::2], paths[1::2]]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda files: storescu(node.port, files), groups))
    assert all(r.returncode == 0 for r in results), [r.stderr[-300:] for r in results]

    every = [p for group in groups for p in group]
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in every}
    rows = node.instances()
    assert len(rows) == 200 == len({r.sop_instance_uid for r in rows})
    for row in rows[::17]:
        assert dataset_part(node.data_dir / row.file_path) == dataset_part(
            sent[row.sop_instance_uid]
        )
    studies = node.studies()
    assert sorted(s.instance_count for s in studies) == [100, 100]
    assert all(
        s.byte_count == sum(r.size for r in rows if r.file_path.split("/")[1] == s.study_uid)
        for s in studies
    )
    assert node.temp_files() == []


def test_restart_mid_study_becomes_stable_once(node: Node, tmp_path: Path) -> None:
    study_uid, paths = factory.ct_study(tmp_path / "in", slices=8)
    assert storescu(node.port, paths[:5]).returncode == 0
    node.restart()  # a new receiver on the same data folder and database
    assert storescu(node.port, paths[5:]).returncode == 0

    tracker = StudyTracker(node.settings, node.db, node.audit)
    assert tracker.poll() == []  # quiet period (1 s in tests) not over yet
    later = utcnow() + timedelta(seconds=5)
    [study] = node.studies()
    assert tracker.poll(later) == [study.id]
    # A second tracker (another restart) finds nothing more to do.
    assert StudyTracker(node.settings, node.db, node.audit).poll(later) == []
    [study] = node.studies()
    assert study.study_uid == study_uid
    assert study.state == "stable" and study.instance_count == 8 and study.run == 1
    assert len(node.instances()) == 8
    with node.db.session() as session:
        events = session.execute(select(StudyEvent).order_by(StudyEvent.id)).scalars().all()
    assert [e.to_state for e in events] == ["receiving", "stable"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_orthanc_as_pacs_sends_a_study(node: Node, tmp_path: Path) -> None:
    """A PACS pushes a study (Orthanc's /modalities/<name>/store): stored, tracked, stable."""
    study_uid, paths = factory.ct_study(tmp_path / "in", slices=5)
    target = {"node": (node.settings.scp.ae_title, "127.0.0.1", node.port)}
    with orthanc_server(tmp_path / "orthanc", modalities=target) as pacs:
        for path in paths:
            pacs.upload(path)
        assert pacs.echo("node")
        study_id = pacs.find_study(study_uid)
        assert study_id is not None
        pacs.store_to_modality("node", study_id)
        stored = {i.sop_instance_uid: i for i in node.instances()}
        assert len(stored) == 5
        for path in paths:
            sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert (node.data_dir / stored[sop].file_path).is_file()
        assert {i.calling_ae for i in stored.values()} == {"ORTHANC"}
    tracker = StudyTracker(node.settings, node.db, node.audit)
    [study] = wait_for(lambda: tracker.poll(), timeout=10, what="study stable")  # 1 s quiet
    assert node.studies()[0].state == "stable" and node.studies()[0].id == study
