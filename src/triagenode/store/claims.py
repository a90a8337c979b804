"""Files that say "this process is alive": locked by their process for as long as it runs.

Several receivers (on one machine or several sharing the data folder over NFS) keep things of
their own in it: temp files of instances being received, the marker of a run in progress.
A restarting receiver must clean up after a *dead* one without touching a *live* one's. The
operating system tells them apart: each process holds an exclusive ``flock`` on a claim file
of its own, which the kernel (or, on NFS, the server's lock manager) releases when the process
ends, however it ends. A claim nobody holds belongs to a process that is gone.

``flock`` locks belong to one open file, not to the process, so two parts of one process (or
two nodes in one test process) see each other's claims as live too. On NFS, Linux maps
``flock`` to byte-range locks, which NFSv4 (or NFSv3 with ``lockd``) honours across machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import uuid
from pathlib import Path

__all__ = ["LiveClaim", "is_held", "process_tag"]

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


def process_tag() -> str:
    """A name for this process unique in the cluster: ``<host>-<pid>-<random>``."""
    host = _UNSAFE.sub("_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class LiveClaim:
    """A file this process holds locked until :meth:`release` (or until it ends).

    Dropping the object without :meth:`release` leaves the file behind unlocked, as a
    crash would.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = Path(path)
        self._fd: int | None = fd

    @classmethod
    def take(cls, path: Path, content: bytes = b"") -> LiveClaim:
        """Create ``path`` (it must not exist), lock it, write ``content`` durably."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if content:
                os.write(fd, content)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return cls(path, fd)

    def release(self, remove: bool = True) -> None:
        """Unlock (and by default remove) the claim file; safe to call more than once."""
        if self._fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.release(remove=False)


def is_held(path: Path) -> bool:
    """Whether a live process holds the claim file ``path`` (False when it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock just taken
    return False
