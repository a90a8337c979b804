"""The spool: received instances as DICOM Part 10 files, written durably and atomically.

An instance is streamed into a temp file under ``spool/.incoming/<process>/`` while it
arrives, then fsynced, renamed to ``spool/<study>/<series>/<sop>.dcm`` and the directory
fsynced. Each process has its own temp folder, claimed with a lock (see
:mod:`triagenode.store.claims`), so a receiver that starts beside live ones on a shared spool
removes only the temp files of receivers that are gone. Only
after :meth:`IncomingInstance.commit` returns is the file safe; until then
:meth:`IncomingInstance.discard` leaves nothing behind. The dataset bytes are written exactly
as received; the node only prepends the 128-byte preamble, ``DICM`` and the file meta group.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

from triagenode.errors import StorageError
from triagenode.store.claims import LiveClaim, is_held, process_tag

__all__ = [
    "IncomingInstance",
    "Spool",
    "SpoolError",
    "SpoolLowOnSpace",
    "StoredFile",
    "is_path_safe_uid",
]

INCOMING = ".incoming"
_CLAIM = ".claim"
# A temp folder without its claim file is left alone this long: its process may be between
# creating the folder and locking the claim.
_UNCLAIMED_GRACE_S = 60.0
log = logging.getLogger(__name__)
_DIGITS = frozenset("0123456789")
_UID_CHARS = frozenset("0123456789.")
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


class SpoolError(StorageError):
    """The spool could not durably store an instance (disk full, unwritable folder...)."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    @property
    def comment(self) -> str:
        """Short and free of paths: for the C-STORE error comment and the refusal's log."""
        return f"spool: {errno.errorcode.get(self.errno or 0, 'error')}"


class SpoolLowOnSpace(SpoolError):
    """The spool's file system is below the free-space reserve (``scp.min_free_bytes``)."""

    @property
    def comment(self) -> str:
        return f"{super().comment}, {self}"


