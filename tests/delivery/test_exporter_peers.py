"""The exporter against real peers: Orthanc (the PACS) and DCMTK's storescp."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from tests import peers
from tests.orthanc import OrthancServer
from tests.sr_cases import ct_result, demo_cr_result
from tests.tcp_tap import TcpTap
from triagenode.audit.events import AuditLog
from triagenode.config.settings import Settings
from triagenode.delivery.exporter import Exporter, ExportOutbox
from triagenode.domain import ExportState, StudyResult
from triagenode.metrics import EXPORT_ATTEMPTS, EXPORT_FAILURES
from triagenode.reports import build_sr, summarize_sr, write_sr
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

SECRET = b"test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    from triagenode.store import migrate

    database = Database(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    migrate.upgrade(database)
    yield database
    database.dispose()


def _settings(make_settings, *destinations: dict[str, Any], **export: Any) -> Settings:
    return make_settings(
        destinations=list(destinations),
        export={"backoff_initial_s": 0.05, "backoff_max_s": 0.4, "timeout_s": 5, **export},
    )


def _destination(name: str, server: OrthancServer, ae_title: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "ae_title": ae_title or server.ae_title,
        "host": server.host,
        "port": server.dicom_port,
    }


def _queue_sr(
    outbox: ExportOutbox, settings: Settings, case=ct_result, priority: int = 20
) -> tuple[StudyResult, Path, list[int]]:
    result, source = case()
    path = write_sr(build_sr(result, source, settings, run=1), settings, result=result)
    sop = path.stem
    ids = outbox.enqueue(None, result.study_uid, sop, path, priority)
    return result, path, ids


def _parts(db: Database, settings: Settings) -> tuple[ExportOutbox, Exporter]:
    audit = AuditLog(db, SECRET)
    outbox = ExportOutbox(db, audit, settings)
    return outbox, Exporter(outbox, settings, audit)


def _drain(exporter: Exporter, outbox: ExportOutbox, timeout: float = 30.0) -> None:
    """Passes until no row is pending or sending (sent or dead)."""

    def settled() -> bool:
        exporter.send_due()
        counts = outbox.counts()
        return counts["pending"] == 0 and counts["sending"] == 0

    peers.wait_for(settled, timeout=timeout, interval=0.02, what="outbox to settle")


def test_sr_arrives_in_orthanc_and_reads_back_the_same(
    pacs: OrthancServer, sqlite_db: Database, make_settings
) -> None:
    settings = _settings(make_settings, _destination("pacs", pacs))
    outbox, exporter = _parts(sqlite_db, settings)
    attempts_before = EXPORT_ATTEMPTS.labels(destination="pacs")._value.get()
    result, path, ids = _queue_sr(outbox, settings)
    assert exporter.send_due() == 1
    row = outbox.get(ids[0])
    assert row is not None and row.state == ExportState.sent.value and row.attempts == 1
    assert pacs.instance_uids(result.study_uid) == [path.stem]
    stored = pydicom.dcmread(pydicom.filebase.DicomBytesIO(pacs.download_by_uid(path.stem)))
    assert summarize_sr(stored) == summarize_sr(pydicom.dcmread(path))
    assert EXPORT_ATTEMPTS.labels(destination="pacs")._value.get() == attempts_before + 1
    with sqlite_db.session() as session:
        events = session.scalars(
            select(AuditEvent).where(
                AuditEvent.event_type == "sent", AuditEvent.study_uid == result.study_uid
            )
        ).all()
        assert [(e.event_id, e.outcome, e.action) for e in events] == [("110104", 0, "R")]
        assert events[0].actor == f"ORTHANC@127.0.0.1:{pacs.dicom_port}"
        assert events[0].patient_ref is not None  # hashed, never the ID itself
        assert "PID-7731-QX" not in str(events[0].details)
    assert exporter.send_due() == 0  # nothing left; never sent twice


def test_export_to_dcmtk_storescp(tmp_path: Path, sqlite_db: Database, make_settings) -> None:
    port = peers.free_port()
    received = tmp_path / "storescp"
    received.mkdir()
    process = subprocess.Popen(
        [peers.tool("storescp"), "-aet", "STORESCP", "-od", str(received), "+uf", str(port)],
        env=peers.dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        peers.wait_for_port(port)
        destination = {"name": "dcmtk", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}
        settings = _settings(make_settings, destination)
        outbox, exporter = _parts(sqlite_db, settings)
        _result, path, ids = _queue_sr(outbox, settings, case=demo_cr_result)
        assert exporter.send_due() == 1
        assert outbox.get(ids[0]).state == ExportState.sent.value  # type: ignore[union-attr]
        _assert_arrived(received, path)
    finally:
        process.terminate()
        process.wait(10)


def _assert_arrived(received: Path, sr: Path) -> None:
    """The SR written at ``sr`` is the file storescp wrote into ``received``."""
    files = peers.wait_for(lambda: [f for f in received.iterdir() if f.is_file()], what="SR")
    assert pydicom.dcmread(files[0]).SOPInstanceUID == sr.stem


def test_destination_down_then_up_gets_every_sr_once(
    tmp_path: Path, sqlite_db: Database, make_settings
) -> None:
    server = OrthancServer(tmp_path / "late-pacs")  # ports chosen, nothing listening yet
    settings = _settings(make_settings, _destination("pacs", server), max_attempts=1000)
    outbox, exporter = _parts(sqlite_db, settings)
    failures_before = EXPORT_FAILURES.labels(destination="pacs")._value.get()
    queued = [_queue_sr(outbox, settings, case=demo_cr_result) for _ in range(3)]
    ids = [i for _r, _p, row_ids in queued for i in row_ids]

    def failed_twice() -> bool:
        exporter.send_due()
        return all(outbox.get(i).attempts >= 2 for i in ids)  # type: ignore[union-attr]

    peers.wait_for(failed_twice, timeout=20, interval=0.02, what="retries with backoff")
    rows = [outbox.get(i) for i in ids]
    assert all(r.state == ExportState.pending.value for r in rows)  # type: ignore[union-attr]
    assert all("cannot connect" in (r.last_error or "") for r in rows)  # type: ignore[union-attr]
    assert EXPORT_FAILURES.labels(destination="pacs")._value.get() >= failures_before + 6

    with server:
        exporter.start()
        try:
            peers.wait_for(lambda: outbox.counts()["sent"] == 3, timeout=30, what="all SRs sent")
        finally:
            exporter.stop()
        for result, path, _ids in queued:
            assert server.instance_uids(result.study_uid) == [path.stem]
        assert server.instance_count() == 3
        assert exporter.send_due() == 0
        assert server.instance_count() == 3


def test_rejecting_destination_goes_dead_then_retry_all_dead(
    pacs: OrthancServer, sqlite_db: Database, make_settings
) -> None:
    wrong = _settings(
        make_settings, _destination("pacs", pacs, ae_title="NOT-ORTHANC"), max_attempts=3
    )
    outbox, exporter = _parts(sqlite_db, wrong)
    result, path, ids = _queue_sr(outbox, wrong)
    _drain(exporter, outbox)
    row = outbox.get(ids[0])
    assert row is not None and row.state == ExportState.dead.value and row.attempts == 3
    assert "association rejected" in (row.last_error or "")
    assert pacs.instance_uids(result.study_uid) == []
    with sqlite_db.session() as session:
        outcomes = session.scalars(
            select(AuditEvent.outcome).where(AuditEvent.study_uid == result.study_uid)
        ).all()
    assert outcomes == [4, 4, 8]  # two retryable failures, then the dead letter

    assert outbox.retry_all_dead() == 1
    # The operator fixes the AE title and restarts: same database, new outbox and exporter.
    fixed = _settings(make_settings, _destination("pacs", pacs), max_attempts=3)
    outbox, exporter = _parts(sqlite_db, fixed)
    _drain(exporter, outbox)
    assert outbox.get(ids[0]).state == ExportState.sent.value  # type: ignore[union-attr]
    assert pacs.instance_uids(result.study_uid) == [path.stem]


def test_rows_survive_a_restart_mid_send(
    pacs: OrthancServer, sqlite_db: Database, make_settings
) -> None:
    settings = _settings(make_settings, _destination("pacs", pacs))
    outbox, _exporter = _parts(sqlite_db, settings)
    stat_result, stat_path, _ = _queue_sr(outbox, settings, priority=40)
    result, path, _ = _queue_sr(outbox, settings, case=demo_cr_result)
    claimed = outbox.claim()  # the node dies after claiming, before any C-STORE
    assert [r.sop_instance_uid for r in claimed] == [stat_path.stem, path.stem]  # stat first

    outbox, exporter = _parts(sqlite_db, settings)  # the restarted node
    exporter.start()
    try:
        peers.wait_for(
            lambda: outbox.counts()["sent"] == 2, timeout=30, what="resent after restart"
        )
    finally:
        exporter.stop()
    assert pacs.instance_uids(stat_result.study_uid) == [stat_path.stem]
    assert pacs.instance_uids(result.study_uid) == [path.stem]


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


def test_export_over_mutual_tls_to_storescp(
    tmp_path: Path, sqlite_db: Database, make_settings
) -> None:
    server_key, server_cert = _self_signed(tmp_path, "server")
    client_key, client_cert = _self_signed(tmp_path, "client")
    _stranger_key, stranger_cert = _self_signed(tmp_path, "stranger")
    port = peers.free_port()
    received = tmp_path / "received"
    received.mkdir()
    process = subprocess.Popen(
        [
            peers.tool("storescp"), "-aet", "TLSSCP", "-od", str(received), "+uf",
            "+tls", str(server_key), str(server_cert), "+cf", str(client_cert), "-rc", str(port),
        ],
        env=peers.dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        peers.wait_for_port(port)
        secure = {
            "name": "tls",
            "ae_title": "TLSSCP",
            "host": "127.0.0.1",
            "port": port,
            "tls": True,
            "tls_ca": str(server_cert),
            "tls_cert": str(client_cert),
            "tls_key": str(client_key),
        }
        # A server whose certificate we do not trust is refused by us, and retried later.
        untrusted = _settings(make_settings, {**secure, "tls_ca": str(stranger_cert)})
        outbox, exporter = _parts(sqlite_db, untrusted)
        _result, path, ids = _queue_sr(outbox, untrusted, case=demo_cr_result)
        assert exporter.send_due() == 1
        row = outbox.get(ids[0])
        assert row is not None and row.state == ExportState.pending.value
        assert "cannot connect" in (row.last_error or "")

        trusted = _settings(make_settings, secure)
        outbox, exporter = _parts(sqlite_db, trusted)
        outbox.retry(ids[0])
        assert exporter.send_due() == 1
        assert outbox.get(ids[0]).state == ExportState.sent.value  # type: ignore[union-attr]
        _assert_arrived(received, path)
    finally:
        process.terminate()
        process.wait(10)


def test_echo_tells_which_destinations_answer(
    tmp_path: Path, sqlite_db: Database, make_settings, pacs: OrthancServer
) -> None:
    down = {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": peers.free_port()}
    settings = _settings(make_settings, _destination("pacs", pacs), down)
    _, exporter = _parts(sqlite_db, settings)
    answers = {d.name: exporter.echo(d, timeout=2) for d in settings.destinations}
    assert answers == {"pacs": True, "down": False}


def test_a_silent_destination_does_not_delay_a_healthy_one(
    pacs: OrthancServer, sqlite_db: Database, make_settings
) -> None:
    # The silent PACS accepts the connection and never answers: each attempt to it waits the
    # whole export timeout. It comes first in the configuration and in the outbox.
    timeout = 20.0
    with TcpTap() as hole:
        silent = {"name": "silent", "ae_title": "SILENT", "host": "127.0.0.1", "port": hole.port}
        settings = _settings(
            make_settings, silent, _destination("pacs", pacs), timeout_s=timeout, senders=1
        )
        outbox, exporter = _parts(sqlite_db, settings)
        stat_result, stat_path, stat_ids = _queue_sr(outbox, settings, priority=40)
        result, path, ids = _queue_sr(outbox, settings, case=demo_cr_result)
        started = time.monotonic()
        exporter.start()
        try:
            peers.wait_for(
                lambda: (
                    pacs.instance_uids(stat_result.study_uid)
                    and pacs.instance_uids(result.study_uid)
                ),
                timeout=timeout / 2,
                interval=0.05,
                what="both SRs in Orthanc while the silent PACS holds its association",
            )
            elapsed = time.monotonic() - started
            peers.wait_for(lambda: hole.accepted >= 1, what="an attempt to the silent PACS")
            silent_rows = [outbox.get(stat_ids[0]), outbox.get(ids[0])]
        finally:
            hole.close()  # ends the silent attempt at once, so stop() need not wait for it
            exporter.stop()
    assert elapsed < timeout / 4, f"Orthanc's SRs took {elapsed:.1f} s"
    assert pacs.instance_uids(stat_result.study_uid) == [stat_path.stem]
    assert pacs.instance_uids(result.study_uid) == [path.stem]
    assert all(r is not None and r.state == ExportState.sending.value for r in silent_rows)
    assert outbox.get(stat_ids[1]).state == ExportState.sent.value  # type: ignore[union-attr]


def test_rows_of_a_removed_destination_fail_and_end_dead(
    pacs: OrthancServer, sqlite_db: Database, make_settings
) -> None:
    gone = {"name": "old-pacs", "ae_title": "OLD", "host": "127.0.0.1", "port": 9}
    before = _settings(make_settings, _destination("pacs", pacs), gone, max_attempts=2)
    outbox, _ = _parts(sqlite_db, before)
    _result, _path, ids = _queue_sr(outbox, before, case=demo_cr_result)
    # The operator removes the old PACS from the configuration and restarts.
    after = _settings(make_settings, _destination("pacs", pacs), max_attempts=2)
    outbox, exporter = _parts(sqlite_db, after)
    _drain(exporter, outbox)
    kept, removed = outbox.get(ids[0]), outbox.get(ids[1])
    assert kept is not None and kept.state == ExportState.sent.value
    assert removed is not None and removed.state == ExportState.dead.value
    assert removed.attempts == 2
    assert "'old-pacs' is no longer configured" in (removed.last_error or "")
