"""Scale-out: one node as separate ``triagenode serve --role ...`` processes on one
PostgreSQL database and one spool folder, with processes killed while they work.

Two receivers (different ports), two workers, one exporter and one API process, the demo
model, Orthanc as the PACS. Thirty studies arrive across both receivers, ten of them stat. A
receiver is killed in the middle of a study (the sender fails over to the other receiver,
then the killed one is restarted); once every study is queued the workers start, one of them
is killed by SIGKILL while it holds a job, and so is the process holding the cluster-wide
work (it is restarted, as a supervisor would). Every study must get exactly one SR in
Orthanc, the stat studies be taken before the routine ones, no job be left behind, and the
audit trail verify intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests import factory
from tests.orthanc import OrthancServer
from tests.peers import free_port, run_tool, tool, wait_for, wait_for_port
from triagenode.pipeline.cluster import ClusterWork, cluster_holders
from triagenode.pipeline.jobs import JobState
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent, Job, Study, StudyEvent

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

STAT, ROUTINE = 10, 20
STAT_DESCRIPTION = "CT HEAD STROKE PROTOCOL"  # the default rule "code-stroke": stat
SERVE = [sys.executable, "-m", "triagenode.cli", "serve"]


@dataclass
class Serve:
    """One ``triagenode serve`` process of the cluster."""

    name: str
    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    lives: list[int] = field(default_factory=list)  # pids, oldest first

    def start(self, config: Path) -> Serve:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [*SERVE, "--config", str(config), "--demo-model", "--workers", "1", *self.args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
        self.lives.append(self.process.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> int | None:
        """The exit status once stopped (killed after a minute: None)."""
        if self.process is None:
            return None
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return None


def stop_all(serves: dict[str, Serve]) -> dict[str, int | None]:
    """SIGTERM to every running process at once, then their exit statuses."""
    running = [name for name, serve in serves.items() if serve.running]
    for name in running:
        serves[name].terminate()
    return {name: serves[name].wait() for name in running}


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[dict[str, object]]:
    pacs = OrthancServer(tmp_path / "orthanc").start()
    api_port = free_port()
    config = tmp_path / "triagenode.toml"
    config.write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"
[database]
url = "{postgres_url}"
[scp]
host = "127.0.0.1"
[study]
stable_after_s = 2.0
[model]
source = "demo"
[api]
host = "127.0.0.1"
port = {api_port}
[audit]
secret = "scale-out-test-secret-0123456789"
[triage]
lease_s = 5.0
[export]
backoff_initial_s = 0.2
[cluster]
retry_s = 0.5
check_s = 0.5
[[destinations]]
name = "pacs"
ae_title = "{pacs.ae_title}"
host = "127.0.0.1"
port = {pacs.dicom_port}
send = ["sr"]
""",
        encoding="utf-8",
    )
    db = Database(postgres_url)
    logs = tmp_path / "logs"
    logs.mkdir()
    ports = [free_port(), free_port()]
    receiver = ["--role", "receiver", "--port"]
    serves = {
        "receiver-1": Serve("receiver-1", [*receiver, str(ports[0])], logs / "r1"),
        "receiver-2": Serve("receiver-2", [*receiver, str(ports[1])], logs / "r2"),
        "exporter": Serve("exporter", ["--role", "exporter"], logs / "exporter"),
        "api": Serve("api", ["--role", "api"], logs / "api"),
        "worker-1": Serve("worker-1", ["--role", "worker"], logs / "w1"),
        "worker-2": Serve("worker-2", ["--role", "worker"], logs / "w2"),
    }
    state: dict[str, object] = {
        "pacs": pacs,
        "config": config,
        "db": db,
        "ports": ports,
        "api_port": api_port,
        "serves": serves,
    }
    try:
        yield state
    finally:
        stop_all(serves)  # after a failure: whatever still runs
        db.dispose()
        pacs.stop()


def start_count(db: Database) -> int:
    with db.session() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.event_type == "start")
            )
            or 0
        )


def send(port: int, paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return run_tool("storescu", "-aec", "TRIAGENODE", "127.0.0.1", str(port), *map(str, paths))


def holder_pid(db: Database, work: ClusterWork) -> int | None:
    name = cluster_holders(db)[work.value]
    return int(name.split(":")[2]) if name else None


def states(db: Database) -> dict[str, int]:
    with db.session() as session:
        return dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())


def wait_for_states(db: Database, want: dict[str, int], timeout: float) -> None:
    try:
        wait_for(lambda: states(db) == want, timeout=timeout, what=f"studies {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; studies by state: {states(db)}") from None


