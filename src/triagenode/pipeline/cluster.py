"""Work that must run once cluster-wide, held by one process at a time.

Several ``triagenode serve`` processes (on one or many machines) share one PostgreSQL
database. Most of their work is already safe to run everywhere at once: receivers write
rows under unique keys, workers claim jobs with ``FOR UPDATE SKIP LOCKED`` (and expire dead
workers' leases in the same transaction, so lease expiry needs no leader), exporters claim
outbox rows the same way. A few loops are not:

========================  ==============================================  ==================
work                      what it does                                    advisory lock key
========================  ==============================================  ==================
``scheduler``             study stability scan, triage, queueing jobs      0x7472696167650101
``audit-forwarding``      copying the audit trail to the syslog collector  0x7472696167650102
``audit-checkpoints``     signed checkpoints of the audit chain's head     0x7472696167650103
``retention``             the retention purge                              0x7472696167650104
========================  ==============================================  ==================

(The audit chain itself uses ``0x7472696167650001``, as a *transaction* lock, in
:mod:`triagenode.audit.chain`.)

:class:`ClusterSingleton` wraps one such part. On PostgreSQL it opens a dedicated
connection and asks for a *session-level* advisory lock with that key
(``pg_try_advisory_lock``). The process that gets it starts the part; the others stay
standbys and ask again every ``retry_s`` seconds. The holder checks its lock connection every
``check_s`` seconds; if the connection is gone it stops the part at once, because the server
released the lock when the connection dropped and a standby may already have taken over.
When the holding process dies (even by SIGKILL) PostgreSQL notices the closed socket and
releases the lock, so a standby takes over within about ``retry_s`` seconds. A holder cut
off from the network is noticed by the server only when TCP gives up; the server-side
``tcp_keepalives_*`` settings bound that.

Each lock connection names itself in ``application_name`` (``triagenode:<host>:<pid>:<work>``)
so :func:`cluster_holders` can tell from ``pg_locks`` who holds what.

On SQLite there is one process by construction (settings refuse ``node.roles`` other than
``["all"]`` there), and the wrapper simply runs the part.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol

from prometheus_client import Gauge
from sqlalchemy import Connection, text

from triagenode.metrics import REGISTRY
from triagenode.store.db import Database

__all__ = [
    "LOCK_KEYS",
    "ClusterSingleton",
    "ClusterWork",
    "Part",
    "cluster_holders",
]

log = logging.getLogger(__name__)


class ClusterWork(str, Enum):
    """The kinds of work that run in one process of the cluster at a time."""

    scheduler = "scheduler"
    audit_forwarding = "audit-forwarding"
    audit_checkpoints = "audit-checkpoints"
    retention = "retention"


# "triage" in ASCII, then one number per kind of work (see the table in the docstring).
LOCK_KEYS: dict[ClusterWork, int] = {
    ClusterWork.scheduler: 0x7472_6961_6765_0101,
    ClusterWork.audit_forwarding: 0x7472_6961_6765_0102,
    ClusterWork.audit_checkpoints: 0x7472_6961_6765_0103,
    ClusterWork.retention: 0x7472_6961_6765_0104,
}

HELD = Gauge(
    "triagenode_cluster_work_held",
    "1 while this process holds the cluster-wide lock of a kind of work (always 1 on SQLite)",
    ["work"],
    registry=REGISTRY,
)


class Part(Protocol):
    """A running part of the node: started once, stopped once."""

    def start(self) -> Any: ...

    def stop(self) -> Any: ...


def process_name(work: ClusterWork | str) -> str:
    """How this process names itself on a lock connection (no PHI: host, pid, work)."""
    name = f"triagenode:{socket.gethostname()}:{os.getpid()}:{ClusterWork(work).value}"
    return name[:63]  # PostgreSQL truncates application_name at 63 bytes


class ClusterSingleton:
    """Runs a part in only one process of the cluster, and takes it over when that dies.

    Parameters
    ----------
    db
        The shared database.
    work
        Which kind of work the part does: chooses the advisory lock.
    build
        Makes a fresh part each time this process takes the work over (a stopped part is
        never started again).
    retry_s
        How often a standby asks for the lock.
    check_s
        How often the holder checks that its lock connection is alive.
    """

    def __init__(
        self,
        db: Database,
        work: ClusterWork,
        build: Callable[[], Part],
        *,
        retry_s: float = 2.0,
        check_s: float = 2.0,
    ) -> None:
        self.db = db
        self.work = ClusterWork(work)
        self.key = LOCK_KEYS[self.work]
        self._build = build
        self.retry_s = retry_s
        self.check_s = check_s
        self._part: Part | None = None
        self._part_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Connection | None = None
        self.takeovers = 0

    @property
    def holds(self) -> bool:
        """Whether this process runs the work now."""
        return self._part is not None

    def start(self) -> None:
        if self.db.is_sqlite:
            self._run_part()
            return
        self._thread = threading.Thread(
            target=self._loop, name=f"cluster-{self.work.value}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._stop_part()  # SQLite, or the loop did not finish in time
        self._drop_connection()

    # The loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                acquired = self._try_acquire()
            except Exception as exc:  # the database may be away: a standby keeps asking
                log.warning(
                    "cluster work %s: cannot ask for its lock (%s); retrying in %g s",
                    self.work.value,
                    type(exc).__name__,
                    self.retry_s,
                )
                self._drop_connection()
                acquired = False
            if not acquired:
                self._stop.wait(self.retry_s)
                continue
            self._hold()

    def _try_acquire(self) -> bool:
        if self._connection is None:
            connection = self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._connection = connection
            connection.execute(
                text("SELECT set_config('application_name', :name, false)"),
                {"name": process_name(self.work)},
            )
        return bool(
            self._connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
            ).scalar()
        )

    def _hold(self) -> None:
        self.takeovers += 1
        log.info(
            "cluster work %s: this process (%s) holds it now",
            self.work.value,
            process_name(self.work),
        )
        try:
            self._run_part()
        except Exception:
            log.exception("cluster work %s: its part did not start", self.work.value)
            self._release()
            self._stop.wait(self.retry_s)
            return
        while not self._stop.wait(self.check_s):
            if not self._alive():
                log.error(
                    "cluster work %s: lost the connection that holds its lock; stopping it "
                    "here (another process may take it over)",
                    self.work.value,
                )
                self._stop_part()
                self._drop_connection()
                self._stop.wait(self.retry_s)  # give the standbys their turn first
                return
        self._stop_part()
        self._release()

    def _alive(self) -> bool:
        connection = self._connection
        if connection is None:
            return False
        try:
            # Still ours? A server restart drops the lock even if a new socket came up.
            held = connection.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND pid = pg_backend_pid() AND classid = :high AND objid = :low"
                    " AND objsubid = 1"
                ),
                {"high": self.key >> 32, "low": self.key & 0xFFFF_FFFF},
            ).scalar()
        except Exception:
            return False
        return bool(held)

    # The part and the connection ---------------------------------------------------------

    def _run_part(self) -> None:
        with self._part_lock:
            if self._part is not None:
                return
            part = self._build()
            part.start()
            self._part = part
        HELD.labels(self.work.value).set(1)

    def _stop_part(self) -> None:
        with self._part_lock:
            part, self._part = self._part, None
        HELD.labels(self.work.value).set(0)
        if part is None:
            return
        try:
            part.stop()
        except Exception:
            log.exception("cluster work %s: error while stopping it", self.work.value)

    def _release(self) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        except Exception:  # closing the connection releases it too
            self._drop_connection()

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.invalidate()  # never back into the pool: it may hold the lock
            connection.close()
        except Exception:
            log.debug("cluster work %s: closing its lock connection failed", self.work.value)


def cluster_holders(db: Database) -> dict[str, str | None]:
    """Which process holds each kind of work now: its ``application_name``
    (``triagenode:<host>:<pid>:<work>``), or None when nobody does.

    On SQLite the one process holds everything: named ``local``.
    """
    if db.is_sqlite:
        return {work.value: "local" for work in ClusterWork}
    found: dict[str, str | None] = {work.value: None for work in ClusterWork}
    by_key = {key: work for work, key in LOCK_KEYS.items()}
    with db.engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT l.classid::bigint AS high, l.objid::bigint AS low, a.application_name"
                " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                " AND l.database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())"
            )
        ).all()
    for row in rows:
        work = by_key.get((int(row.high) << 32) | int(row.low))
        if work is not None:
            found[work.value] = row.application_name or "?"
    return found
