"""Which destination gets which of a study's objects (``destinations[].send``), in the outbox
and through a running node to Orthanc."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests import factory
from tests.orthanc import OrthancServer
from tests.peers import free_port, wait_for
from tests.test_end_to_end import running, send_to_node, start_node  # noqa: F401 - fixture
from triagenode.audit.events import AuditLog
from triagenode.config.settings import Settings
from triagenode.delivery.exporter import ExportOutbox
from triagenode.errors import ConfigError
from triagenode.store.db import Database
from triagenode.store.models import Export, Study

SC = "1.2.840.10008.5.1.4.1.1.7"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"


def test_send_defaults_to_sr_and_summary_card(make_settings) -> None:
    settings = make_settings(
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]
    )
    assert settings.destinations[0].send == ["sr", "summary-sc"]


@pytest.mark.parametrize(
    ("send", "words"),
    [(["sr", "movie"], "send"), (["sr", "sr"], "repeated: sr"), ([], "send")],
)
def test_send_refuses_unknown_repeated_or_no_kinds(make_settings, send, words) -> None:
    destination = {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104, "send": send}
    with pytest.raises(ConfigError, match=words):
        make_settings(destinations=[destination])


def test_outbox_queues_each_object_only_for_destinations_that_take_it(
    make_settings, db: Database
) -> None:
    settings = make_settings(
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {
                "name": "ris",
                "ae_title": "RIS",
                "host": "127.0.0.1",
                "port": 105,
                "send": ["summary-pdf", "kos"],
            },
        ]
    )
    outbox = ExportOutbox(db, AuditLog(db, b"test-secret-0123456789abcdef"), settings)
    wanted = {k: outbox.wanted(k) for k in ("sr", "summary-sc", "summary-pdf", "kos")}
    assert wanted == {"sr": True, "summary-sc": True, "summary-pdf": True, "kos": True}
    for n, kind in enumerate(("sr", "summary-sc", "summary-pdf", "kos")):
        outbox.enqueue(None, "1.2.3", f"2.25.{n}", f"results/{n}.dcm", 20, kind=kind)
        outbox.enqueue(None, "1.2.3", f"2.25.{n}", f"results/{n}.dcm", 20, kind=kind)  # again
    rows = {(r.destination, r.sop_instance_uid) for r in outbox.list()}
    assert rows == {("pacs", "2.25.0"), ("pacs", "2.25.1"), ("ris", "2.25.2"), ("ris", "2.25.3")}


def _by_class(pacs: OrthancServer, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    found: dict[str, list[pydicom.Dataset]] = {}
    for instance in pacs.study_instances(study_uid):
        ds = pydicom.dcmread(io.BytesIO(pacs.download(instance["ID"])), stop_before_pixels=True)
        found.setdefault(str(ds.SOPClassUID), []).append(ds)
    return found


@pytest.mark.slow
def test_each_destination_gets_what_it_asks_for_through_a_running_node(
    make_settings,
    tmp_path: Path,
    running,  # noqa: F811 - the fixture of test_end_to_end
) -> None:
    node_port = free_port()
    modalities = {"triagenode": ("TRIAGENODE", "127.0.0.1", node_port)}
    with (
        OrthancServer(tmp_path / "full", modalities=modalities) as full,
        OrthancServer(tmp_path / "plain") as plain,
    ):
        settings: Settings = make_settings(
            scp={"port": node_port},
            api={"enabled": False},
            destinations=[
                {
                    "name": "full",
                    "ae_title": full.ae_title,
                    "host": "127.0.0.1",
                    "port": full.dicom_port,
                    "send": ["sr", "summary-sc", "kos"],
                },
                {
                    "name": "plain",
                    "ae_title": plain.ae_title,
                    "host": "127.0.0.1",
                    "port": plain.dicom_port,
                },
            ],
            export={"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "max_attempts": 50},
        )
        node = start_node(settings, running)
        study_uid, paths = factory.ct_study(tmp_path / "ct", slices=6)
        send_to_node(settings, paths)

        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}

        def full_has_all() -> dict[str, list[pydicom.Dataset]] | None:
            found = _by_class(full, study_uid) if full.find_study(study_uid) else {}
            return found if {SC, KOS} <= set(found) and len(found) >= 3 else None

        in_full = wait_for(full_has_all, timeout=120, what="SR, SC and KOS in Orthanc")
        in_plain = wait_for(
            lambda: (
                (found := _by_class(plain, study_uid) if plain.find_study(study_uid) else {})
                and len(found) == 2
                and found
            ),
            timeout=120,
            what="SR and SC in the second Orthanc",
        )
        sr_class = "1.2.840.10008.5.1.4.1.1.88.34"
        assert set(in_full) == {sr_class, SC, KOS}
        assert set(in_plain) == {sr_class, SC}
        for found in (in_full, in_plain):
            assert all(len(v) == 1 for v in found.values())  # one of each, no duplicates
            assert {ds.StudyInstanceUID for v in found.values() for ds in v} == {study_uid}
            assert found[SC][0].Manufacturer == "triagenode"
            assert found[SC][0].SOPInstanceUID == in_plain[SC][0].SOPInstanceUID
            assert {i.ReferencedSOPInstanceUID for i in found[SC][0].SourceImageSequence} <= sent
        kos = in_full[KOS][0]
        items = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        referenced = {i.ReferencedSOPInstanceUID for s in items for i in s.ReferencedSOPSequence}
        sr_uid = in_full[sr_class][0].SOPInstanceUID
        assert sr_uid in referenced  # the key images lead back to the SR
        assert referenced - {sr_uid} and referenced - {sr_uid} <= sent

        # The PACS sends the whole study back, the node's SR, card and KOS included: they
        # are stored, but the study is not reopened nor classified again.
        full.store_to_modality("triagenode", full.find_study(study_uid))

        def study_row() -> Study:
            with node.db.session() as session:
                return session.execute(
                    select(Study).where(Study.study_uid == study_uid)
                ).scalar_one()

        wait_for(lambda: study_row().instance_count == len(paths) + 3, what="study sent back")
        node.stop()  # drains the pipeline: anything reopened would be queued by now
        study = study_row()
        assert (study.run, study.state) == (1, "reported")
        with node.db.session() as session:
            assert session.query(Export).count() == 5  # full: SR, SC, KOS; plain: SR, SC