@pytest.mark.timeout(420)
def test_scale_out_processes_survive_kills_and_every_study_gets_one_sr(
    cluster: dict[str, object], tmp_path: Path
) -> None:
    pacs = cluster["pacs"]
    config = cluster["config"]
    db = cluster["db"]
    ports = cluster["ports"]
    serves = cluster["serves"]
    assert isinstance(pacs, OrthancServer) and isinstance(config, Path)
    assert isinstance(db, Database) and isinstance(ports, list) and isinstance(serves, dict)

    # 1. receivers, exporter and API (the workers come once every study is queued)
    for name in ("receiver-1", "receiver-2", "exporter", "api"):
        serves[name].start(config)
    for port in (*ports, cluster["api_port"]):
        wait_for_port(int(port), timeout=120)
    wait_for(lambda: start_count(db) >= 4, timeout=120, what="four processes started")
    assert httpx.get(f"http://127.0.0.1:{cluster['api_port']}/healthz").status_code == 200

    # 2. thirty studies across both receivers; the second receiver is killed mid-study
    studies: dict[str, tuple[bool, list[Path]]] = {}
    for number in range(STAT + ROUTINE):
        stat = number % 3 == 0  # 0, 3, ... 27: ten stat studies among the routine ones
        attributes = {"StudyDescription": STAT_DESCRIPTION} if stat else {}
        slices = 24 if number == 1 else 2  # the study cut by the receiver's death
        uid, paths = factory.ct_study(
            tmp_path / "in" / str(number), slices=slices, size=32, **attributes
        )
        studies[uid] = (stat, paths)
    uids = list(studies)
    failures: list[str] = []

    def sender(port: int, mine: list[str]) -> None:
        for uid in mine:
            result = send(port, studies[uid][1])
            if result.returncode != 0:
                failures.append(f"{uid} to {port}: {result.stderr[-500:]}")

    first = threading.Thread(target=sender, args=(ports[0], uids[0::2]))
    first.start()
    cut = uids[1]
    cut_paths = studies[cut][1]
    receiving = subprocess.Popen(
        [tool("storescu"), "-aec", "TRIAGENODE", "127.0.0.1", str(ports[1])]
        + [str(p) for p in cut_paths],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def cut_arrived() -> bool:
        with db.session() as session:
            count = session.scalar(select(Study.instance_count).where(Study.study_uid == cut))
        return (count or 0) >= 3

    wait_for(cut_arrived, timeout=60, interval=0.01, what="the cut study arriving")
    serves["receiver-2"].kill()
    receiving.wait(30)
    # the modality fails over to the other receiver and sends the whole study again
    assert send(ports[0], cut_paths).returncode == 0
    serves["receiver-2"].start(config)
    wait_for_port(ports[1], timeout=120)
    sender(ports[1], uids[3::2])
    first.join(120)
    assert not failures, failures

    # 3. every study quiet and queued, by whichever process holds the scheduler
    wait_for_states(db, {"queued": len(studies)}, timeout=60)
    with db.session() as session:
        cut_study = session.scalars(select(Study).where(Study.study_uid == cut)).one()
        assert cut_study.instance_count == len(cut_paths)  # the resend replaced, no doubles

    # 4. workers; one is killed holding a job, then the holder of the cluster-wide work
    workers = [serves["worker-1"].start(config), serves["worker-2"].start(config)]

    def first_worker_processing() -> bool:
        """worker-1 holds a job and its study shows as processing (the claim is recorded)."""
        with db.session() as session:
            owners = session.scalars(
                select(Job.lease_owner)
                .join(Study, Study.id == Job.study_id)
                .where(Job.state == JobState.leased.value, Study.state == "processing")
            ).all()
        return any(owner and owner.endswith(f":{workers[0].pid}") for owner in owners)

    wait_for(first_worker_processing, timeout=120, interval=0.01, what="worker-1 holding a job")
    workers[0].kill()
    holder = holder_pid(db, ClusterWork.scheduler)
    assert holder is not None, "no process holds the scheduler's lock (pipeline/cluster.py)"
    (holding,) = [s for s in serves.values() if s.process and s.pid == holder]
    holding.kill()
    # another live process takes the cluster-wide work over within seconds
    wait_for(
        lambda: holder_pid(db, ClusterWork.scheduler) not in (None, holder),
        timeout=15,
        what="a takeover of the scheduler",
    )
    if holding is not workers[0]:
        starts = start_count(db)
        holding.start(config)  # a supervisor restarts it
        wait_for(lambda: start_count(db) > starts, timeout=120, what=f"{holding.name} again")

    # 5. every study reported, exactly one SR each in Orthanc
    wait_for_states(db, {"reported": len(studies)}, timeout=180)

    def one_sr_each() -> bool:
        return all(len(pacs.study_instances(uid)) == 1 for uid in studies)

    wait_for(one_sr_each, timeout=60, what="one SR per study in Orthanc")
    assert pacs.instance_count() == len(studies)

    # the stat studies were taken first: each was claimed before any routine one
    with db.session() as session:
        claimed = dict(
            session.execute(
                select(Study.study_uid, func.min(StudyEvent.at))
                .join(StudyEvent, StudyEvent.study_id == Study.id)
                .where(StudyEvent.to_state == "processing")
                .group_by(Study.study_uid)
            ).all()
        )
        jobs = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    assert max(claimed[u] for u in studies if studies[u][0]) < min(
        claimed[u] for u in studies if not studies[u][0]
    )
    # no job stuck: all done, none leased, pending or failed
    assert dict(jobs) == {JobState.done.value: len(studies)}

    # the audit trail is one intact chain, written by every process
    verify = subprocess.run(
        [sys.executable, "-m", "triagenode.cli", "audit", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "audit chain intact" in verify.stdout

    # every process still running stops cleanly on SIGTERM
    codes = stop_all(serves)
    assert len(codes) == 5 and set(codes.values()) == {0}, {
        name: serves[name].log.read_text()[-2000:] for name, code in codes.items() if code != 0
    }
