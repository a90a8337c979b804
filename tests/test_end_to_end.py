"""The whole node against Orthanc as the PACS: receive → stable → classify → SR → export.

Orthanc sends a study to the node (``/modalities/<name>/store``); the node classifies it with
the demo model and sends its SR back; the test reads the SR from Orthanc.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit
from sqlalchemy import select

from tests import factory
from tests.orthanc import OrthancServer
from tests.peers import free_port, run_tool, wait_for
from triagenode.config.settings import Settings
from triagenode.domain import DEMO_WARNING
from triagenode.node import Node
from triagenode.reports import summarize_sr
from triagenode.store.models import Export, Job, Result, Study

pytestmark = pytest.mark.slow

SR_MODALITY = "SR"


def node_settings(
    make_settings, pacs: OrthancServer | None, *, pacs_port: int | None = None, **sections
) -> Settings:
    destination = {
        "name": "pacs",
        "ae_title": pacs.ae_title if pacs else "ORTHANC",
        "host": "127.0.0.1",
        "port": pacs.dicom_port if pacs else pacs_port,
    }
    sections.setdefault("api", {"enabled": False})
    return make_settings(
        destinations=[destination],
        export={"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "max_attempts": 50},
        **sections,
    )


@pytest.fixture
def running() -> Iterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        node.stop()


def start_node(settings: Settings, running: list[Node]) -> Node:
    node = Node.build(settings)
    node.start()
    running.append(node)
    return node


def send_to_node(settings: Settings, paths: list[Path], *options: str) -> None:
    """C-STORE ``paths`` to the node with DCMTK storescu over one association."""
    sent = run_tool(
        "storescu",
        *options,
        "-aec",
        settings.scp.ae_title,
        "127.0.0.1",
        str(settings.scp.port),
        *map(str, paths),
    )
    assert sent.returncode == 0, sent.stderr


def sr_instances(pacs: OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    found = []
    for instance in pacs.study_instances(study_uid):
        ds = pydicom.dcmread(io.BytesIO(pacs.download(instance["ID"])))
        if ds.Modality == SR_MODALITY:
            found.append(ds)
    return found


def test_orthanc_sends_study_and_receives_sr(make_settings, tmp_path: Path, running) -> None:
    node_port = free_port()
    pacs = OrthancServer(
        tmp_path / "orthanc", modalities={"triagenode": ("TRIAGENODE", "127.0.0.1", node_port)}
    ).start()
    try:
        settings = node_settings(make_settings, pacs, scp={"port": node_port})
        node = start_node(settings, running)
        study_uid, paths = factory.ct_study(tmp_path / "ct", slices=12)
        uploaded = [pacs.upload(p) for p in paths]
        orthanc_study = uploaded[0]["ParentStudy"]
        pacs.store_to_modality("triagenode", orthanc_study)

        srs = wait_for(lambda: sr_instances(pacs, study_uid), timeout=120, what="SR in Orthanc")
        assert len(srs) == 1
        sr = srs[0]
        assert sr.StudyInstanceUID == study_uid
        assert sr.PatientID == factory.PATIENT_ID  # same patient, same study in the PACS
        assert "DEMO" in sr.SeriesDescription
        assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
        referenced = {
            item.ReferencedSOPInstanceUID
            for study_item in sr.CurrentRequestedProcedureEvidenceSequence
            for series_item in study_item.ReferencedSeriesSequence
            for item in series_item.ReferencedSOPSequence
        }
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
        assert referenced and referenced <= sent

        with node.db.session() as session:
            study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
            result = session.execute(select(Result).where(Result.study_id == study.id)).scalar_one()
            assert study.state == "reported"
            assert study.instance_count == 12
            assert result.sr_sop_instance_uid == sr.SOPInstanceUID
            assert result.is_demo
            assert result.findings["warning"] == DEMO_WARNING
            stored_findings = result.findings["findings"]
        # The SR Orthanc holds says what the node decided: same labels, codes, scores,
        # present/absent, and image references among the images sent.
        summary = summarize_sr(sr)
        assert [f.name for f in summary.findings] == [f["name"] for f in stored_findings]
        for in_sr, decided in zip(summary.findings, stored_findings, strict=True):
            assert in_sr.code_value == decided["code"]["value"]
            assert in_sr.present == decided["present"]
            assert in_sr.score == pytest.approx(decided["score"], abs=1e-6)
            assert {uid for uid, _ in in_sr.images} <= sent
        # dsrdump reads the SR Orthanc holds without complaint
        sr_file = tmp_path / "sr.dcm"
        sr.save_as(sr_file)
        dump = run_tool("dsrdump", str(sr_file))
        assert dump.returncode == 0, dump.stderr
    finally:
        pacs.stop()


def test_destination_down_then_node_restarts_then_pacs_up(
    make_settings, tmp_path: Path, running
) -> None:
    pacs_port = free_port()
    settings = node_settings(make_settings, None, pacs_port=pacs_port)
    node = start_node(settings, running)
    study_uid, paths = factory.ct_study(tmp_path / "ct", slices=4)
    send_to_node(settings, paths)

    def export_failed_once() -> bool:
        with node.db.session() as session:
            rows = session.execute(select(Export)).scalars().all()
            return bool(rows) and all(r.attempts >= 1 and r.state == "pending" for r in rows)

    wait_for(export_failed_once, timeout=120, what="a failed export attempt")
    node.stop()
    running.remove(node)

    pacs = OrthancServer(tmp_path / "orthanc", dicom_port=pacs_port).start()
    try:
        start_node(settings, running)
        srs = wait_for(lambda: sr_instances(pacs, study_uid), timeout=60, what="SR after restart")
        assert len(srs) == 1
        # A few more exporter passes must not add a second SR.
        node2 = running[-1]

        def all_sent() -> bool:
            with node2.db.session() as session:
                return all(r.state == "sent" for r in session.execute(select(Export)).scalars())

        wait_for(all_sent, timeout=30, what="export marked sent")
        assert len(sr_instances(pacs, study_uid)) == 1
    finally:
        pacs.stop()


def test_study_whose_images_all_fail_gets_failed_state_and_no_sr(
    make_settings, tmp_path: Path, running
) -> None:
    pacs = OrthancServer(tmp_path / "orthanc").start()
    try:
        settings = node_settings(make_settings, pacs)  # no retry: decoding fails every time
        node = start_node(settings, running)
        study_uid = pydicom.uid.generate_uid()
        paths = []
        for index in range(2):
            ds = factory.cr_image(study_uid, seed=index)
            # Claims JPEG baseline but holds bytes no decoder accepts.
            ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not a jpeg \xff\xd9"])
            ds["PixelData"].VR = "OB"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PhotometricInterpretation = "MONOCHROME2"
            paths.append(factory.write(ds, tmp_path / f"bad{index}.dcm", JPEGBaseline8Bit))
        send_to_node(settings, paths, "-xy")

        def failed_state() -> Study | None:
            with node.db.session() as session:
                study = session.execute(
                    select(Study).where(Study.study_uid == study_uid)
                ).scalar_one_or_none()
                return study if study is not None and study.state == "failed" else None

        study = wait_for(failed_state, timeout=120, what="failed state")
        assert study.state_reason and "decode" in study.state_reason.lower()
        with node.db.session() as session:
            assert session.execute(select(Job.attempts)).scalar_one() == 1  # not retried
            assert session.execute(select(Result)).first() is None
            assert session.execute(select(Export)).first() is None
        assert sr_instances(pacs, study_uid) == []
    finally:
        pacs.stop()


def test_no_phi_in_logs_or_metrics(make_settings, tmp_path: Path, running, caplog, capfd) -> None:
    """Fake PHI sent through receive, classify, SR, export and the API never reaches logs."""
    import httpx

    caplog.set_level(logging.DEBUG)
    pacs = OrthancServer(tmp_path / "orthanc").start()
    try:
        settings = node_settings(make_settings, pacs, api={"enabled": True, "port": free_port()})
        node = start_node(settings, running)
        study_uid, paths = factory.ct_study(tmp_path / "ct", slices=3)
        send_to_node(settings, paths)
        wait_for(lambda: sr_instances(pacs, study_uid), timeout=120, what="SR in Orthanc")
        metrics = wait_for(
            lambda: _get(httpx, f"http://127.0.0.1:{settings.api.port}/metrics"),
            timeout=30,
            what="metrics",
        )
    finally:
        pacs.stop()
    node.stop()
    out, err = capfd.readouterr()
    text = "\n".join([caplog.text, out, err, metrics])
    assert "triagenode_instances_received" in metrics
    for secret in (
        factory.PATIENT_NAME,
        factory.PATIENT_ID,
        factory.BIRTH_DATE,
        "ACC-5521-QX",
        "Zyxwvut",
        "Quokkafeather",
    ):
        assert secret not in text, f"{secret!r} leaked into logs or metrics"


def _get(httpx_module, url: str) -> str | None:
    try:
        response = httpx_module.get(url, timeout=5)
    except httpx_module.HTTPError:
        return None
    return response.text if response.status_code == 200 else None
