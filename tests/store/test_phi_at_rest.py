"""PHI at rest on a real ``triagenode serve``: owner-only files and folders, and the
retention purge (``triagenode purge``, ``--dry-run``), audited per study."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.cli.test_serve_process import send_study, start_serve, write_config
from tests.peers import wait_for, wait_for_port
from tests.serve_fixtures import StoreScp
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent, Export, Instance, Result, Study

pytestmark = pytest.mark.slow

RETENTION = """
[retention]
spool_days = 0
results_days = 0
interval_minutes = 0
"""


def _cli(config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "triagenode.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done


def _purge(config: Path, *flags: str, env: dict[str, str] | None = None) -> list[dict]:
    return json.loads(_cli(config, "purge", "--json", *flags, env=env).stdout)["studies"]


def test_files_are_owner_only_and_purged_after_export(tmp_path: Path, pacs: StoreScp) -> None:
    config, port = write_config(tmp_path, pacs, RETENTION)
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    db = Database(f"sqlite:///{data / 'triagenode.sqlite3'}")
    process = start_serve(config, log)
    try:
        wait_for_port(port, timeout=120)
        study_uid = send_study(port, tmp_path, slices=3)

        def exported() -> bool:
            with db.session() as session:
                return session.scalar(select(Export.state)) == "sent"

        wait_for(exported, timeout=120, what="the SR exported")
        # while the node runs too: the WAL files of SQLite are owner-only
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in data.rglob("*")}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()

    # 1. owner-only: the data folder 0700, every folder and file in it without group/other
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    modes.update({p: stat.S_IMODE(p.stat().st_mode) for p in data.rglob("*")})
    spool_files = [p for p in (data / "spool").rglob("*") if p.is_file()]
    sr_files = [p for p in (data / "results").rglob("*.dcm")]
    assert len(spool_files) == 3 and len(sr_files) == 1
    assert data / "triagenode.sqlite3" in modes
    open_to_others = {str(p): oct(m) for p, m in modes.items() if m & 0o077}
    assert not open_to_others

    # 2. dry run: listed, nothing deleted; a longer policy lists nothing
    later = {"TRIAGENODE_RETENTION__SPOOL_DAYS": "1", "TRIAGENODE_RETENTION__RESULTS_DAYS": "1"}
    assert _purge(config, "--dry-run", env=later) == []
    (listed,) = _purge(config, "--dry-run")
    assert listed["study_uid"] == study_uid
    assert (listed["spool_files"], listed["sr_files"]) == (3, 1)
    assert all(p.exists() for p in [*spool_files, *sr_files])
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.event_type == "retention_purge")) == 0  # fmt: skip

    # 3. purge: files gone, rows that say what happened stay, one audit event for the study
    (purged,) = _purge(config)
    assert purged["files_deleted"] == 4
    assert not any(p.exists() for p in [*spool_files, *sr_files])
    assert not (data / "spool" / study_uid).exists()  # UID-named folders go too
    with db.session() as session:
        study = session.scalars(select(Study)).one()
        assert study.study_uid == study_uid and study.state == "reported"
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
        result = session.scalars(select(Result)).one()
        assert result.sr_path is None and result.findings
        assert "retention purge" in study.events[-1].reason
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "retention_purge")
        ).one()
        assert (event.event_id, event.action, event.study_uid) == ("110103", "D", study_uid)
        assert event.patient_ref == study.patient_ref and event.patient_ref
        assert event.details["spool_files"] == 3 and event.details["sr_files"] == 1
    db.dispose()
    assert _purge(config) == []  # nothing left to do: a second run is a no-op
    _cli(config, "audit", "verify")  # the chain still verifies with the purge events in it
