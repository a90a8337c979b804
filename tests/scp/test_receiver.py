"""The receiver with real DCMTK peers, on SQLite and PostgreSQL: bytes, rows, audit, logs."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests import factory
from tests.factory import pydicom_test_file as get_testdata_file
from tests.peers import wait_for
from tests.receiver_fixtures import Node, dataset_part, dcmtk_wire_datasets, echoscu, storescu
from triagenode.audit.events import AuditEventId
from triagenode.domain import StudyState
from triagenode.store.models import AuditEvent, Series, StudyEvent


def test_echo(node: Node) -> None:
    result = echoscu(node.port)
    assert result.returncode == 0, result.stderr


def test_study_is_stored_byte_for_byte_with_rows(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    study_uid, paths = factory.ct_study(tmp_path / "in", slices=6, series=2)
    result = storescu(node.port, paths)
    assert result.returncode == 0, result.stderr

    instances = {i.sop_instance_uid: i for i in node.instances()}
    assert len(instances) == len(paths)
    for path in paths:
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        row = instances[sent.SOPInstanceUID]
        stored = node.data_dir / row.file_path
        assert row.file_path == (
            f"spool/{study_uid}/{sent.SeriesInstanceUID}/{sent.SOPInstanceUID}.dcm"
        )
        assert dataset_part(stored) == dataset_part(path)
        assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert row.size == stored.stat().st_size
        assert row.sop_class_uid == sent.SOPClassUID
        assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
        assert row.calling_ae == "STORESCU"
        assert row.instance_number == sent.InstanceNumber
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert node.temp_files() == []

    [study] = node.studies()
    assert study.study_uid == study_uid
    assert study.state == StudyState.receiving.value
    assert study.instance_count == len(paths)
    assert study.byte_count == sum(i.size for i in instances.values())
    assert study.modality == "CT"
    assert study.patient_ref == node.audit.patient_ref(factory.PATIENT_ID)
    assert study.patient_ref != factory.PATIENT_ID
    assert study.triage_inputs["BodyPartExamined"] == "HEAD"
    assert study.triage_inputs["CallingAETitle"] == "STORESCU"
    with node.db.session() as session:
        assert len(session.execute(select(Series)).all()) == 2
        events = session.execute(select(StudyEvent)).scalars().all()
        assert [(e.from_state, e.to_state) for e in events] == [(None, "receiving")]

    def transfer_events() -> list[AuditEvent]:
        with node.db.session() as session:
            query = select(AuditEvent).where(
                AuditEvent.event_id == AuditEventId.instances_transferred.value
            )
            return list(session.execute(query).scalars())

    # Written when the association's thread finishes, just after storescu exits.
    audit = wait_for(transfer_events, timeout=10, what="audit event")
    # One event per study per association, not per instance.
    assert len(audit) == 1
    assert audit[0].study_uid == study_uid
    assert audit[0].details["instances"] == len(paths)
    assert audit[0].actor == "STORESCU"

    wait_for(lambda: "association released" in caplog.text, timeout=10, what="summary log")
    text = caplog.text
    assert "association released calling_ae=STORESCU" in text
    assert f"instances={len(paths)}" in text
    for phi in (factory.PATIENT_NAME, factory.PATIENT_ID, factory.BIRTH_DATE, "ACC-5521-QX"):
        assert phi not in text


def test_duplicate_keeps_newer_copy_and_counts_it(node: Node, tmp_path: Path) -> None:
    study_uid = pydicom.uid.generate_uid()
    first = factory.ct_slice(study_uid, pydicom.uid.generate_uid(), 0, seed=1)
    path = factory.write(first, tmp_path / "a.dcm")
    assert storescu(node.port, [path]).returncode == 0
    newer = factory.ct_slice(study_uid, first.SeriesInstanceUID, 0, seed=2)
    newer.SOPInstanceUID = first.SOPInstanceUID
    newer_path = factory.write(newer, tmp_path / "b.dcm")
    assert storescu(node.port, [newer_path]).returncode == 0

    [row] = node.instances()
    assert row.replaced_count == 1 and row.replaced_at is not None
    assert dataset_part(node.data_dir / row.file_path) == dataset_part(newer_path)
    [study] = node.studies()
    assert study.instance_count == 1
    assert study.byte_count == row.size


@pytest.mark.parametrize("moved_to", ["another series", "another study"])
def test_a_duplicate_stored_elsewhere_leaves_no_older_file_behind(
    node: Node, tmp_path: Path, moved_to: str
) -> None:
    """Re-sent under another series or study, the row follows the new copy and the older
    file is deleted: nothing of the instance stays on disk untracked."""
    first = factory.ct_slice(pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 0, seed=1)
    assert storescu(node.port, [factory.write(first, tmp_path / "a.dcm")]).returncode == 0
    [old] = node.instances()
    study_uid = (
        pydicom.uid.generate_uid() if moved_to == "another study" else first.StudyInstanceUID
    )
    moved = factory.ct_slice(study_uid, pydicom.uid.generate_uid(), 0, seed=2)
    moved.SOPInstanceUID = first.SOPInstanceUID
    assert storescu(node.port, [factory.write(moved, tmp_path / "b.dcm")]).returncode == 0
    [row] = node.instances()
    assert row.file_path != old.file_path and row.replaced_count == 1
    assert node.spool_files() == [node.data_dir / row.file_path]


def test_instance_after_stable_reopens_study(node: Node, tmp_path: Path) -> None:
    from triagenode.pipeline.tracker import StudyTracker

    study_uid, paths = factory.ct_study(tmp_path / "in", slices=3)
    assert storescu(node.port, paths[:2]).returncode == 0
    tracker = StudyTracker(node.settings, node.db, node.audit)
    assert tracker.mark_complete(study_uid, "test")
    assert storescu(node.port, paths[2:]).returncode == 0
    [study] = node.studies()
    assert study.state == StudyState.receiving.value
    assert study.run == 2
    assert study.instance_count == 3
    assert study.stable_at is None
    with node.db.session() as session:
        events = session.execute(select(StudyEvent).order_by(StudyEvent.id)).scalars().all()
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, "receiving"),
        ("receiving", "stable"),
        ("stable", "receiving"),
    ]


# pydicom's bundled files and the storescu option that proposes each one's transfer syntax.
COMPRESSED = {
    "SC_rgb_jpeg_dcmtk.dcm": "-xy",  # JPEG baseline
    "SC_rgb_jpeg_gdcm.dcm": "-xs",  # JPEG lossless SV1
    "JPEG2000.dcm": "-xw",  # JPEG 2000
    "MR_small_jp2klossless.dcm": "-xv",  # JPEG 2000 lossless
    "MR_small_RLE.dcm": "-xr",  # RLE lossless
    "MR_small_jpeg_ls_lossless.dcm": "-xt",  # JPEG-LS lossless
}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_compressed_inputs_stored_unchanged(node: Node, tmp_path: Path) -> None:
    for name, option in COMPRESSED.items():
        path = Path(get_testdata_file(name))
        # -R proposes only what the file needs, so storescu never decompresses.
        result = storescu(node.port, [path], "-R", option)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        sent = pydicom.dcmread(path, stop_before_pixels=True)
        [row] = [i for i in node.instances() if i.sop_instance_uid == sent.SOPInstanceUID]
        assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID, name
        wire = dcmtk_wire_datasets([path], tmp_path / name, "-R", option)
        stored = dataset_part(node.data_dir / row.file_path)
        assert stored == wire[sent.SOPInstanceUID], name
        # Still compressed: the pixel data is the sender's codestream, untouched.
        assert pydicom.dcmread(node.data_dir / row.file_path).PixelData == sent_pixels(path), name


def sent_pixels(path: Path) -> bytes:
    return pydicom.dcmread(path).PixelData
