"""Tail truncation is detected; the database refuses changes to the trail (issue 13, item 3).

Deleting the newest rows leaves an intact but shorter chain. Signed checkpoints in an
append-only file (and in the syslog stream) name rows that must still be there, so
``triagenode audit verify`` notices by default.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from tests.audit.test_audit_hostile import TcpCollector
from tests.audit_support import drop_append_only_guard
from triagenode.audit import AuditEventId, AuditLog
from triagenode.audit.chain import chain_key, row_digest
from triagenode.audit.checkpoint import CheckpointLog, CheckpointSigner
from triagenode.audit.syslog import AuditForwarder
from triagenode.cli import main
from triagenode.config.settings import load_settings
from triagenode.store import migrate
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "triagenode.toml"
    path.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        '[audit]\nsecret = "checkpoint-test-secret-0123"\n',
        encoding="utf-8",
    )
    return path


def _node_log(config: Path, events: int = 6) -> AuditLog:
    settings = load_settings(config)
    db = Database(settings.database_url)
    migrate.upgrade(db)
    log = AuditLog.from_settings(settings, db)
    for number in range(events):
        log.record(AuditEventId.query, actor=f"user{number}")
    return log


def _tamper(db: Database, *statements: str) -> None:
    with db.engine.begin() as connection:
        drop_append_only_guard(connection)
        for statement in statements:
            connection.execute(text(statement))


def _verify(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["audit", "verify", "--config", str(config), "--json", *extra])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    report["stderr"] = captured.err
    return code, report


@pytest.mark.parametrize(
    "statement",
    ["DELETE FROM audit_events WHERE seq >= 5", "DELETE FROM audit_events"],
    ids=["newest-rows", "all-rows"],
)
def test_verify_detects_deleted_newest_rows_by_default(
    config: Path, capsys: pytest.CaptureFixture[str], statement: str
) -> None:
    log = _node_log(config)
    code, report = _verify(config, capsys)
    assert code == 0 and report["ok"] and report["checkpoints"] >= 6
    _tamper(log.db, statement)
    assert verify_chain_only(log)  # the chain alone cannot tell
    code, report = _verify(config, capsys)
    assert code == 1
    assert report["problem"]["kind"] == "deleted"
    assert "newest rows were deleted" in report["problem"]["message"]


def verify_chain_only(log: AuditLog) -> bool:
    return log.verify().ok


def test_verify_detects_a_chain_rewritten_with_the_audit_key(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone with the node's account and audit.key re-chains edited history: the chain is
    intact again, the checkpoints outside the database are not."""
    log = _node_log(config)
    settings = load_settings(config)
    key = chain_key(settings.audit.secret.get_secret_value().encode())  # type: ignore[union-attr]
    _tamper(log.db, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 2")
    with log.db.engine.begin() as connection:
        rows = connection.execute(text("SELECT * FROM audit_events ORDER BY seq")).mappings().all()
        previous = "0" * 64
        for row in rows:
            fields = dict(row)
            fields["prev_hash"] = previous
            if isinstance(fields["at"], str):  # SQLite's raw text
                fields["at"] = datetime.fromisoformat(fields["at"])
            if isinstance(fields["details"], str):
                fields["details"] = json.loads(fields["details"])
            digest = row_digest(key, AuditEvent(**fields))
            connection.execute(
                text("UPDATE audit_events SET prev_hash = :p, row_hash = :h WHERE seq = :s"),
                {"p": previous, "h": digest, "s": row["seq"]},
            )
            previous = digest
    assert log.verify().ok
    code, report = _verify(config, capsys)
    assert code == 1 and report["problem"]["kind"] == "edited"
    assert "rewritten" in report["problem"]["message"]


def test_forged_checkpoint_lines_are_reported(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _node_log(config, events=2)
    stranger = CheckpointLog(
        tmp_path / "data" / "audit-checkpoints.log",
        CheckpointSigner.load_or_create(tmp_path / "other.key"),
    )
    stranger.write(1, "0" * 64)
    code, report = _verify(config, capsys)
    assert code == 1 and report["problem"]["kind"] == "forged"


def test_checkpoints_in_the_syslog_copy_survive_the_local_file(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    collector = TcpCollector()
    try:
        settings = load_settings(
            config, audit={"syslog": {"enabled": True, "port": collector.port}}
        )
        db = Database(settings.database_url)
        migrate.upgrade(db)
        log = AuditLog(db, settings.audit.secret.get_secret_value().encode())  # type: ignore[union-attr]
        for number in range(5):
            log.record(AuditEventId.query, actor=f"user{number}")
        assert AuditForwarder.from_settings(settings, db).drain() == 5
    finally:
        collector.close()
    copy = tmp_path / "collector.log"
    copy.write_bytes(b"\n".join(collector.messages) + b"\n")
    assert b"CHECKPOINT" in copy.read_bytes()
    _tamper(db, "DELETE FROM audit_events WHERE seq >= 4")
    # No local checkpoints were written (the log had none): the chain alone passes...
    code, report = _verify(config, capsys)
    assert code == 0 and "no checkpoint file" in report["stderr"]
    # ...the collector's copy does not.
    code, report = _verify(config, capsys, "--syslog-copy", str(copy))
    assert code == 1 and report["problem"]["kind"] == "deleted"


def test_checkpoint_file_is_append_only_and_private(config: Path) -> None:
    log = _node_log(config, events=3)
    assert log.checkpoints is not None
    path = log.checkpoints.path
    assert path.stat().st_mode & 0o777 == 0o600
    lines = path.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    key = path.parent / "audit-checkpoint.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (path.parent / "audit-checkpoint.pub").read_text().startswith("-----BEGIN PUBLIC")


def test_events_in_a_rolled_back_session_leave_no_checkpoint(config: Path) -> None:
    log = _node_log(config, events=1)
    assert log.checkpoints is not None
    with pytest.raises(RuntimeError), log.db.write_session() as session:
        log.record(AuditEventId.query, actor="ghost", session=session)
        raise RuntimeError("the caller's transaction fails")
    with log.db.write_session() as session:
        log.record(AuditEventId.query, actor="real", session=session)
    seqs = [json.loads(line)["seq"] for line in log.checkpoints.path.read_text().splitlines()]
    assert seqs == [1, 2]
    assert log.verify(None, *_file_checkpoints(log)).ok


def _file_checkpoints(log: AuditLog):  # type: ignore[no-untyped-def]
    from triagenode.audit.checkpoint import read_checkpoints

    assert log.checkpoints is not None
    return read_checkpoints(log.checkpoints.path), log.checkpoints.signer.public_key


# The database refuses ---------------------------------------------------------------------------


def test_database_refuses_update_and_delete_of_audit_rows(db: Database) -> None:
    log = AuditLog(db, b"refuse-test-secret-0123456789")
    log.record(AuditEventId.query, actor="someone")
    statements = [
        "UPDATE audit_events SET actor = 'mallory'",
        "DELETE FROM audit_events",
    ]
    if db.engine.dialect.name == "postgresql":
        statements.append("TRUNCATE audit_events")
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"), db.engine.begin() as connection:
            connection.execute(text(statement))
    log.record(AuditEventId.query, actor="still appending")
    assert log.verify().ok and log.verify().count == 2


@pytest.mark.postgres
def test_postgres_node_role_can_insert_but_not_change(postgres_url: str) -> None:
    """The role set-up of docs/security.md: the node's role appends and reads; it cannot
    update, delete, or drop the trigger that refuses those."""
    owner = Database(postgres_url)
    migrate.upgrade(owner)
    role = f"tn_node_{uuid.uuid4().hex[:8]}"
    url = make_url(postgres_url)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    grants = [
        f"CREATE ROLE {role} LOGIN PASSWORD 'node-test-password'",
        f'GRANT CONNECT ON DATABASE "{url.database}" TO {role}',
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT ON audit_events TO {role}",
        f"GRANT USAGE ON SEQUENCE audit_events_id_seq TO {role}",
    ]
    with admin.connect() as connection:
        for statement in grants:
            connection.execute(text(statement))
    node_db = Database(
        url.set(username=role, password="node-test-password").render_as_string(hide_password=False)
    )
    try:
        log = AuditLog(node_db, b"role-test-secret-0123456789")
        log.record(AuditEventId.query, actor="node")
        assert log.verify().ok
        for statement in (
            "UPDATE audit_events SET actor = 'mallory'",
            "DELETE FROM audit_events",
            "DROP TRIGGER audit_events_no_change ON audit_events",
            "ALTER TABLE audit_events DISABLE TRIGGER ALL",
        ):
            refused = pytest.raises(DBAPIError, match=r"permission denied|must be owner")
            with refused, node_db.engine.begin() as connection:
                connection.execute(text(statement))
    finally:
        node_db.dispose()
        owner.dispose()
        with admin.connect() as connection:
            connection.execute(text(f"DROP OWNED BY {role}"))
            connection.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def test_checkpoint_command_and_missing_copy(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    log = _node_log(config, events=2)
    capsys.readouterr()
    assert main(["audit", "checkpoint", "--config", str(config)]) == 0
    assert "checkpoint: seq 2 " in capsys.readouterr().out
    assert log.checkpoints is not None
    assert len(log.checkpoints.path.read_text().splitlines()) == 3
    missing = str(tmp_path / "nowhere.log")
    assert main(["audit", "verify", "--config", str(config), "--syslog-copy", missing]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err


def test_api_verify_checks_the_nodes_checkpoints(config: Path) -> None:
    """/api/v1/audit/verify sees deleted newest rows too, as the CLI does by default."""
    from fastapi.testclient import TestClient

    from tests.api_support import SECRET, build_world

    text = config.read_text(encoding="utf-8").replace(
        "checkpoint-test-secret-0123", SECRET.decode()
    )
    config.write_text(text, encoding="utf-8")  # the API world's audit log uses SECRET
    log = _node_log(config)
    settings = load_settings(config)
    world = build_world(settings, log.db)
    client = TestClient(world.app)
    headers = world.auth("auditor")
    before = client.get("/api/v1/audit/verify", headers=headers).json()
    assert before["ok"] and before["checkpoints"] >= 6
    _tamper(log.db, "DELETE FROM audit_events WHERE seq >= 5")
    after = client.get("/api/v1/audit/verify", headers=headers).json()
    assert not after["ok"] and after["problem"]["kind"] == "deleted"
