"""Ingest benchmark: the node's receiver against DCMTK ``storescp``, same machine, same run.

Generates a CT study (default 200 slices of 512x512, 16-bit, about 100 MB), sends it with
DCMTK ``storescu`` (``TCP_NODELAY=1``) over one association and over 4 concurrent senders
(the files split in 4), 3 runs each, to

- the node's :class:`~triagenode.scp.receiver.DicomReceiver` (durable: every instance is
  fsynced, renamed, its directory fsynced and its rows committed before success), and
- DCMTK ``storescp`` writing to a temp folder (no fsync),

and prints seconds, MB/s and the ratio of throughputs node / DCMTK. It also times the
"durability floor": the same files written with the node's fsync/rename/commit sequence by a
bare loop, with no network and no Python receive logic, i.e. what the house rules alone cost
on this disk. DCMTK ``storescp`` never fsyncs, so on a slow or busy disk the floor, not the
receiver's code, decides the ratio.

Usage::

    python benchmarks/ingest.py [--slices 200] [--size 512] [--runs 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import DCMTK_ENV, STORESCP, STORESCU, free_port, make_ct_study, wait_port


def _fresh(work: Path, name: str) -> Path:
    """A new empty folder for one run; earlier runs' files stay until the end.

    Deleting a run's ~200 files just before the next run would slow the next run's file
    creation (ext4 skips recently freed inodes while allocating: 200-250 us per created
    file instead of 10-20 us, seen here), a cost no receiver pays in service.
    """
    for i in range(1, 1000):
        folder = work / f"{name}-{i}"
        if not folder.exists():
            folder.mkdir(parents=True)
            return folder
    raise RuntimeError(f"no free folder name for {name}")


@dataclass
class Run:
    """One timed transfer: wall seconds, and CPU seconds (user + system) of each side."""

    seconds: float
    receiver_cpu: float = 0.0
    senders_cpu: float = 0.0


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def send(port: int, groups: list[list[Path]]) -> Run:
    """Run one storescu per group at once; seconds until all have finished."""
    senders_before = _cpu(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", "BENCH", "-aec", "TRIAGENODE", "127.0.0.1", str(port), *files],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for files in groups
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    seconds = time.perf_counter() - started
    return Run(seconds, senders_cpu=_cpu(resource.RUSAGE_CHILDREN) - senders_before)


def run_dcmtk(groups: list[list[Path]], work: Path) -> Run:
    out = _fresh(work, "dcmtk-out")
    port = free_port()
    server = subprocess.Popen(
        [STORESCP, "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        run = send(port, groups)
    finally:
        server.terminate()
        before = _cpu(resource.RUSAGE_CHILDREN)
        server.wait()
    # storescp's CPU includes its start-up (dictionary loading, a few ms).
    run.receiver_cpu = _cpu(resource.RUSAGE_CHILDREN) - before
    received = sum(1 for _ in out.iterdir())
    if received != sum(len(g) for g in groups):
        raise RuntimeError(f"storescp stored {received} files")
    return run


def run_node(groups: list[list[Path]], work: Path, database_url: str | None) -> Run:
    from triagenode.audit.events import AuditLog
    from triagenode.config.settings import load_settings
    from triagenode.scp.receiver import DicomReceiver
    from triagenode.store import migrate
    from triagenode.store.db import Database

    data = _fresh(work, "node-data")
    settings = load_settings(
        None,
        node={"data_dir": str(data)},
        scp={"host": "127.0.0.1", "port": free_port()},  # the node's defaults
        database={"url": database_url} if database_url else {},
        audit={"secret": "benchmark-secret-0123456789"},
    )
    db = Database(settings.database_url)
    if database_url:  # a fresh schema per run, like the fresh SQLite file
        from triagenode.store.models import Base

        Base.metadata.drop_all(db.engine)
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    migrate.upgrade(db)
    receiver = DicomReceiver(settings, db, AuditLog(db, b"benchmark-secret-0123456789"))
    receiver.start()
    try:
        before = _cpu(resource.RUSAGE_SELF)
        run = send(receiver.port, groups)
        run.receiver_cpu = _cpu(resource.RUSAGE_SELF) - before
    finally:
        receiver.stop()
        db.dispose()
    stored = sum(1 for _ in (data / "spool").rglob("*.dcm"))
    if stored != sum(len(g) for g in groups):
        raise RuntimeError(f"node stored {stored} files")
    return run


def run_floor(files: list[Path], work: Path) -> float:
    """The disk's price of the house rules alone, no network and no Python logic.

    For each file: write it to a temp file, fsync, rename, fsync the folder, then commit a
    row to SQLite (WAL, synchronous=FULL): the three ordered flushes every acknowledged
    instance costs. No receiver can be faster than this on the same disk.
    """
    import sqlite3

    folder = _fresh(work, "floor")
    db = sqlite3.connect(folder / "floor.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (path TEXT)")
    blobs = [p.read_bytes() for p in files]
    started = time.perf_counter()
    for i, blob in enumerate(blobs):
        temp, final = folder / f"{i}.part", folder / f"{i}.dcm"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, blob)
        os.fsync(fd)
        os.close(fd)
        os.replace(temp, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?)", (str(final),))
        db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temp dir")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tn-bench-") as tmp:
        work = Path(tmp)
        _, files = make_ct_study(work / "study", args.slices, args.size)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"study: {len(files)} files, {megabytes:.1f} MB; runs: {args.runs}")
        k = args.senders
        layouts = {"1 association": [files], f"{k} concurrent": [files[i::k] for i in range(k)]}
        results: dict[str, dict[str, object]] = {}
        floor: list[float] = []
        for layout, groups in layouts.items():
            runs: dict[str, list[Run]] = {"DCMTK storescp": [], "triagenode": []}
            for _ in range(args.runs):  # interleaved so drifts in machine load hit all
                runs["DCMTK storescp"].append(run_dcmtk(groups, work))
                runs["triagenode"].append(run_node(groups, work, args.database_url))
                if len(groups) == 1:
                    floor.append(run_floor(files, work))
            dcmtk = [r.seconds for r in runs["DCMTK storescp"]]
            node = [r.seconds for r in runs["triagenode"]]
            ratio = statistics.median(dcmtk) / statistics.median(node)
            results[layout] = {
                "dcmtk_s": dcmtk,
                "node_s": node,
                "ratio": ratio,
                "mb": megabytes,
                "cpu_s": {
                    name: {
                        "receiver": [r.receiver_cpu for r in done],
                        "senders": [r.senders_cpu for r in done],
                    }
                    for name, done in runs.items()
                },
            }
            for name, done in runs.items():
                print(
                    f"{layout:>14} {name:<15} s: "
                    + ", ".join(f"{r.seconds:.3f}" for r in done)
                    + "   MB/s: "
                    + ", ".join(f"{megabytes / r.seconds:.0f}" for r in done)
                    + "   CPU s receiver/senders: "
                    + ", ".join(f"{r.receiver_cpu:.2f}/{r.senders_cpu:.2f}" for r in done)
                )
            print(f"{layout:>14} throughput node / DCMTK (medians): {ratio:.2f}x")
            if len(groups) == 1:
                results["durability floor"] = {"seconds": floor}
                print(
                    f"{layout:>14} durability floor (bare write, fsync, rename, dir fsync, "
                    "SQLite commit per file) s: " + ", ".join(f"{t:.3f}" for t in floor)
                )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
