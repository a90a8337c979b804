"""Group commit: one writer thread turns many callers' small transactions into one commit.

Each caller submits an item and gets a :class:`PendingWrite`. The writer stages every item
that is waiting in one transaction, each in its own savepoint, and commits once, so a burst
of instances from several associations costs one database fsync instead of one each.

An item's savepoint is normally released only after its caller reports that the item's file
is durable. Items submitted with ``may_commit_early`` that the ``early`` predicate accepts
(for the receiver: a new instance of a study that already has one) are committed without
waiting, in parallel with the file's fsync, and :attr:`PendingWrite.committed_early` tells
the caller that a file that then fails must have its rows taken back; a crash in between is
repaired at the next start (:mod:`triagenode.store.recovery`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from triagenode.errors import StorageError
from triagenode.store.db import Database
from triagenode.store.fast_sql import on_driver

__all__ = ["GroupCommitter", "PendingWrite"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
# Items per transaction; a batch holds SQLite's write lock while its files are fsynced.
MAX_BATCH = 32


class _Signal:
    """A one-shot event on a bare lock: :class:`threading.Event` costs a Condition and
    several Python calls per set/wait, and the receiver waits twice per instance."""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        # Set by one thread only (the writer, or the item's own receiver): no race on _set.
        if not self._set:
            self._set = True
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        if self._set:
            return True
        if self._lock.acquire(timeout=timeout):
            self._lock.release()  # other waiters, and later waits, pass too
            return True
        return self._set


class PendingWrite(Generic[T, R]):
    """One submitted item on its way to the database."""

    def __init__(self, item: T, may_commit_early: bool = False) -> None:
        self.item = item
        self.may_commit_early = may_commit_early
        self.outcome: R | None = None
        self._error: StorageError | None = None
        self._file_ok = False
        self.committed_early = False  # committed without waiting for file_durable()
        self._file_known = _Signal()
        self._done = _Signal()

    def file_durable(self, ok: bool) -> None:
        """Tell the writer whether the item's file is safe on disk; must always be called."""
        self._file_ok = ok
        self._file_known.set()

    def wait_file(self, timeout: float = 300.0) -> bool:
        return self._file_known.wait(timeout) and self._file_ok

    def fail(self, error: StorageError) -> None:
        self.outcome = None
        self._error = error
        self._done.set()

    def finish(self) -> None:
        self._done.set()

    def wait(self, timeout: float = 300.0) -> R:
        """Block until committed and return what the stage function returned.

        Raises
        ------
        StorageError
            When the item was not committed.
        """
        if not self._done.wait(timeout):
            raise StorageError(f"database did not answer within {timeout:g} s")
        if self._error is not None or self.outcome is None:
            raise self._error or StorageError("rows were not recorded")
        return self.outcome


