"""Taking back instance rows whose file never became durable.

To save a database round trip per instance, the receiver commits a new instance's rows in
parallel with its file's fsync, rename and folder fsync (see
:mod:`triagenode.store.group_commit`), and answers success only after both are done. Two
things can then leave a row without its file, always for an instance that was never
acknowledged:

- the file failed (disk full, I/O error) after the rows were committed: the receiver calls
  :func:`remove_instance_row` at once;
- the node crashed between the commit and the file's rename becoming durable: at the next
  start :func:`remove_rows_without_files` checks the rows received since the unclean run
  began (the :class:`RunMarker` in the data folder says when) and removes those whose file
  is missing.

Only rows of new instances are committed early, never a replacement of an older copy, so
removing the row loses nothing that was acknowledged and leaves the study's counts right.

The opposite can happen too: the first instance of a new study commits its rows only after
its file is in place, so a crash in between leaves a file without a row. It was never
acknowledged either; :func:`remove_files_without_rows` removes such files at the next start
and names each one in the log (the sender sends the instance again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import cast

from sqlalchemy import Connection, Table, delete, select, update

from triagenode.store.claims import LiveClaim, is_held, process_tag
from triagenode.store.db import Database
from triagenode.store.models import Instance, Series, Study, utcnow
from triagenode.store.spool import INCOMING, Spool

__all__ = [
    "RunMarker",
    "recover_unclean_runs",
    "remove_files_without_rows",
    "remove_instance_row",
    "remove_rows_without_files",
]

log = logging.getLogger(__name__)

_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
# Before per-process markers: present in the data folder while the one receiver ran.
RUNNING_MARKER = ".receiver-running"
# One marker per running receiver, each claimed (locked) by its process: several receivers
# may share the data folder, and one's clean stop must not hide another's crash.
MARKERS = ".receivers"
# Clock steps between runs must not hide rows from the recovery check.
_CLOCK_MARGIN = timedelta(minutes=10)
# With other receivers running, what they have in flight (rows committed, file not yet
# renamed, or the reverse) settles within this; the dead run's leftovers are checked after.
IN_FLIGHT_GRACE_S = 30.0


class RunMarker:
    """Marker files that tell a start whether receivers' last runs ended cleanly.

    Each receiver process keeps ``<folder>/.receivers/<process>.running`` (holding when its
    run began) while it runs, locked by its process (:mod:`triagenode.store.claims`). A
    marker nobody holds was left by a run that did not stop cleanly.

    Parameters
    ----------
    folder
        Where the markers live (the node's data folder).
    """

    def __init__(self, folder: Path) -> None:
        self._root = Path(folder)
        self._dir = self._root / MARKERS
        self._own: LiveClaim | None = None
        self._dead: list[Path] = []

    def _others(self) -> list[Path]:
        if not self._dir.is_dir():
            return []
        own = self._own.path if self._own is not None else None
        return [path for path in self._dir.glob("*.running") if path != own]

    def unclean_since(self) -> tuple[bool, datetime | None]:
        """Whether a previous run ended without :meth:`mark_stopped`, and since when.

        Returns ``(False, None)`` when every earlier run stopped cleanly (or still runs);
        ``(True, time)`` with the earliest unclean run's start (less a margin for clock
        steps); ``(True, None)`` when a marker is unreadable, so every row must be checked.
        """
        dead = [path for path in self._others() if not is_held(path)]
        legacy = self._root / RUNNING_MARKER
        if legacy.exists():
            dead.append(legacy)
        self._dead = dead
        if not dead:
            return False, None
        starts = [_started(path) for path in dead]
        if any(start is None for start in starts):
            return True, None
        return True, min(start for start in starts if start is not None) - _CLOCK_MARGIN

    def others_running(self) -> bool:
        """Whether other receivers share this data folder and run now."""
        return any(is_held(path) for path in self._others())

    def mark_running(self) -> None:
        """Durably record that this process's run begins now."""
        if self._own is not None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).isoformat().encode("ascii")
        self._own = LiveClaim.take(self._dir / f"{process_tag()}.running", stamp)
        Spool.fsync_dir(self._dir)

    def recovered(self) -> None:
        """The unclean runs :meth:`unclean_since` found have been checked: forget them."""
        for path in self._dead:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._dead = []
        with contextlib.suppress(FileNotFoundError):
            Spool.fsync_dir(self._dir)

    def mark_stopped(self) -> None:
        """The run ended cleanly: nothing is in flight, no check is needed next start."""
        own, self._own = self._own, None
        if own is not None:
            own.release()
            with contextlib.suppress(FileNotFoundError):
                Spool.fsync_dir(self._dir)


def _started(path: Path) -> datetime | None:
    try:
        started = datetime.fromisoformat(path.read_text(encoding="ascii").strip())
    except (OSError, UnicodeError, ValueError):
        return None
    return started if started.tzinfo is not None else None


def recover_unclean_runs(
    db: Database, data_dir: Path, marker: RunMarker, grace_s: float = IN_FLIGHT_GRACE_S
) -> threading.Thread | None:
    """Take back what receivers that did not stop cleanly left half-done, then mark this
    run as running.

    Alone on the data folder, the check runs now. Beside live receivers it must not take
    their instances in flight for leftovers: it then runs in a thread once ``grace_s`` has
    passed, and only over what arrived before this start (returned, for tests).
    """
    unclean, since = marker.unclean_since()
    if not unclean:
        marker.mark_running()
        return None
    if not marker.others_running():
        remove_rows_without_files(db, data_dir, since)
        remove_files_without_rows(db, data_dir, since)
        marker.recovered()
        marker.mark_running()
        return None
    until = utcnow()
    marker.mark_running()

    def later() -> None:
        time.sleep(grace_s)  # a fixed settling time, nothing to poll for
        try:
            remove_rows_without_files(db, data_dir, since, until)
            remove_files_without_rows(db, data_dir, since, until)
            marker.recovered()
        except Exception:  # the next start checks again: the dead markers are kept
            log.exception("recovery after an unclean stop failed")

    thread = threading.Thread(target=later, name="spool-recovery", daemon=True)
    thread.start()
    return thread


