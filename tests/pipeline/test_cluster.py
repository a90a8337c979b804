"""Cluster-wide work held by one process at a time (PostgreSQL advisory locks), taken over
when that process dies; SQLite runs it in its one process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.peers import wait_for
from triagenode.metrics import REGISTRY
from triagenode.pipeline.cluster import (
    LOCK_KEYS,
    ClusterSingleton,
    ClusterWork,
    cluster_holders,
)
from triagenode.pipeline.worker import WorkerPool
from triagenode.store import migrate
from triagenode.store.db import Database


class RecordingPart:
    """A part that counts how often it runs, across every instance made."""

    running: list[RecordingPart] = []
    stopped: list[str] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self) -> None:
        RecordingPart.running.append(self)

    def stop(self) -> None:
        RecordingPart.running.remove(self)
        RecordingPart.stopped.append(self.name)


@pytest.fixture(autouse=True)
def _no_parts_left() -> Iterator[None]:
    RecordingPart.running.clear()
    RecordingPart.stopped.clear()
    yield
    RecordingPart.running.clear()


def held(work: str) -> float | None:
    """The metric that tells which kinds of work this process holds."""
    return REGISTRY.get_sample_value("triagenode_cluster_work_held", {"work": work})


def running_names() -> list[str]:
    return [part.name for part in RecordingPart.running]


def singleton(
    db: Database, name: str, work: ClusterWork = ClusterWork.scheduler
) -> ClusterSingleton:
    return ClusterSingleton(db, work, lambda: RecordingPart(name), retry_s=0.1, check_s=0.1)


# SQLite: one process, the part just runs ---------------------------------------------------


def test_on_sqlite_the_part_runs_at_once(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'one.sqlite3'}")
    holder = singleton(db, "a")
    holder.start()
    assert running_names() == ["a"] and holder.holds
    assert cluster_holders(db) == {work.value: "local" for work in ClusterWork}
    assert held("scheduler") == 1
    holder.stop()
    assert running_names() == [] and not holder.holds
    assert held("scheduler") == 0
    db.dispose()


# PostgreSQL: one holder, takeover ----------------------------------------------------------


@pytest.fixture
def pg_dbs(postgres_url: str) -> Iterator[list[Database]]:
    """Three engines on one database: as three processes would see it."""
    dbs = [Database(postgres_url) for _ in range(3)]
    yield dbs
    for db in dbs:
        db.dispose()


@pytest.mark.postgres
def test_one_holder_at_a_time_and_takeover_on_stop(pg_dbs: list[Database]) -> None:
    holders = [singleton(db, name) for db, name in zip(pg_dbs, "abc", strict=True)]
    for holder in holders:
        holder.start()
    first = wait_for(running_names, what="a holder")
    time.sleep(0.5)  # several standby retries: nobody else may start it meanwhile
    assert running_names() == first and len(first) == 1
    named = cluster_holders(pg_dbs[0])[ClusterWork.scheduler.value]
    assert named is not None and named.startswith("triagenode:") and named.endswith(":scheduler")
    # the holder stops cleanly: another takes over within a few retries
    by_name = dict(zip("abc", holders, strict=True))
    by_name[first[0]].stop()
    second = wait_for(running_names, timeout=5, what="a takeover")
    assert len(second) == 1 and second != first
    for holder in holders:
        holder.stop()
    assert running_names() == []
    assert cluster_holders(pg_dbs[0])[ClusterWork.scheduler.value] is None


@pytest.mark.postgres
def test_each_kind_of_work_has_its_own_lock(pg_dbs: list[Database]) -> None:
    scheduler = singleton(pg_dbs[0], "scheduler", ClusterWork.scheduler)
    retention = singleton(pg_dbs[1], "retention", ClusterWork.retention)
    scheduler.start()
    retention.start()
    wait_for(lambda: len(running_names()) == 2, what="both kinds running")
    holders = cluster_holders(pg_dbs[2])
    assert holders["scheduler"] and holders["retention"]
    assert holders["audit-forwarding"] is None
    scheduler.stop()
    retention.stop()


@pytest.mark.postgres
def test_holder_that_loses_its_connection_stops_the_part(
    pg_dbs: list[Database], postgres_url: str
) -> None:
    """The server drops the holder's lock connection: the holder stops its copy at once and
    the work runs on in one process (never two copies for longer than one check)."""
    a = singleton(pg_dbs[0], "a")
    b = singleton(pg_dbs[1], "b")
    try:
        a.start()
        wait_for(lambda: running_names() == ["a"], what="a holds")
        b.start()
        key = LOCK_KEYS[ClusterWork.scheduler]
        admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND granted AND classid = :high AND objid = :low AND objsubid = 1"
                ),
                {"high": key >> 32, "low": key & 0xFFFF_FFFF},
            ).all()
        admin.dispose()
        assert killed == [(True,)]
        wait_for(lambda: RecordingPart.stopped == ["a"], timeout=5, what="a stopping its copy")
        wait_for(running_names, timeout=5, what="a takeover")
        assert len(running_names()) == 1
    finally:
        b.stop()
        a.stop()


HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from triagenode.pipeline.cluster import ClusterSingleton, ClusterWork
    from triagenode.store.db import Database

    class Part:
        def start(self): print("holding", flush=True)
        def stop(self): pass

    holder = ClusterSingleton(Database(sys.argv[1]), ClusterWork.scheduler, Part, retry_s=0.1)
    holder.start()
    threading.Event().wait()
    """
)


@pytest.mark.postgres
@pytest.mark.slow
def test_takeover_within_seconds_when_the_holder_is_killed(
    pg_dbs: list[Database], postgres_url: str
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, postgres_url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "holding"
        standby = singleton(pg_dbs[0], "standby")
        standby.start()
        time.sleep(0.5)  # several retries while the other process lives
        assert running_names() == []
        killed_at = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        wait_for(lambda: running_names() == ["standby"], timeout=10, what="takeover")
        assert time.monotonic() - killed_at < 5
        standby.stop()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


class RecordingQueue:
    def __init__(self) -> None:
        self.owners: set[str] = set()

    def claim(self, worker_id: str) -> None:
        self.owners.add(worker_id)


def test_worker_lease_owners_name_their_process() -> None:
    """Workers of different processes share the queue: their lease owners must differ."""
    queue = RecordingQueue()
    pool = WorkerPool(object(), queue, workers=2)  # type: ignore[arg-type]
    pool.start()
    try:
        wait_for(lambda: len(queue.owners) == 2, what="both workers asking for a job")
    finally:
        pool.stop()
    suffix = f"@{socket.gethostname()}:{os.getpid()}"
    assert sorted(queue.owners) == [f"worker-0{suffix}", f"worker-1{suffix}"]


@pytest.mark.postgres
def test_processes_starting_together_migrate_one_at_a_time(pg_dbs: list[Database]) -> None:
    """Every process of a split node migrates at start: on an empty database at once."""
    results: list[str] = []
    errors: list[BaseException] = []

    def upgrade(db: Database) -> None:
        try:
            results.append(migrate.upgrade(db))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade, args=(db,)) for db in pg_dbs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert results == [migrate.head_revision()] * len(pg_dbs)
