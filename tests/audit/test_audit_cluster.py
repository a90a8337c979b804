"""One audit chain across processes: several processes appending to one PostgreSQL database
at once leave one intact chain, and only one of them writes the signed checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from triagenode.audit.checkpoint import CheckpointLog, read_checkpoints
from triagenode.cli import main
from triagenode.config.settings import load_settings
from triagenode.store import migrate
from triagenode.store.db import Database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PROCESSES = 3
EVENTS = 40

APPENDER = textwrap.dedent(
    """
    import sys, threading
    from triagenode.audit import AuditEventId, AuditLog, load_or_create_secret
    from triagenode.audit.checkpoint import CheckpointLog, HeadCheckpointer
    from triagenode.config.settings import load_settings
    from triagenode.pipeline.cluster import ClusterSingleton, ClusterWork
    from triagenode.store.db import Database

    settings = load_settings(sys.argv[1])
    db = Database(settings.database_url)
    # appenders write no checkpoints of their own: that is the cluster's one writer's work
    audit = AuditLog(db, load_or_create_secret(settings), None)
    checkpoints = ClusterSingleton(
        db,
        ClusterWork.audit_checkpoints,
        lambda: HeadCheckpointer(db, CheckpointLog.from_settings(settings), interval_s=0.05),
        retry_s=0.1,
    )
    checkpoints.start()
    print("ready", flush=True)
    sys.stdin.readline()  # all start appending together
    for number in range(int(sys.argv[2])):
        audit.record(AuditEventId.query, actor=f"p{sys.argv[3]}-{number}")
    print("appended", checkpoints.takeovers, flush=True)
    sys.stdin.readline()  # every process stays up until all have appended
    checkpoints.stop()
    """
)


@pytest.mark.timeout(180)
def test_processes_appending_at_once_leave_one_intact_chain(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "triagenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[database]\nurl = "{postgres_url}"\n'
        '[audit]\nsecret = "cluster-audit-test-secret-0123"\n',
        encoding="utf-8",
    )
    settings = load_settings(config)
    db = Database(settings.database_url)
    migrate.upgrade(db)
    db.dispose()
    CheckpointLog.from_settings(settings)  # the signing key, made once before the processes
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(config), str(EVENTS), str(number)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for number in range(PROCESSES)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        takeovers = []
        for process in processes:
            assert process.stdout is not None
            word, count = process.stdout.readline().split()
            assert word == "appended"
            takeovers.append(int(count))
        # the standbys leave first, then the holder (which checkpoints the final head)
        for _, process in sorted(zip(takeovers, processes, strict=True), key=lambda p: p[0]):
            process.communicate("stop\n", timeout=60)
            assert process.returncode == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    # exactly one process held the checkpoint work the whole time
    assert sorted(takeovers) == [0] * (PROCESSES - 1) + [1]
    checkpoint_file = tmp_path / "data" / "audit-checkpoints.log"
    seqs = [c.seq for c in read_checkpoints(checkpoint_file) if not isinstance(c, str)]
    assert seqs and seqs == sorted(set(seqs))  # one writer: ascending, none twice
    assert seqs[-1] == PROCESSES * EVENTS  # the last head, checkpointed at stop

    capsys.readouterr()
    code = main(["audit", "verify", "--config", str(config), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["ok"] and report["count"] == PROCESSES * EVENTS
    assert report["checkpoints"] == len(seqs)