def _writeback_function() -> Callable[[int, int, int], None]:
    """``sync_file_range(SYNC_FILE_RANGE_WRITE)`` where Linux has it, else a no-op.

    Starting writeback of each fragment as it arrives means the final fsync has little
    left to write, so less of it sits between the last byte and the C-STORE response.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    write = 2  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait

    def start(fd: int, offset: int, length: int) -> None:
        function(fd, offset, length, write)  # advisory: errors surface at fsync

    return start


_start_writeback = _writeback_function()
_PAGE = 4096
_WRITEBACK_STEP = 256 * 1024
# Bytes queued for the hashing helper before the writer waits for it to catch up.
_HASH_BACKLOG_LIMIT = 32 * 1024 * 1024


def is_path_safe_uid(uid: str) -> bool:
    """True when ``uid`` is digits and dots only (so it cannot escape the spool folder)."""
    return (
        0 < len(uid) <= 64 and uid[0] in _DIGITS and ".." not in uid and _UID_CHARS.issuperset(uid)
    )


@dataclass(frozen=True)
class StoredFile:
    """Where and what a committed instance file is."""

    relative_path: str  # relative to node.data_dir, with forward slashes
    size: int  # bytes of the whole Part 10 file
    dataset_size: int  # bytes of the received dataset alone
    sha256: str  # of the whole file
    replaced: bool  # a file of the same SOP Instance UID was overwritten


class IncomingInstance:
    """One instance being received: a temp file plus a running SHA-256.

    Not thread-safe; one association's thread owns it.
    """

    def __init__(self, spool: Spool, path: str, fd: int) -> None:
        self._spool = spool
        self._path = path  # plain strings here: pathlib's overhead showed per instance
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        # See hash_with(): fragments may be hashed in a helper thread as they arrive.
        self._hasher: Executor | None = None
        self._hashed: Future[None] | None = None  # the last fragment queued for hashing
        self._hash_backlog = 0
        self.size = 0
        self.dataset_size = 0
        self._final: str | None = None
        self._backup: str | None = None
        self._written_back = 0

    @property
    def temp_path(self) -> Path:
        return Path(self._path)

    def _write(self, data: bytes | memoryview, last: bool = False) -> None:
        assert self._fd is not None, "instance already committed or discarded"
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self.discard()
            raise SpoolError(f"spool write failed: {exc.strerror}", exc.errno) from exc
        # The last fragment is hashed here: the digest is needed at once, and waking the
        # helper for it would take longer than hashing it (docs/performance.md).
        if self._hasher is not None and not last and isinstance(data, bytes):  # immutable
            if self._hash_backlog > _HASH_BACKLOG_LIMIT:
                self._wait_hashed()  # the helper fell behind: bound the memory held
            self._hashed = self._hasher.submit(self._hash.update, data)
            self._hash_backlog += len(data)
        else:
            self._wait_hashed()
            self._hash.update(data)
        self.size += len(data)
        # Whole pages only, in large steps: a page still under writeback would make the
        # next write to it wait. After the last fragment the fsync follows at once.
        if not last and self.size - self._written_back >= _WRITEBACK_STEP:
            end = self.size & ~(_PAGE - 1)
            _start_writeback(self._fd, self._written_back, end - self._written_back)
            self._written_back = end

    def hash_with(self, hasher: Executor) -> None:
        """Hash the bytes written from now on in ``hasher``, which must run one task at a
        time in order (a one-thread pool).

        SHA-256 costs about as much CPU as receiving the bytes; done by a helper thread
        (hashlib releases the GIL) on the other core it is finished by the time the last
        fragment has arrived, instead of delaying each write or the rows.
        """
        self._wait_hashed()
        self._hasher = hasher

    def _wait_hashed(self) -> None:
        if self._hashed is not None:
            self._hashed.result()  # FIFO: every earlier fragment is hashed too
            self._hashed = None
        self._hash_backlog = 0

    def digest(self) -> str:
        """SHA-256 (hex) of everything written so far (waits for the hashing helper)."""
        self._wait_hashed()
        return self._hash.hexdigest()

    def write_meta(self, meta: bytes) -> None:
        """Write the preamble and file meta group; call once, before any dataset bytes."""
        self._write(meta)

    def write(self, data: bytes | memoryview, last: bool = False) -> None:
        """Append received dataset bytes; ``last`` when no more will follow."""
        self._write(data, last)
        self.dataset_size += len(data)

    def sync(self) -> None:
        """Flush the temp file to disk (fsync) and close it; the slow half of a commit.

        Raises
        ------
        SpoolError
            When the data could not be made durable; the temp file is then removed.
        """
        assert self._fd is not None, "instance already committed or discarded"
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        except OSError as exc:
            self.discard()
            raise SpoolError(f"spool fsync failed: {exc.strerror}", exc.errno) from exc

    def commit(self, study_uid: str, series_uid: str, sop_uid: str) -> StoredFile:
        """Make the file durable at its final place and return what was stored.

        Calls :meth:`sync` unless that was done already, then renames the file into
        ``spool/<study>/<series>/<sop>.dcm`` and fsyncs that folder.

        Raises
        ------
        SpoolError
            When the file could not be made durable; the temp file is then removed.
        """
        replaced = self.place(study_uid, series_uid, sop_uid)
        return StoredFile(
            relative_path=self.relative_path(study_uid, series_uid, sop_uid),
            size=self.size,
            dataset_size=self.dataset_size,
            sha256=self.digest(),
            replaced=replaced,
        )

    def place(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """The durable half of :meth:`commit`: fsync, rename, fsync the folder.

        Returns True when an older copy of the instance was replaced.

        Raises
        ------
        SpoolError
            When the file could not be made durable; the temp file is then removed.
        """
        for uid in (study_uid, series_uid, sop_uid):
            if not is_path_safe_uid(uid):
                self.discard()
                raise SpoolError(f"UID {uid!r} is not usable as a file name")
        if self._fd is not None:
            self.sync()
        # Plain strings: this runs once per instance, pathlib's overhead shows.
        folder = f"{self._spool.root_str}/{study_uid}/{series_uid}"
        final = f"{folder}/{sop_uid}.dcm"
        try:
            self._spool.ensure_dir(folder)
            # A duplicate: keep the older copy reachable until the database agrees (revert()).
            backup = self._path[: -len(".part")] + ".old"
            try:
                os.link(final, backup)
                self._backup, replaced = backup, True
            except FileNotFoundError:
                replaced = False
            os.replace(self._path, final)
            self._spool.fsync_dir(folder)
        except OSError as exc:
            self._spool.forget_dirs()
            self.discard()
            if self._backup is not None:
                _unlink(self._backup)
                self._backup = None
            raise SpoolError(f"spool commit failed: {exc.strerror}", exc.errno) from exc
        self._final = final
        return replaced

    @property
    def sha256(self) -> str:
        return self.digest()

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Where :meth:`commit` will place the file, relative to the data folder."""
        return f"spool/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def settle(self) -> None:
        """The database row agrees with the committed file: drop the older copy's link."""
        if self._backup is not None:
            _unlink(self._backup)
            self._backup = None

    def revert(self) -> None:
        """Undo :meth:`commit` when the database did not record it.

        A new instance's file is removed; a replaced one gets its older copy back, so the
        file and its row still agree.
        """
        if self._final is None:
            return
        try:
            if self._backup is not None:
                os.replace(self._backup, self._final)
                self._backup = None
            else:
                _unlink(self._final)
            self._spool.fsync_dir(os.path.dirname(self._final))
        except OSError as exc:
            log.error("spool: could not undo %s: %s", os.path.basename(self._final), exc.strerror)
        self._final = None

    def discard(self) -> None:
        """Close and remove the temp file; safe to call more than once."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            os.unlink(self._path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_folder(folder: Path) -> int:
    """Remove a temp folder and its files; return how many temp files it held."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for leftover in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed += leftover.name != _CLAIM
    with contextlib.suppress(OSError):
        folder.rmdir()
    return removed


