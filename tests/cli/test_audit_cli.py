"""``triagenode audit``, ``token`` and ``api`` on the command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from lxml import etree
from sqlalchemy import text

from tests.audit_support import drop_append_only_guard
from tests.factory import PATIENT_ID
from tests.peers import free_port, wait_for
from triagenode.audit import AuditEventId, AuditLog, load_or_create_secret
from triagenode.audit.atna import schema
from triagenode.cli import main
from triagenode.config.settings import load_settings
from triagenode.store import migrate
from triagenode.store.db import Database

_MAIN = "import sys; from triagenode.cli import main; sys.exit(main())"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "triagenode.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    return path


def _log(config: Path) -> AuditLog:
    settings = load_settings(config)
    db = Database(settings.database_url)
    migrate.upgrade(db)
    return AuditLog(db, load_or_create_secret(settings))


def test_token_lifecycle(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--config", str(config)]
    assert main(["token", "create", *args, "--name", "ops", "--role", "operator"]) == 0
    token = capsys.readouterr().out.splitlines()[0]
    assert token.startswith("tn_") and len(token) > 40
    assert main(["token", "list", *args]) == 0
    listing = capsys.readouterr().out
    assert "ops" in listing and "operator" in listing and token not in listing
    assert main(["token", "create", *args, "--name", "ops", "--role", "admin"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["token", "revoke", *args, "ops"]) == 0
    assert main(["token", "revoke", *args, "ops"]) == 1
    capsys.readouterr()
    main(["token", "list", *args])
    assert "revoked" in capsys.readouterr().out
    key = (config.parent / "data" / "audit.key").stat()
    assert key.st_mode & 0o777 == 0o600


def test_audit_verify_export_list(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--config", str(config)]
    log = _log(config)
    log.record(
        AuditEventId.instances_transferred,
        event_type="received",
        actor="CT",
        study_uid="1.2.3",
        patient_id=PATIENT_ID,
    )
    assert main(["audit", "verify", *args]) == 0
    printed = capsys.readouterr().out
    assert "audit chain intact: 1 events" in printed
    head = printed.split("head: seq ")[1].split()
    anchor = f"{head[0]}:{head[2]}"
    assert main(["audit", "verify", *args, "--expect-head", anchor]) == 0
    capsys.readouterr()
    out = tmp_path / "trail.xml"
    assert main(["audit", "export", *args, "--format", "atna-xml", "--out", str(out)]) == 0
    document = etree.parse(str(out)).getroot()
    assert schema("triagenode-audit-export.rng").validate(document)
    assert len(document) == 3  # the event and two verifies
    future = ["--from", "2999-01-01"]
    assert main(["audit", "export", *args, "--format", "jsonl", *future]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "list", *args, "--patient-id", PATIENT_ID, "--json"]) == 0
    listed = capsys.readouterr().out
    assert '"received"' in listed and PATIENT_ID not in listed
    with log.db.engine.begin() as connection:
        drop_append_only_guard(connection)
        connection.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    capsys.readouterr()
    assert main(["audit", "verify", *args]) == 1
    assert "BROKEN: deleted" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["audit", "export", *args, "--from", "yesterday"])
    assert "not an ISO 8601 date" in capsys.readouterr().err


def test_api_command_serves_until_interrupted(config: Path, tmp_path: Path) -> None:
    port = free_port()
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(10)
    with config.open("a", encoding="utf-8") as handle:
        handle.write(
            f'[audit.syslog]\nenabled = true\nprotocol = "udp"\n'
            f'host = "127.0.0.1"\nport = {collector.getsockname()[1]}\n'
        )
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _MAIN,
            "api",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("TRIAGENODE_")},
    )
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success
            except httpx.HTTPError:
                assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
                return False

        wait_for(healthy, timeout=60, what="triagenode api to answer")
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/queue").status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode in (0, 130), output
    log = _log(config)
    report = log.verify()
    assert report.ok and report.count == 3  # start, the refused call, stop
    # the stream carries the three events and, after each batch, a signed checkpoint
    received = []
    while sum("DICOM+RFC3881" in line for line in received) < 3 and len(received) < 10:
        received.append(collector.recv(65535).decode())
    collector.close()
    forwarded = [line for line in received if "checkpoint@32473" not in line]
    assert len(forwarded) == 3 and all("DICOM+RFC3881" in line for line in forwarded)
    assert "110113" in "".join(forwarded)  # the refused call reached the collector


def test_cli_events_name_the_os_user_and_host(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pwd

    from triagenode.store.models import AuditEvent

    args = ["--config", str(config)]
    assert main(["token", "create", *args, "--name", "ops", "--role", "operator"]) == 0
    assert main(["audit", "verify", *args]) == 0
    capsys.readouterr()
    log = _log(config)
    with log.db.session() as session:
        rows = session.query(AuditEvent).order_by(AuditEvent.seq).all()
    user = pwd.getpwuid(os.getuid()).pw_name
    assert [r.actor for r in rows] == [f"cli:{user}", f"cli:{user}"]
    for row in rows:
        assert row.actor_address == socket.gethostname()
        assert row.details["os_user"] == user and row.details["uid"] == os.getuid()
        assert row.details["host"] == socket.gethostname()
