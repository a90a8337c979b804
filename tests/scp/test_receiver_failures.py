"""Refusals: unknown AE, bad datasets, an unwritable spool, a database that goes away.

Each must give the right status or association rejection, leave nothing half-written, be
recorded, and leave the node serving.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from tests import factory
from tests.databases import on_database
from tests.peers import wait_for
from tests.receiver_fixtures import Node, dataset_part, echoscu, storescu
from triagenode.audit.events import AuditEventId
from triagenode.scp.status import StoreStatus
from triagenode.store.models import AuditEvent
from triagenode.store.part10 import file_meta_bytes

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def c_store(port: int, dataset_or_path: object, ae_title: str = "CRAFTER") -> int:
    """Send one instance with pynetdicom (which lets a test craft what DCMTK would refuse)."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGENODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dataset_or_path).Status)
    finally:
        assoc.release()


def with_meta(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def ct(tmp_path: Path, name: str = "x.dcm") -> tuple[Dataset, Path]:
    ds = factory.ct_slice(generate_uid(), generate_uid(), 0)
    return ds, factory.write(ds, tmp_path / name)


def audit_rows(node: Node, event_id: AuditEventId) -> list[AuditEvent]:
    with node.db.session() as session:
        query = select(AuditEvent).where(AuditEvent.event_id == event_id.value)
        return list(session.execute(query).scalars())


def assert_still_serving(node: Node, tmp_path: Path) -> None:
    assert echoscu(node.port).returncode == 0
    _, path = ct(tmp_path, "after.dcm")
    assert storescu(node.port, [path]).returncode == 0


def incoming(node: Node) -> list[Path]:
    return node.temp_files()


@sqlite_only
def test_unknown_calling_ae_is_rejected_and_audited(node_factory: object, tmp_path: Path) -> None:
    node = node_factory(scp={"allowed_calling_aets": ["MODALITY1"]})
    _, path = ct(tmp_path)
    refused = storescu(node.port, [path], "-aet", "INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    assert "Rejected Permanent" in refused.stderr
    [alert] = wait_for(lambda: audit_rows(node, AuditEventId.security_alert), what="alert")
    assert alert.actor == "INTRUDER"
    assert alert.details["reason"] == "calling_ae_not_recognised"
    assert node.instances() == []
    assert storescu(node.port, [path], "-aet", "MODALITY1").returncode == 0
    assert len(node.instances()) == 1


@sqlite_only
def test_missing_uid_and_mismatched_sop_uid_cannot_be_understood(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_study = factory.ct_slice(generate_uid(), generate_uid(), 0)
    del no_study.StudyInstanceUID
    with_meta(no_study)
    assert c_store(node.port, no_study) == StoreStatus.cannot_understand_missing_uid

    _, path = ct(tmp_path)
    # The request's Affected SOP Instance UID comes from the file meta: make it differ.
    dataset = dataset_part(path)
    mismatched = tmp_path / "mismatch.dcm"
    mismatched.write_bytes(
        file_meta_bytes(CTImageStorage, generate_uid(), ExplicitVRLittleEndian, None) + dataset
    )
    # Sent from the file as it is, so the request carries the file meta's UID.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert c_store(node.port, mismatched) == StoreStatus.cannot_understand_sop_uid_mismatch

    assert node.instances() == [] and node.studies() == []
    assert node.spool_files() == []  # temp files removed too
    rejected = wait_for(
        lambda: len(audit_rows(node, AuditEventId.instances_transferred)) >= 2 or None,
        what="audit",
    )
    assert rejected
    rows = audit_rows(node, AuditEventId.instances_transferred)
    assert {r.details["status"] for r in rows} == {"0xC001", "0xC002"}
    assert all(r.event_type == "rejected" for r in rows)
    assert_still_serving(node, tmp_path)


@sqlite_only
def test_unwritable_spool_is_out_of_resources(node: Node, tmp_path: Path) -> None:
    spool = node.data_dir / "spool"
    shutil.rmtree(spool)
    spool.write_text("not a folder")  # root ignores permissions; a file in the way does not
    ds, _ = ct(tmp_path)
    assert c_store(node.port, ds) == StoreStatus.out_of_resources_spool
    assert node.instances() == []
    spool.unlink()
    assert_still_serving(node, tmp_path)
    assert incoming(node) == []


@on_database("postgres")
def test_database_gone_is_out_of_resources(node: Node, tmp_path: Path) -> None:
    ds, _ = ct(tmp_path)
    url = make_url(node.settings.database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
    admin.dispose()
    assert c_store(node.port, ds) == StoreStatus.out_of_resources_database
    # Nothing half-written: the file that had been renamed into place was taken back.
    assert node.spool_files() == []
    assert echoscu(node.port).returncode == 0


@sqlite_only
def test_max_associations_rejects_transiently(node_factory: object) -> None:
    node = node_factory(scp={"max_associations": 1})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", node.port, ae_title="TRIAGENODE")
    assert first.is_established
    try:
        second = ae.associate("127.0.0.1", node.port, ae_title="TRIAGENODE")
        assert second.is_rejected
        assert second.acceptor.primitive.result == 0x02  # rejected-transient
    finally:
        first.release()
    wait_for(lambda: node.receiver.active_associations == 0, what="association end")
    assert echoscu(node.port).returncode == 0


@sqlite_only
def test_garbage_is_aborted_and_node_keeps_serving(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(b"\x09\x00" + struct.pack(">I", 4) + b"junk")
        answer = sock.recv(10)
    assert answer[:1] == b"\x07"  # A-ABORT
    assert echoscu(node.port).returncode == 0


@sqlite_only
def test_small_max_pdu_reassembles_fragments(node_factory: object, tmp_path: Path) -> None:
    node = node_factory(scp={"max_pdu": 4096})
    _, paths = factory.ct_study(tmp_path / "in", slices=3, size=64)  # ~9 KB: 3+ PDUs each
    assert storescu(node.port, paths).returncode == 0
    assert len(node.instances()) == 3
    for row in node.instances():
        stored = node.data_dir / row.file_path
        assert stored.stat().st_size == row.size


@sqlite_only
def test_tls_association(node_factory: object, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
    )
    assert made.returncode == 0, made.stderr
    node = node_factory(scp={"tls_enabled": True, "tls_cert": str(cert), "tls_key": str(key)})
    _, path = ct(tmp_path)
    # storescu presents the same certificate and trusts it as the node's.
    sent = storescu(node.port, [path], "+tls", str(key), str(cert), "+cf", str(cert))
    assert sent.returncode == 0, sent.stderr
    assert len(node.instances()) == 1
    plain = storescu(node.port, [path])  # no TLS: the handshake fails, nothing stored
    assert plain.returncode != 0
    assert echoscu(node.port, "+tls", str(key), str(cert), "+cf", str(cert)).returncode == 0


@sqlite_only
def test_port_in_use_is_a_clear_error(node: Node) -> None:
    from triagenode.errors import ConfigError
    from triagenode.scp.receiver import DicomReceiver

    second = DicomReceiver(node.settings, node.db, node.audit)
    with pytest.raises(ConfigError, match=r"scp\.port"):
        second.start()
    assert echoscu(node.port).returncode == 0