class Spool:
    """The spool folder ``<data_dir>/spool``.

    Parameters
    ----------
    data_dir
        The node's data folder; file paths in the database are relative to it.
    """

    def __init__(self, data_dir: Path, min_free_bytes: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.min_free_bytes = min_free_bytes
        self.root = self.data_dir / "spool"
        self.incoming = self.root / INCOMING
        self.root_str = str(self.root)
        # This process's own temp folder, claimed on first use.
        self.temp = self.incoming / process_tag()
        self.incoming_str = str(self.temp)
        self._claim: LiveClaim | None = None
        self._durable_dirs: set[str] = set()
        self._lock = threading.Lock()

    def prepare(self) -> int:
        """Create the folders, claim this process's temp folder and remove the temp files
        that processes no longer running left behind; return how many.

        Temp files were never acknowledged, so removing them loses nothing. The temp files
        of receivers still running (other processes sharing the spool) are left alone.
        """
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._claim_temp()
        removed = 0
        for entry in self.incoming.iterdir():
            if entry == self.temp:
                continue
            if not entry.is_dir():  # the layout before per-process folders
                entry.unlink(missing_ok=True)
                removed += 1
            elif self._abandoned(entry):
                removed += _remove_folder(entry)
        return removed

    def _claim_temp(self) -> None:
        with self._lock:
            if self._claim is not None:
                return
            self.temp.mkdir(parents=True, exist_ok=True)
            self._claim = LiveClaim.take(self.temp / _CLAIM)

    @staticmethod
    def _abandoned(folder: Path) -> bool:
        claim = folder / _CLAIM
        if claim.exists():
            return not is_held(claim)
        try:
            age = time.time() - folder.stat().st_mtime
        except FileNotFoundError:
            return False
        return age > _UNCLAIMED_GRACE_S

    def release(self) -> None:
        """Give up this process's temp folder (call once nothing is being received)."""
        with self._lock:
            claim, self._claim = self._claim, None
        if claim is None:
            return
        claim.release()
        _remove_folder(self.temp)

    def remove_superseded(self, relative_path: str) -> bool:
        """Delete an older copy's file that a committed replacement moved away from.

        ``relative_path`` is the old row's ``file_path`` (relative to the data folder); a
        path outside the spool is refused (False), never followed.
        """
        path = (self.data_dir / relative_path).resolve()
        if not path.is_relative_to(self.root):
            return False
        _unlink(str(path))
        return True

    def check_room(self) -> None:
        """Refuse new data while the spool's file system is below its free-space reserve.

        Filling the disk to the last byte would also stop the database and the audit trail
        (usually on the same disk) and whatever else the server runs; the reserve keeps
        room for them, and senders, answered "out of resources", retry later.

        Raises
        ------
        SpoolLowOnSpace
            Below ``min_free_bytes``.
        SpoolError
            When the file system cannot be asked.
        """
        if not self.min_free_bytes:
            return
        try:
            stats = os.statvfs(self.root_str)  # the spool may be a file system of its own
        except OSError:
            try:
                stats = os.statvfs(self.data_dir)  # spool removed: it is recreated on use
            except OSError as exc:
                raise SpoolError(f"spool not readable: {exc.strerror}", exc.errno) from exc
        if stats.f_bavail * stats.f_frsize < self.min_free_bytes:
            raise SpoolLowOnSpace("free space below scp.min_free_bytes", errno.ENOSPC)

    def open_instance(self) -> IncomingInstance:
        """A new temp file for an arriving instance.

        Raises
        ------
        SpoolError
            When the spool cannot be written.
        """
        path = f"{self.incoming_str}/{uuid.uuid4().hex}.part"
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o640)
        except FileNotFoundError:
            # Not claimed yet, or the folder was removed underneath us: (re)claim it once.
            try:
                with self._lock:
                    if self._claim is not None:
                        self._claim.release(remove=False)
                        self._claim = None
                self._claim_temp()
                fd = os.open(path, _OPEN_FLAGS, 0o640)
            except OSError as exc:
                raise SpoolError(f"spool not writable: {exc.strerror}", exc.errno) from exc
        except OSError as exc:
            raise SpoolError(f"spool not writable: {exc.strerror}", exc.errno) from exc
        return IncomingInstance(self, path, fd)

    def ensure_dir(self, folder: str | Path) -> None:
        """Create ``folder`` (and parents) so that their entries survive a crash."""
        key = str(folder)
        if key in self._durable_dirs:
            return
        missing = []
        current = Path(folder)
        while not current.is_dir():
            missing.append(current)
            if current == self.root:
                break
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path)) from None
            # A new directory's entry lives in its parent: fsync the parent.
            self.fsync_dir(path.parent)
        with self._lock:
            self._durable_dirs.add(key)

    @staticmethod
    def fsync_dir(folder: str | Path) -> None:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def forget_dirs(self) -> None:
        """Forget which folders are known to exist (after someone changed the spool)."""
        with self._lock:
            self._durable_dirs.clear()
