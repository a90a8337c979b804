"""Signed checkpoints of the audit chain's head, kept where the database cannot reach.

The hash chain shows any change *inside* the trail, but deleting its newest rows leaves a
shorter chain that is still intact. A checkpoint ``(seq, row_hash, time)`` written outside
the database after each event (or at most once per ``audit.checkpoint_interval_s``) closes
that gap: :func:`check_checkpoints` requires every checkpointed row to still be in the
chain, unchanged.

Checkpoints go to an append-only file (opened with ``O_APPEND``; ``chattr +a`` makes the
kernel refuse anything else) and, when forwarding is on, into the syslog stream. They are
signed with Ed25519 rather than an HMAC so that an auditor or a collector can check them with
the *public* key without being able to make new ones.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import select

from triagenode.audit.chain import chain_head
from triagenode.config.settings import Settings
from triagenode.errors import ConfigError
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_KEY_FILE",
    "Checkpoint",
    "CheckpointCheck",
    "CheckpointLog",
    "CheckpointSigner",
    "HeadCheckpointer",
    "check_checkpoints",
    "load_public_key",
    "read_checkpoints",
]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "audit-checkpoints.log"
CHECKPOINT_KEY_FILE = "audit-checkpoint.key"
_CONTEXT = "triagenode/audit-checkpoint/v1"


@dataclass(frozen=True)
class Checkpoint:
    """The chain's head at one moment, signed."""

    seq: int
    row_hash: str
    at: str  # ISO 8601 UTC, as signed
    signature: str  # base64 Ed25519 signature of :meth:`payload`

    def payload(self) -> bytes:
        return f"{_CONTEXT}\n{self.seq}\n{self.row_hash}\n{self.at}".encode("ascii")

    def to_json(self) -> str:
        return json.dumps(
            {"seq": self.seq, "hash": self.row_hash, "at": self.at, "sig": self.signature},
            separators=(",", ":"),
        )

    @classmethod
    def from_mapping(cls, data: dict[str, object]) -> Checkpoint:
        seq, digest = data["seq"], data["hash"]
        at, sig = data["at"], data["sig"]
        if not isinstance(seq, (int, str)) or not str(seq).isdigit():
            raise ValueError("seq is not a number")
        if not (isinstance(digest, str) and isinstance(at, str) and isinstance(sig, str)):
            raise ValueError("hash, at and sig must be strings")
        return cls(int(seq), digest, at, sig)

    def is_signed_by(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(base64.b64decode(self.signature, validate=True), self.payload())
        except (InvalidSignature, ValueError, UnicodeEncodeError):
            return False
        return True


class CheckpointSigner:
    """The Ed25519 key that signs checkpoints."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @classmethod
    def load_or_create(cls, path: Path) -> CheckpointSigner:
        """The key in ``path`` (PEM); created with mode 0600 on first use, and its public
        half written to ``path`` with suffix ``.pub``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls(_read_private(path))
        key = Ed25519PrivateKey.generate()
        try:
            os.write(
                fd,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            os.fsync(fd)
        finally:
            os.close(fd)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path.with_suffix(".pub").write_bytes(public)
        log.info("created a new audit checkpoint key in %s", path)
        return cls(key)

    def sign(self, seq: int, row_hash: str, at: datetime | None = None) -> Checkpoint:
        moment = (at or datetime.now(timezone.utc)).astimezone(timezone.utc)
        unsigned = Checkpoint(seq, row_hash, moment.isoformat(timespec="microseconds"), "")
        signature = base64.b64encode(self._key.sign(unsigned.payload())).decode("ascii")
        return Checkpoint(unsigned.seq, unsigned.row_hash, unsigned.at, signature)


def _read_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"audit checkpoint key {path}: cannot be read ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"audit checkpoint key {path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (or the public half of a private key file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"audit checkpoint public key {path}: cannot be read ({exc.strerror})"
        ) from None
    try:
        if b"PRIVATE KEY" in data:
            return _read_private(Path(path)).public_key()
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"audit checkpoint public key {path}: cannot be read ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"audit checkpoint public key {path}: not an Ed25519 key")
    return key


def checkpoint_paths(settings: Settings) -> tuple[Path, Path, Path]:
    """``(checkpoint file, private key, public key)`` as configured or by default."""
    data_dir = Path(settings.node.data_dir)
    audit = settings.audit
    key = audit.checkpoint_key or data_dir / CHECKPOINT_KEY_FILE
    return (
        audit.checkpoint_file or data_dir / CHECKPOINT_FILE,
        key,
        audit.checkpoint_public_key or key.with_suffix(".pub"),
    )


class CheckpointLog:
    """Appends checkpoints, one JSON line each, to a file opened with ``O_APPEND``.

    The file is never truncated or rewritten by the node, so ``chattr +a`` can be set on it.
    A line is written with one ``write()`` call, so processes sharing the file never
    interleave their lines.
    """

    def __init__(self, path: Path, signer: CheckpointSigner, interval_s: float = 0.0) -> None:
        self.path = Path(path)
        self.signer = signer
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last_written = float("-inf")
        self._last_seq = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> CheckpointLog:
        path, key, _public = checkpoint_paths(settings)
        return cls(path, CheckpointSigner.load_or_create(key), settings.audit.checkpoint_interval_s)

    def write(self, seq: int, row_hash: str) -> Checkpoint:
        checkpoint = self.signer.sign(seq, row_hash)
        line = (checkpoint.to_json() + "\n").encode("ascii")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return checkpoint

    def maybe_write(self, seq: int, row_hash: str) -> Checkpoint | None:
        """Write a checkpoint of a committed row unless one was written less than
        ``interval_s`` ago by this process. Never raises: a failure is logged."""
        now = time.monotonic()
        with self._lock:
            if seq <= self._last_seq or now - self._last_written < self.interval_s:
                return None
            self._last_written, self._last_seq = now, seq
        try:
            return self.write(seq, row_hash)
        except OSError as exc:
            log.error("audit checkpoint not written to %s: %s", self.path, exc.strerror or exc)
            return None


class HeadCheckpointer:
    """Checkpoints the chain's head every ``interval_s`` when it moved, in a thread.

    With several processes (``node.roles``) appending to one chain, checkpoints are the
    cluster's work, not each appender's: one process at a time runs this part (see
    :mod:`triagenode.pipeline.cluster`), and the processes' audit logs write none of their own.
    One writer keeps the checkpoint file well-formed where ``O_APPEND`` from several machines
    is not atomic (NFS), and its checkpoints in ascending order.
    """

    def __init__(self, db: Database, log_: CheckpointLog, interval_s: float = 1.0) -> None:
        self.db = db
        self.log = log_
        self.interval_s = interval_s
        self._last_seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> Checkpoint | None:
        """Checkpoint the head if it is newer than the last one written here."""
        with self.db.session() as session:
            head = chain_head(session)
        if head is None or head[0] <= self._last_seq:
            return None
        checkpoint = self.log.write(head[0], head[1])
        self._last_seq = checkpoint.seq
        return checkpoint

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-checkpoints", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.tick()  # the head as this process leaves it
        except Exception:
            log.exception("audit checkpoint at stop failed")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # database briefly away, or the file: next interval
                log.exception("audit checkpoint failed")


def read_checkpoints(path: Path) -> Iterator[Checkpoint | str]:
    """The checkpoints in a checkpoint file, in file order; a line that is not one is
    yielded as a short description of the problem."""
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield Checkpoint.from_mapping(json.loads(raw))
            except (ValueError, KeyError, TypeError, AttributeError):
                yield f"line {number} of {path} is not a checkpoint"


@dataclass(frozen=True)
class CheckpointCheck:
    """What :func:`check_checkpoints` found: how many checkpoints hold, the newest seq one
    vouches for, and the first problem (None when all hold)."""

    checked: int
    newest_seq: int | None
    problem: tuple[str, int | None, str] | None  # (kind, seq, message)


def check_checkpoints(
    db: Database,
    checkpoints: Iterable[Checkpoint | str],
    public_key: Ed25519PublicKey,
    head_seq: int | None,
    batch: int = 1000,
) -> CheckpointCheck:
    """Every checkpoint must be signed by ``public_key`` and name a row that is still in the
    chain with the same hash; the chain must reach at least the newest checkpoint.

    Reads the checkpoints as a stream and looks rows up in batches, so memory stays bounded
    however long the file is.
    """
    checked = 0
    newest: int | None = None
    pending: list[Checkpoint] = []

    def flush() -> tuple[str, int | None, str] | None:
        nonlocal checked
        if not pending:
            return None
        with db.session() as session:
            stored = dict(
                session.execute(
                    select(AuditEvent.seq, AuditEvent.row_hash).where(
                        AuditEvent.seq.in_({c.seq for c in pending})
                    )
                ).all()
            )
        for checkpoint in pending:
            if checkpoint.seq > (head_seq or 0):
                return (
                    "deleted",
                    (head_seq or 0) + 1,
                    f"the chain ends at row {head_seq or 0} but a checkpoint of "
                    f"{checkpoint.at} saw row {checkpoint.seq}: the newest rows were deleted",
                )
            if stored.get(checkpoint.seq) != checkpoint.row_hash:
                return (
                    "edited",
                    checkpoint.seq,
                    f"row {checkpoint.seq} differs from the one checkpointed at {checkpoint.at}"
                    " (the chain was rewritten)",
                )
            checked += 1
        pending.clear()
        return None

    for item in checkpoints:
        if isinstance(item, str):
            return CheckpointCheck(checked, newest, ("forged", None, item))
        if not item.is_signed_by(public_key):
            return CheckpointCheck(
                checked,
                newest,
                (
                    "forged",
                    item.seq,
                    f"checkpoint of row {item.seq} at {item.at} has a bad signature",
                ),
            )
        newest = item.seq if newest is None else max(newest, item.seq)
        pending.append(item)
        if len(pending) >= batch and (problem := flush()):
            return CheckpointCheck(checked, newest, problem)
    problem = flush()
    return CheckpointCheck(checked, newest, problem)
