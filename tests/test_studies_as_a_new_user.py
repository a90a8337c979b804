"""The node tried as a new user would: real-world kinds of studies through the whole node.

Each study is sent with DCMTK ``storescu`` to a running node (demo model, SQLite). Each must
end either classified with a sensible label set and a dciodvfy-clean SR, or recorded as
``not_applicable`` with the reason, an audit event and no SR: never chest findings on an
ultrasound, a mammogram or a hand radiograph.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests import factory
from tests.peers import run_tool, wait_for
from tests.test_end_to_end import send_to_node
from triagenode.metrics import STUDIES_PROCESSED
from triagenode.node import Node
from triagenode.store.models import AuditEvent, Result, Study

pytestmark = pytest.mark.slow

DIGITAL_MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"


def _charset_cr(name: str, folder: Path) -> Path:
    """pydicom's Japanese/Korean CR header (names in ISO 2022) with pixels added."""
    [source] = get_charset_files(name)
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in "abc")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(3).integers(0, 4096, (32, 32), np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    path = folder / f"{name}"
    ds.save_as(path, enforce_file_format=True)
    return path


def _studies(folder: Path) -> dict[str, tuple[list[Path], str | None]]:
    """name -> (files, expected label set or None for not_applicable)."""
    folder.mkdir(parents=True)
    hand = factory.cr_image(BodyPartExamined="HAND", StudyDescription="XR HAND LEFT 3 VIEWS")
    mammo = factory.cr_image(BodyPartExamined="BREAST", StudyDescription="MAMMO SCREENING")
    mammo.SOPClassUID, mammo.Modality = DIGITAL_MAMMOGRAPHY, "MG"
    stored = np.random.default_rng(1).integers(-1024, 1500, (6, 48, 48))
    enhanced = factory.enhanced_ct(stored)  # chest CT in Enhanced CT Image Storage
    ultrasound = folder / "us.dcm"
    shutil.copy(factory.pydicom_test_file("examples_rgb_color.dcm"), ultrasound)
    return {
        "chest CR": ([factory.write(factory.cr_image(), folder / "cr.dcm")], "chest_xray"),
        "hand CR": ([factory.write(hand, folder / "hand.dcm")], None),
        "mammogram": ([factory.write(mammo, folder / "mg.dcm")], None),
        "ultrasound": ([ultrasound], None),
        "enhanced CT": ([factory.write(enhanced, folder / "ect.dcm")], "ct_chest"),
        "Japanese CR": ([_charset_cr("chrJapMulti.dcm", folder)], "chest_xray"),
        "Korean CR": ([_charset_cr("chrKoreanMulti.dcm", folder)], "chest_xray"),
    }


@pytest.fixture
def node(make_settings, tmp_path: Path) -> Iterator[Node]:
    settings = make_settings(api={"enabled": False}, study={"stable_after_s": 0.3})
    running = Node.build(settings)
    running.start()
    yield running
    running.stop()


def test_each_study_gets_a_sensible_label_set_or_a_recorded_not_applicable(
    node: Node, tmp_path: Path
) -> None:
    settings = node.settings
    studies = _studies(tmp_path / "in")
    not_applicable_before = STUDIES_PROCESSED.labels("not_applicable", "routine")._value.get()
    uids = {}
    for name, (paths, _expected) in studies.items():
        send_to_node(settings, paths)
        uids[name] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)

    def finished() -> dict[str, Study] | None:
        with node.db.session() as session:
            rows = {s.study_uid: s for s in session.execute(select(Study)).scalars()}
        done = {"reported", "not_applicable", "failed", "ignored"}
        if len(rows) == len(uids) and all(r.state in done for r in rows.values()):
            return rows
        return None

    rows = wait_for(finished, timeout=180, what="every study processed")
    with node.db.session() as session:
        results = {r.study_id: r for r in session.execute(select(Result)).scalars()}
        events = list(
            session.execute(
                select(AuditEvent).where(AuditEvent.event_type == "not-applicable")
            ).scalars()
        )
    for name, (_paths, expected) in studies.items():
        study = rows[uids[name]]
        if expected is None:
            assert study.state == "not_applicable", (name, study.state, study.state_reason)
            assert "no domain rule fits" in (study.state_reason or "")
            assert study.id not in results, f"{name}: an SR was made"
            assert any(e.study_uid == uids[name] for e in events), name
            continue
        assert study.state == "reported", (name, study.state, study.state_reason)
        result = results[study.id]
        assert result.label_set == expected, name
        sr = settings.node.data_dir / result.sr_path
        check = run_tool("dciodvfy", str(sr))
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], f"{name}: {errors}"
        if name in ("Japanese CR", "Korean CR"):
            written = pydicom.dcmread(sr)
            assert written.SpecificCharacterSet == "ISO_IR 192"
            assert str(written.PatientName) == str(
                pydicom.dcmread(studies[name][0][0], stop_before_pixels=True).PatientName
            )
    after = STUDIES_PROCESSED.labels("not_applicable", "routine")._value.get()
    assert after - not_applicable_before == 3


def test_reprocessing_writes_the_next_sr_of_the_series_referencing_the_first(
    node: Node, tmp_path: Path
) -> None:
    from triagenode.pipeline.actions import reprocess_study

    settings = node.settings
    path = factory.write(factory.cr_image(), tmp_path / "cr.dcm")
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    send_to_node(settings, [path])

    def results(count: int) -> list[Result] | None:
        with node.db.session() as session:
            rows = list(session.execute(select(Result).order_by(Result.run)).scalars())
        return rows if len(rows) == count else None

    [first] = wait_for(lambda: results(1), timeout=120, what="first result")
    assert reprocess_study(node.db, node.audit, study_uid, "test")
    _, second = wait_for(lambda: results(2), timeout=120, what="second result")
    old = pydicom.dcmread(settings.node.data_dir / first.sr_path)
    new = pydicom.dcmread(settings.node.data_dir / second.sr_path)
    assert new.SeriesInstanceUID == old.SeriesInstanceUID
    assert (old.InstanceNumber, new.InstanceNumber) == (1, 2)
    [predecessor] = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert second.findings["supersedes"] == old.SOPInstanceUID
    assert "supersedes" not in first.findings
