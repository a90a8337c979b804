"""Shared fixtures: settings in a temp folder, SQLite and PostgreSQL databases."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.databases import DATABASES
from tests.peers import free_port
from triagenode.config.settings import Settings, load_settings
from triagenode.store import migrate
from triagenode.store.db import Database

# Fixtures of the support modules, available to every test without importing them.
pytest_plugins = ["tests.receiver_fixtures", "tests.onnx_fixtures", "tests.serve_fixtures"]

POSTGRES_ENV = "TRIAGENODE_TEST_POSTGRES_URL"


_LOCAL_PREFIXES = ("127.", "::1", "0.0.0.0", "localhost")
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _local_only(address: Any) -> None:
    if isinstance(address, tuple) and not str(address[0]).startswith(_LOCAL_PREFIXES):
        raise ConnectionRefusedError(f"tests may not reach the network ({address[0]})")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _local_only(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _local_only(address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only loopback: model weights and data are never downloaded in tests."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see a developer's TRIAGENODE_* settings, nor reach a model hub."""
    for key in list(os.environ):
        if key.startswith("TRIAGENODE_") and not key.startswith("TRIAGENODE_TEST"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def make_settings(tmp_path: Path):
    """Build settings rooted in a temp folder, with free ports; sections as keyword dicts."""

    def build(**sections: Any) -> Settings:
        base: dict[str, Any] = {
            "node": {"data_dir": str(tmp_path / "data")},
            "scp": {"port": free_port(), "host": "127.0.0.1"},
            "api": {"port": free_port()},
            "study": {"stable_after_s": 1.0},
            "model": {"source": "demo"},
            "audit": {"secret": "test-secret-0123456789abcdef"},
        }
        for name, values in sections.items():
            if isinstance(values, dict) and isinstance(base.get(name), dict):
                base[name] = {**base[name], **values}
            else:
                base[name] = values
        return load_settings(None, **base)

    return build


def postgres_server_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.fail(
            f"{POSTGRES_ENV} is not set: run the tests through scripts/test, which starts "
            "PostgreSQL, or export a URL of a server you started"
        )
    return url


@contextmanager
def fresh_postgres_database(prefix: str = "tn") -> Iterator[str]:
    """A new, empty database on the test PostgreSQL server (its URL), dropped afterwards."""
    server = make_url(postgres_server_url())
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A migrated database on each backend."""
    database = Database(database_url)
    migrate.upgrade(database)
    yield database
    database.dispose()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches PostgreSQL carries the ``postgres`` marker, however it got
    there (``database_url`` parametrised by hand, or the ``postgres_url`` fixture)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("database_url") == "postgres"
        if on_postgres or "postgres_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)  # a second one, if marked already, is harmless