class GroupCommitter(Generic[T, R]):
    """Runs ``stage(connection, item)`` for submitted items and commits them in groups.

    Parameters
    ----------
    db
        The database.
    stage
        Writes one item's rows on the given connection (inside a savepoint).
    on_failure
        Called after any rollback, e.g. to drop caches that may describe undone rows.
    name
        The writer thread's name.
    """

    def __init__(
        self,
        db: Database,
        stage: Callable[[Connection, T], R],
        on_failure: Callable[[], None] = lambda: None,
        name: str = "group-commit",
        early: Callable[[R], bool] = lambda outcome: False,
    ) -> None:
        self._db = db
        self._early = early
        self._stage_item = stage
        self._on_failure = on_failure
        self._name = name
        # SimpleQueue: its put/get are C calls, Queue's take a Condition each.
        self._queue: queue.SimpleQueue[PendingWrite[T, R] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._connection: Connection | None = None  # owned by the writer thread
        self._lock = threading.Lock()

    def submit(self, item: T, may_commit_early: bool = False) -> PendingWrite[T, R]:
        """Queue ``item`` and return at once; the writer thread starts on first use.

        With ``may_commit_early``, an item the ``early`` predicate accepts is committed
        without waiting for :meth:`PendingWrite.file_durable`.
        """
        pending: PendingWrite[T, R] = PendingWrite(item, may_commit_early)
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=self._write_loop, name=self._name, daemon=True
                )
                self._writer.start()
        self._queue.put(pending)
        return pending

    def close(self, timeout: float = 10.0) -> None:
        """Stop the writer after the items already queued."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout)

    def _write_loop(self) -> None:
        try:
            self._serve_queue()
        finally:
            self._drop_connection()

    def _serve_queue(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._commit(batch)
            except BaseException:  # never let the writer die with callers waiting
                log.exception("%s failed", self._name)
                self._drop_connection()
                for pending in batch:
                    pending.fail(StorageError("database writer failed"))
            if stop:
                return

    def _commit(self, batch: list[PendingWrite[T, R]]) -> None:
        try:
            if len(batch) == 1:
                try:
                    self._run(batch, alone=True)
                except IntegrityError:
                    # e.g. a cached id pointing at a row that is gone: again, uncached.
                    self._on_failure()
                    self._run(batch, alone=False)
            else:
                self._run(batch, alone=False)
        except SQLAlchemyError as exc:
            self._on_failure()
            self._drop_connection()  # it may be broken (database gone): fresh one next time
            error = StorageError(f"database did not commit: {type(exc).__name__}")
            for pending in batch:
                pending.fail(error)
            return
        for pending in batch:
            pending.finish()

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def _run(self, batch: list[PendingWrite[T, R]], alone: bool) -> None:
        # The writer keeps one connection: a checkout per batch cost as much Python
        # (pool events, reset) as staging an instance's rows.
        if self._connection is None:
            self._connection = self._db.engine.connect()
            if self._db.is_sqlite:
                self._connection.execution_options(begin_immediate=True)
        connection = self._connection
        with connection.begin() as transaction:
            if alone:
                # The only item: the transaction itself serves as its savepoint.
                outcome = self._stage_item(connection, batch[0].item)
                if batch[0].may_commit_early and self._early(outcome):
                    batch[0].outcome = outcome
                    batch[0].committed_early = True
                elif batch[0].wait_file():
                    batch[0].outcome = outcome
                else:
                    transaction.rollback()
                    self._on_failure()
                    batch[0].fail(StorageError("the file was not stored"))
            else:
                for pending in batch:
                    self._stage(connection, pending)

    def _stage(self, connection: Connection, pending: PendingWrite[T, R]) -> None:
        for attempt in (1, 2):
            _savepoint(connection, "SAVEPOINT")
            try:
                outcome = self._stage_item(connection, pending.item)
            except IntegrityError as exc:
                # e.g. a cached id pointing at a row that is gone: retry once without caches.
                _savepoint(connection, "ROLLBACK TO")
                self._on_failure()
                if attempt == 2:
                    pending.fail(StorageError(f"database refused the rows: {exc.orig}"))
                    return
                continue
            if pending.may_commit_early and self._early(outcome):
                _savepoint(connection, "RELEASE")
                pending.outcome = outcome
                pending.committed_early = True
            elif pending.wait_file():
                _savepoint(connection, "RELEASE")
                pending.outcome = outcome
            else:
                _savepoint(connection, "ROLLBACK TO")
                self._on_failure()
                pending.fail(StorageError("the file was not stored"))
            return


def _savepoint(connection: Connection, verb: str) -> None:
    """Set, release or roll back to the item's savepoint, on the driver's cursor.

    SQLAlchemy's ``begin_nested`` costs two statements' worth of Python per item (it is
    the writer's largest cost in a burst); the savepoint needs none of its bookkeeping:
    one at a time, same name, inside the batch's transaction, in SQL both dialects share.
    """
    on_driver(connection, f"{verb} {_SAVEPOINT}").close()
    if verb == "ROLLBACK TO":  # rolled back, then gone, as in SQLAlchemy
        on_driver(connection, f"RELEASE {_SAVEPOINT}").close()


_SAVEPOINT = "tn_group_item"
