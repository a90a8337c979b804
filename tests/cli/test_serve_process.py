"""``triagenode serve`` as a real process: start, answer, stop; killed mid-job; escalation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from tests import factory
from tests.peers import free_port, run_tool, wait_for, wait_for_port
from tests.serve_fixtures import StoreScp
from triagenode.audit.events import AuditEventId
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent, Export, Job, Result, Study

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, pacs: StoreScp, extra: str = "") -> tuple[Path, int]:
    port = free_port()
    config = tmp_path / "triagenode.toml"
    config.write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"
[scp]
host = "127.0.0.1"
port = {port}
[study]
stable_after_s = 0.5
[model]
source = "demo"
[api]
enabled = false
[audit]
secret = "serve-process-test-secret-0123"
[export]
backoff_initial_s = 0.2
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs.port}
send = ["sr"]  # these tests count SRs; the summary objects: test_summary_exports.py
{extra}
""",
        encoding="utf-8",
    )
    return config, port


def start_serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "triagenode.cli", "serve", "--config", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )


def send_study(port: int, tmp_path: Path, slices: int = 4) -> str:
    study_uid, paths = factory.ct_study(tmp_path / f"study-{free_port()}", slices=slices)
    sent = run_tool("storescu", "-aec", "TRIAGENODE", "127.0.0.1", str(port), *map(str, paths))
    assert sent.returncode == 0, sent.stderr
    return study_uid


def test_serve_starts_answers_echo_and_stops_on_sigterm(tmp_path: Path, pacs: StoreScp) -> None:
    config, port = write_config(tmp_path, pacs)
    log = tmp_path / "serve.log"
    process = start_serve(config, log)
    try:
        wait_for_port(port, timeout=120)
        echo = run_tool("echoscu", "-aec", "TRIAGENODE", "127.0.0.1", str(port))
        assert echo.returncode == 0, echo.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
    text = log.read_text()
    assert "DEMO, NOT FOR CLINICAL USE" in text
    assert "triagenode stopped" in text


def test_worker_killed_mid_job_completes_once_after_lease_expiry(
    tmp_path: Path, pacs: StoreScp
) -> None:
    # The first node's batcher waits max_wait_ms to fill a batch, which holds the job in
    # "processing" long enough to kill the node there; a short lease (triage.lease_s) has
    # run out by the time the second node, without that wait, has started and reclaims it.
    config, port = write_config(tmp_path, pacs)
    restart = config.read_text().replace("[study]", "[triage]\nlease_s = 2.0\n[study]")
    config.write_text(restart.replace('source = "demo"', 'source = "demo"\nmax_wait_ms = 5000'))
    log = tmp_path / "serve.log"
    db = Database(f"sqlite:///{tmp_path / 'data' / 'triagenode.sqlite3'}")

    first = start_serve(config, log)
    try:
        wait_for_port(port, timeout=120)
        study_uid = send_study(port, tmp_path)

        def leased() -> bool:
            with db.session() as session:
                return session.execute(select(Job.state)).scalar_one_or_none() == "leased"

        wait_for(leased, timeout=60, what="job leased by the first node")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)

    config.write_text(restart)
    second = start_serve(config, log)
    try:
        wait_for(lambda: pacs.received(), timeout=120, what="SR at the destination")

        def export_sent() -> bool:
            with db.session() as session:
                return session.execute(select(Export.state)).scalar_one() == "sent"

        wait_for(export_sent, timeout=60, what="export marked sent")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log.read_text()

    received = pacs.received()
    assert len(received) == 1, "the killed job must yield exactly one SR"
    assert received[0].StudyInstanceUID == study_uid
    with db.session() as session:
        job = session.execute(select(Job)).scalar_one()
        assert job.state == "done"
        assert job.attempts == 2  # the killed claim, then the one that completed
        assert session.execute(select(Result)).scalars().all()[0].study_id == job.study_id
    db.dispose()


class _Webhook(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_critical_finding_escalates_end_to_end(tmp_path: Path, pacs: StoreScp) -> None:
    """A critical label above its site-calibrated threshold: stat priority, critical flag in
    the SR, an audit event, a webhook call."""
    webhook = HTTPServer(("127.0.0.1", 0), _Webhook)
    _Webhook.bodies = []
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    labels = f"""
[triage.notify]
webhook_url = "http://127.0.0.1:{webhook.server_address[1]}/hook"
[[labels.domains]]
label_set = "bleed"
modalities = ["CT"]
[labels.sets.bleed]
description = "test set: the critical label passes any score"
[[labels.sets.bleed.labels]]
name = "hemorrhage"
code = {{ scheme = "SCT", value = "1386000", meaning = "Intracranial hemorrhage" }}
prompts = ["a head CT showing hemorrhage"]
absent_prompts = ["a head CT showing no hemorrhage"]
critical = true
threshold_calibrated = true
threshold = 0.0
"""
    config, port = write_config(tmp_path, pacs, labels)
    log = tmp_path / "serve.log"
    process = start_serve(config, log)
    try:
        wait_for_port(port, timeout=120)
        study_uid = send_study(port, tmp_path)
        [sr] = wait_for(lambda: pacs.received(), timeout=120, what="SR at the destination")
        wait_for(lambda: _Webhook.bodies, timeout=30, what="webhook call")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
        webhook.shutdown()

    from triagenode.reports import summarize_sr

    summary = summarize_sr(pydicom.dcmread(next(pacs.folder.iterdir())))
    assert summary.critical is True
    assert summary.finding("hemorrhage").present
    assert sr.StudyInstanceUID == study_uid
    [body] = _Webhook.bodies
    assert body["study_uid"] == study_uid and body["finding"] == "hemorrhage"
    assert body["priority"] == "stat"
    db = Database(f"sqlite:///{tmp_path / 'data' / 'triagenode.sqlite3'}")
    with db.session() as session:
        study = session.execute(select(Study)).scalar_one()
        assert study.critical and study.priority == 40
        events = (
            session.execute(select(AuditEvent).where(AuditEvent.event_type == "critical-finding"))
            .scalars()
            .all()
        )
        assert len(events) == 1 and events[0].study_uid == study_uid
        assert events[0].event_id == AuditEventId.export.value
        assert session.execute(select(Export.priority)).scalar_one() == 40
    db.dispose()
    served_log = log.read_text()
    assert factory.PATIENT_ID not in served_log and factory.PATIENT_NAME not in served_log
