"""The CPU image, built from nothing and run the way a site runs it.

A Docker engine started by ``scripts/test-docker`` (root, no iptables, host network) builds
the base image with debootstrap (once per machine), the wheelhouse and ``docker/Dockerfile``,
then runs the container with a read-only root filesystem, the demo model, the test
PostgreSQL (password from a secret file) and Orthanc as the destination: C-ECHO, a study in,
its SR in Orthanc; then ``docker stop`` while studies are in flight must leave no job leased
and a restart must deliver every SR exactly once. Skipped, with the reason, where dockerd
cannot start.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests import factory
from tests.conftest import fresh_postgres_database
from tests.orthanc import OrthancServer
from tests.peers import free_port, run_tool, wait_for
from triagenode.store.db import Database
from triagenode.store.models import Export, Job, Study

pytestmark = [
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.timeout(1200),
]

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
BASE_IMAGE = "triagenode-base/debian:bookworm-slim"
IMAGE = "triagenode:test"
NODE_UID = "10001"


def _run(*command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable},
    )


def _checked(*command: str, timeout: float = 900) -> str:
    done = _run(*command, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}\n"
        f"{done.stderr[-4000:]}"
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image, built from this checkout (base image and wheels cached on the machine)."""
    if shutil.which("docker") is None:
        pytest.skip("container test: no docker client (Debian package docker.io)")
    started = _run(str(REPO / "scripts/test-docker"), "start", timeout=120)
    if started.returncode != 0:
        pytest.skip(f"container test: dockerd cannot start here: {started.stderr.strip()}")
    _checked("docker/make-base-image", BASE_IMAGE)
    _checked("docker/build-wheelhouse", "cpu")
    _checked(
        "docker", "build", "--network", "host", "--quiet", "--file", "docker/Dockerfile",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--tag", IMAGE, "build/wheelhouse-cpu",
    )  # fmt: skip
    return IMAGE


