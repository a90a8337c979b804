"""Database engine and sessions: SQLite (WAL) by default, PostgreSQL by URL.

The engine is built by :class:`Database` from settings, never at import time, so tests and
several nodes in one process each get their own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from triagenode.errors import StorageError
from triagenode.optional import require
from triagenode.store.fast_sql import on_driver

__all__ = ["Database"]

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (API, tracker) run beside the receiver's writes; synchronous=FULL
    # makes a commit durable before the C-STORE success is sent.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Database:
    """An engine plus a session factory for one database URL."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
            if make_url(url).get_driver_name() == "psycopg":
                require("psycopg", "postgres", "A postgresql+psycopg:// database URL")
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # pysqlite's own transaction handling defers BEGIN; issue it ourselves so a
            # write transaction (BEGIN IMMEDIATE) can be asked for explicitly.
            event.listen(self.engine, "connect", _disable_pysqlite_begin)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        session = self._sessions()
        try:
            with session.begin():
                yield session
        finally:
            session.close()

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """Like :meth:`session`, but takes SQLite's write lock at the start.

        Read-then-write transactions (claiming a job, appending to the audit chain) need
        the lock before they read, or two writers can read the same state.
        """
        session = self._sessions()
        try:
            with session.begin():
                if self.is_sqlite:
                    session.connection(execution_options={"begin_immediate": True})
                yield session
        finally:
            session.close()

    def ping(self) -> None:
        """Raise :class:`StorageError` unless the database answers."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error means "not reachable"
            raise StorageError(f"database {self.safe_url} is not reachable: {exc}") from exc

    def dispose(self) -> None:
        self.engine.dispose()


def _disable_pysqlite_begin(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Any) -> None:
    immediate = connection.get_execution_options().get("begin_immediate", False)
    # On the driver's cursor: through exec_driver_sql the BEGIN cost as much Python as the
    # receiver's whole insert (its writer begins a transaction per group commit).
    on_driver(connection, "BEGIN IMMEDIATE" if immediate else "BEGIN").close()
