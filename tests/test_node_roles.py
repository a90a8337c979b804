"""The composition root builds what a process's roles need, and nothing else.

``serve --role`` splits the node over processes sharing one PostgreSQL database; these tests
build each role's node for real (database, migrations, model, sockets) and look at what it has.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import peers
from triagenode.config.settings import load_settings
from triagenode.errors import ConfigError
from triagenode.node import Node


@pytest.mark.postgres
def test_each_role_builds_only_its_parts(make_settings: Any, postgres_url: str) -> None:
    settings = make_settings(database={"url": postgres_url}, api={"enabled": True})

    receiver = Node.build(settings, roles=["receiver"])
    try:
        assert receiver.roles == {"receiver"}
        assert receiver.receiver is not None
        assert receiver.classifier is None  # no model in a receiver process
        assert receiver.exporter is None and receiver.probe is None
    finally:
        receiver.db.dispose()

    worker = Node.build(settings, roles=["worker"])
    try:
        assert worker.classifier is not None and worker.classifier.batcher is not None
        assert worker.receiver is None and worker.probe is None
    finally:
        worker.stop()

    every = Node.build(settings, roles=["all"])
    try:
        assert every.roles == {"receiver", "worker", "exporter", "api"}
        assert every.receiver is not None and every.classifier is not None
        assert every.probe is not None
    finally:
        every.stop()


@pytest.mark.postgres
def test_an_api_process_answers_without_a_model(make_settings: Any, postgres_url: str) -> None:
    port = peers.free_port()
    settings = make_settings(database={"url": postgres_url}, api={"enabled": True, "port": port})
    node = Node.build(settings, roles=["api"])
    node.start()
    try:
        assert node.classifier is None
        ready = peers.wait_for(
            lambda: _get(f"http://127.0.0.1:{port}/readyz"), timeout=30, what="API up"
        )
        body = ready.json()
        # the model is a worker's: this process is ready without one
        assert body["checks"]["model"] == {"configured": False, "ok": True}
        assert ready.status_code == 200 and body["ready"] is True, body
    finally:
        node.stop()


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None


def test_sqlite_refuses_roles_for_several_processes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node\.roles: .*PostgreSQL"):
        load_settings(None, node={"data_dir": str(tmp_path), "roles": ["receiver"]})
    # one process with every role is what SQLite is for
    assert load_settings(None, node={"data_dir": str(tmp_path), "roles": ["all"]}).roles == {
        "receiver",
        "worker",
        "exporter",
        "api",
    }


def test_serve_role_flag_is_checked_before_anything_starts(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "triagenode.cli", "serve", "--demo-model", "--role", "worker"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "TRIAGENODE_NODE__DATA_DIR": str(tmp_path / "d")},
    )
    assert result.returncode != 0
    assert "node.roles" in result.stderr and "PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d" / "triagenode.sqlite3").exists()  # refused before opening it


def test_unknown_role_is_refused_by_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "triagenode.cli", "serve", "--role", "router"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "invalid choice: 'router'" in result.stderr


def test_config_error_names_the_role(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="roles"):
        load_settings(None, node={"data_dir": str(tmp_path), "roles": ["router"]})