@dataclass
class NodeContainer:
    """One ``triagenode serve --demo-model`` container on the host network."""

    name: str
    scp_port: int
    api_port: int

    def state(self, field: str) -> str:
        return _checked("docker", "inspect", "--format", f"{{{{{field}}}}}", self.name)

    def exec(self, *command: str) -> str:
        return _checked("docker", "exec", self.name, *command, timeout=60)

    def logs(self, tail: int = 60) -> str:
        done = _run("docker", "logs", "--tail", str(tail), self.name, timeout=60)
        return done.stdout + done.stderr

    def wait_healthy(self) -> None:
        def healthy() -> bool:
            status = self.state(".State.Health.Status")
            assert status != "unhealthy", self.logs()
            assert self.state(".State.Running") == "true", self.logs()
            return status == "healthy"

        wait_for(healthy, timeout=240, interval=1.0, what="the container's health check")


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh database on the test PostgreSQL, reachable from the host network."""
    with fresh_postgres_database("tn_container") as url:
        yield url


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def node(
    image: str, database: str, pacs: OrthancServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeContainer]:
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "db_password").write_text("not-needed-by-trust-auth\n", encoding="utf-8")
    secrets.chmod(0o755)
    (secrets / "db_password").chmod(0o644)
    container = NodeContainer(f"triagenode-test-{uuid.uuid4().hex[:8]}", free_port(), free_port())
    volume = f"{container.name}-data"
    destinations = [
        {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
    ]
    environment = {
        "TRIAGENODE_DATABASE__URL": database,
        "TRIAGENODE_DATABASE__PASSWORD_FILE": "/run/secrets/db_password",
        "TRIAGENODE_SCP__PORT": str(container.scp_port),
        "TRIAGENODE_API__HOST": "127.0.0.1",
        "TRIAGENODE_API__PORT": str(container.api_port),
        "TRIAGENODE_STUDY__STABLE_AFTER_S": "1",
        "TRIAGENODE_EXPORT__BACKOFF_INITIAL_S": "0.2",
        "TRIAGENODE_EXPORT__BACKOFF_MAX_S": "1",
        "TRIAGENODE_DESTINATIONS": json.dumps(destinations),
    }
    _checked("docker", "volume", "create", volume)
    try:
        _checked(
            "docker", "run", "--detach", "--name", container.name, "--network", "host",
            "--read-only", "--tmpfs", "/tmp", "--health-interval", "2s",
            "--volume", f"{volume}:/var/lib/triagenode",
            "--volume", f"{secrets}:/run/secrets:ro",
            *(f"--env={key}={value}" for key, value in environment.items()),
            image, "serve", "--demo-model",
        )  # fmt: skip
        container.wait_healthy()
        yield container
    finally:
        _run("docker", "rm", "--force", container.name, timeout=120)
        _run("docker", "volume", "rm", volume, timeout=120)


def send(node: NodeContainer, paths: list[Path]) -> None:
    sent = run_tool(
        "storescu", "-aec", "TRIAGENODE", "127.0.0.1", str(node.scp_port), *map(str, paths)
    )
    assert sent.returncode == 0, sent.stderr


def srs(pacs: OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    found = []
    for instance in pacs.study_instances(study_uid):
        ds = pydicom.dcmread(io.BytesIO(pacs.download(instance["ID"])))
        if ds.Modality == "SR":
            found.append(ds)
    return found


def sr_count(pacs: OrthancServer, study_uid: str) -> int:
    return len(srs(pacs, study_uid))


def test_runs_as_a_site_runs_it_and_returns_the_sr(
    node: NodeContainer, pacs: OrthancServer, tmp_path: Path
) -> None:
    # Non-root, tini as PID 1, nothing writable but the volume and /tmp.
    assert node.exec("id", "-u") == NODE_UID
    assert node.exec("cat", "/proc/1/comm") == "tini"
    assert node.state(".HostConfig.ReadonlyRootfs") == "true"
    refused = _run("docker", "exec", node.name, "touch", "/opt/triagenode/x", timeout=60)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    # No DICOM tools (DCMTK) in the runtime image.
    assert _run("docker", "exec", node.name, "dpkg", "-s", "dcmtk", timeout=60).returncode != 0

    echo = run_tool("echoscu", "-aec", "TRIAGENODE", "127.0.0.1", str(node.scp_port))
    assert echo.returncode == 0, echo.stderr

    study_uid, paths = factory.ct_study(tmp_path / "ct", slices=4)
    send(node, paths)
    wait_for(lambda: sr_count(pacs, study_uid) == 1, timeout=180, interval=0.5, what="the SR")
    (sr,) = srs(pacs, study_uid)
    assert sr.StudyInstanceUID == study_uid
    assert "DEMO" in sr.SeriesDescription


def test_stop_drains_and_a_restart_delivers_every_sr_exactly_once(
    node: NodeContainer, pacs: OrthancServer, database: str, tmp_path: Path
) -> None:
    studies = [factory.ct_study(tmp_path / f"ct{i}", slices=6) for i in range(4)]
    for _, paths in studies:
        send(node, paths)
    uids = {uid for uid, _ in studies}
    db = Database(database)
    try:

        def jobs() -> dict[str, str]:
            with db.session() as session:
                rows = session.execute(
                    select(Study.study_uid, Job.state).join(Study, Study.id == Job.study_id)
                ).all()
            return {uid: state for uid, state in rows if uid in uids}

        # Stop as soon as the first of these jobs exists: the rest are queued or in flight.
        wait_for(jobs, timeout=120, what="the first job")
        _checked("docker", "stop", "--time", "60", node.name, timeout=120)
        assert node.state(".State.ExitCode") == "0", node.logs()  # drained, not killed
        assert f"received signal {signal.SIGTERM.value}, stopping" in node.logs(tail=400)
        after_stop = jobs()
        assert "leased" not in after_stop.values(), after_stop
        # Work was left for the restart (else this test would prove nothing about draining).
        assert len(after_stop) < len(uids) or "pending" in after_stop.values(), after_stop
        with db.session() as session:
            export_states = set(session.execute(select(Export.state)).scalars())
        assert export_states <= {"pending", "sent"}, export_states

        _checked("docker", "start", node.name)
        node.wait_healthy()

        def all_delivered() -> bool:
            with db.session() as session:
                exports = set(session.execute(select(Export.state)).scalars())
            done = jobs()
            return len(done) == len(uids) and set(done.values()) == {"done"} and exports == {"sent"}

        wait_for(all_delivered, timeout=240, interval=0.5, what="every job done, every SR sent")
        assert {uid: sr_count(pacs, uid) for uid in uids} == dict.fromkeys(uids, 1)
    finally:
        db.dispose()