def _remove(conn: Connection, instance_id: int, size: int, study_id: int) -> None:
    conn.execute(delete(_INSTANCES).where(_INSTANCES.c.id == instance_id))
    conn.execute(
        update(_STUDIES)
        .where(_STUDIES.c.id == study_id)
        .values(
            instance_count=_STUDIES.c.instance_count - 1,
            byte_count=_STUDIES.c.byte_count - size,
        )
    )


def _begin(db: Database, conn: Connection) -> None:
    if db.is_sqlite:
        conn.execution_options(begin_immediate=True)


def remove_instance_row(db: Database, sop_instance_uid: str, sha256: str) -> bool:
    """Delete the row of a new instance whose file failed after the row was committed.

    Only a row that still describes that copy (same hash, never replaced) is removed.
    Returns True when a row was removed.
    """
    with db.engine.connect() as conn:
        _begin(db, conn)
        with conn.begin():
            row = conn.execute(
                select(_INSTANCES.c.id, _INSTANCES.c.size, _SERIES.c.study_id)
                .join(_SERIES, _SERIES.c.id == _INSTANCES.c.series_id)
                .where(
                    _INSTANCES.c.sop_instance_uid == sop_instance_uid,
                    _INSTANCES.c.sha256 == sha256,
                    _INSTANCES.c.replaced_count == 0,
                )
            ).first()
            if row is None:
                return False
            _remove(conn, row.id, row.size, row.study_id)
    return True


def remove_rows_without_files(
    db: Database, data_dir: Path, since: datetime | None, until: datetime | None = None
) -> int:
    """Delete instance rows received at or after ``since`` (and before ``until``) whose file
    does not exist.

    Parameters
    ----------
    db
        The node's database.
    data_dir
        The node's data folder (instance paths are relative to it).
    since
        When the run that did not stop cleanly began; None checks every row.

    Returns
    -------
    int
        How many rows were removed.
    """
    query = select(
        _INSTANCES.c.id, _INSTANCES.c.size, _INSTANCES.c.file_path, _SERIES.c.study_id
    ).join(_SERIES, _SERIES.c.id == _INSTANCES.c.series_id)
    if since is not None:
        query = query.where(_INSTANCES.c.received_at >= since)
    if until is not None:
        query = query.where(_INSTANCES.c.received_at < until)
    removed = 0
    with db.engine.connect() as conn:
        _begin(db, conn)
        with conn.begin():
            for row in conn.execute(query).all():
                if not (data_dir / row.file_path).is_file():
                    _remove(conn, row.id, row.size, row.study_id)
                    removed += 1
    if removed:
        log.warning(
            "recovery: removed %d instance rows whose file was never stored (never acknowledged)",
            removed,
        )
    return removed


def _recent_files(spool_root: Path, since: float | None, until: float | None = None) -> list[str]:
    """Instance files (``spool/<study>/<series>/<sop>.dcm``) changed at or after ``since``
    (and before ``until``)."""
    found = []
    for study in os.scandir(spool_root):
        if study.name == INCOMING or not study.is_dir(follow_symlinks=False):
            continue
        for series in os.scandir(study.path):
            # A rename into a folder updates the folder's time: older folders are skipped.
            if not series.is_dir(follow_symlinks=False):
                continue
            if since is not None and series.stat().st_mtime < since:
                continue
            for entry in os.scandir(series.path):
                if (
                    entry.name.endswith(".dcm")
                    and entry.is_file(follow_symlinks=False)
                    and (since is None or entry.stat().st_mtime >= since)
                    and (until is None or entry.stat().st_mtime < until)
                ):
                    found.append(f"spool/{study.name}/{series.name}/{entry.name}")
    return found


def remove_files_without_rows(
    db: Database, data_dir: Path, since: datetime | None, until: datetime | None = None
) -> int:
    """Delete spool files placed at or after ``since`` (and before ``until``) that no
    instance row describes.

    Such a file's rows never committed, so it was never acknowledged; each removal is
    logged with the file's path (UIDs only, no PHI).

    Returns
    -------
    int
        How many files were removed.
    """
    spool_root = Path(data_dir) / "spool"
    if not spool_root.is_dir():
        return 0
    candidates = _recent_files(
        spool_root,
        since.timestamp() if since is not None else None,
        until.timestamp() if until is not None else None,
    )
    known: set[str] = set()
    with db.engine.connect() as conn:
        for start in range(0, len(candidates), 500):
            batch = candidates[start : start + 500]
            query = select(_INSTANCES.c.file_path).where(_INSTANCES.c.file_path.in_(batch))
            known.update(conn.execute(query).scalars())
    removed = 0
    for relative in candidates:
        if relative in known:
            continue
        with contextlib.suppress(FileNotFoundError):
            (Path(data_dir) / relative).unlink()
            removed += 1
            log.warning(
                "recovery: removed %s, whose row never committed (never acknowledged)", relative
            )
    return removed
