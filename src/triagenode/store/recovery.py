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
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import cast

from sqlalchemy import Connection, Table, delete, select, update

from triagenode.store.db import Database
from triagenode.store.models import Instance, Series, Study
from triagenode.store.spool import INCOMING, Spool

__all__ = [
    "RunMarker",
    "remove_files_without_rows",
    "remove_instance_row",
    "remove_rows_without_files",
]

log = logging.getLogger(__name__)

_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
# Present in the data folder while a receiver runs; holds when that run began.
RUNNING_MARKER = ".receiver-running"
# Clock steps between runs must not hide rows from the recovery check.
_CLOCK_MARGIN = timedelta(minutes=10)


class RunMarker:
    """A marker file that tells a start whether the receiver's last run ended cleanly.

    Parameters
    ----------
    folder
        Where the marker lives (the node's data folder).
    """

    def __init__(self, folder: Path) -> None:
        self._root = Path(folder)

    def unclean_since(self) -> tuple[bool, datetime | None]:
        """Whether the previous run ended without :meth:`mark_stopped`, and since when.

        Returns ``(False, None)`` after a clean stop; ``(True, time)`` with the unclean
        run's start (less a margin for clock steps); ``(True, None)`` when the marker is
        unreadable, so every row must be checked.
        """
        try:
            text = (self._root / RUNNING_MARKER).read_text(encoding="ascii")
        except FileNotFoundError:
            return False, None
        except (OSError, UnicodeError):
            return True, None
        try:
            started = datetime.fromisoformat(text.strip())
        except ValueError:
            return True, None
        if started.tzinfo is None:
            return True, None
        return True, started - _CLOCK_MARGIN

    def mark_running(self) -> None:
        """Durably record that a run begins now (call after any recovery)."""
        self._root.mkdir(parents=True, exist_ok=True)
        marker = self._root / RUNNING_MARKER
        temp = self._root / f"{RUNNING_MARKER}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, datetime.now(timezone.utc).isoformat().encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, marker)
        Spool.fsync_dir(self._root)

    def mark_stopped(self) -> None:
        """The run ended cleanly: nothing is in flight, no check is needed next start."""
        with contextlib.suppress(FileNotFoundError):
            (self._root / RUNNING_MARKER).unlink()
            Spool.fsync_dir(self._root)


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


def remove_rows_without_files(db: Database, data_dir: Path, since: datetime | None) -> int:
    """Delete instance rows received at or after ``since`` whose file does not exist.

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


def _recent_files(spool_root: Path, since: float | None) -> list[str]:
    """Instance files (``spool/<study>/<series>/<sop>.dcm``) changed at or after ``since``."""
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
                ):
                    found.append(f"spool/{study.name}/{series.name}/{entry.name}")
    return found


def remove_files_without_rows(db: Database, data_dir: Path, since: datetime | None) -> int:
    """Delete spool files placed at or after ``since`` that no instance row describes.

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
    candidates = _recent_files(spool_root, since.timestamp() if since is not None else None)
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
