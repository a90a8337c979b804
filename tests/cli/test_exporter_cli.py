"""``triagenode exports``: list rows, requeue one or every dead row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from triagenode.audit.events import AuditLog
from triagenode.cli import main
from triagenode.config.settings import load_settings
from triagenode.delivery.exporter import ExportOutbox
from triagenode.store import migrate
from triagenode.store.db import Database

CONFIG = """
[node]
data_dir = "{data_dir}"

[audit]
secret = "test-secret-0123456789abcdef"

[export]
max_attempts = 2

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "triagenode.toml"
    path.write_text(CONFIG.format(data_dir=tmp_path / "data"))
    return path


def _outbox(config: Path) -> ExportOutbox:
    settings = load_settings(config)
    db = Database(settings.database_url)
    migrate.upgrade(db)
    return ExportOutbox(db, AuditLog(db, b"test-secret-0123456789abcdef"), settings)


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict]:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_list_and_retry(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outbox = _outbox(config)
    first = outbox.enqueue(None, "1.2.3.1", "2.25.1", "results/a.dcm", 40)[0]
    second = outbox.enqueue(None, "1.2.3.2", "2.25.2", "results/b.dcm", 20)[0]
    for _ in range(2):
        outbox.mark_failed(first, "association rejected by PACS@127.0.0.1:4242")
    outbox.mark_sent(second)

    rows = _json(capsys, "exports", "--config", str(config), "--json")
    assert {r["id"]: r["state"] for r in rows} == {first: "dead", second: "sent"}
    dead = _json(capsys, "exports", "--config", str(config), "--json", "--state", "dead")
    assert [(r["id"], r["priority"], r["attempts"]) for r in dead] == [(first, "stat", 2)]
    assert "association rejected" in dead[0]["last_error"]

    assert main(["exports", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert "DESTINATION" in table and "2.25.1" in table

    assert main(["exports", "retry", str(second), "--config", str(config)]) == 1
    assert "it is sent" in capsys.readouterr().out
    assert main(["exports", "retry", "--all-dead", "--config", str(config)]) == 0
    assert "requeued 1 dead export" in capsys.readouterr().out
    assert outbox.get(first).state == "pending"  # type: ignore[union-attr]

    outbox.mark_failed(first, "refused")
    outbox.mark_failed(first, "refused")
    assert main(["exports", "retry", str(first), "--config", str(config)]) == 0
    assert f"export {first} requeued" in capsys.readouterr().out
    row = outbox.get(first)
    assert row is not None and row.state == "pending" and row.attempts == 0
    outbox.db.dispose()
