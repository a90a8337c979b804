"""Audit events: the one function through which every part of the node records activity.

Event identifiers follow DICOM PS3.15 Annex A.5 (IHE ATNA) so the trail can be exported as
DICOM audit messages. Patients are identified only by :func:`patient_ref`, a keyed hash.
Every row is appended to the keyed hash chain of :mod:`triagenode.audit.chain`.
"""

from __future__ import annotations

import dataclasses
import enum
import getpass
import hashlib
import hmac
import logging
import os
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from triagenode.audit.chain import (
    ChainProblem,
    VerifyReport,
    append,
    chain_head,
    chain_key,
    verify,
)
from triagenode.audit.checkpoint import Checkpoint, CheckpointLog, check_checkpoints
from triagenode.audit.encoding import storable, storable_details
from triagenode.errors import StorageError
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from triagenode.config.settings import Settings

__all__ = ["AuditEventId", "AuditLog", "LocalActor", "Outcome", "local_actor"]

log = logging.getLogger(__name__)


class AuditEventId(str, enum.Enum):
    """DCM event codes of PS3.15 A.5.3 used by the node."""

    application_activity = "110100"  # node start / stop
    audit_log_used = "110101"  # the trail itself is read, verified or exported
    begin_transferring = "110102"  # an association starts sending instances
    instances_accessed = "110103"  # a study is changed by an operator (reprocess, complete)
    instances_transferred = "110104"  # instances received or sent
    export = "110106"  # results leave the node
    query = "110112"  # API reads of patient data
    security_alert = "110113"  # rejected AE, bad token, integrity failure
    user_authentication = "110114"  # API token login / logout

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    AuditEventId.application_activity: "Application Activity",
    AuditEventId.audit_log_used: "Audit Log Used",
    AuditEventId.begin_transferring: "Begin Transferring DICOM Instances",
    AuditEventId.instances_accessed: "DICOM Instances Accessed",
    AuditEventId.instances_transferred: "DICOM Instances Transferred",
    AuditEventId.export: "Export",
    AuditEventId.query: "Query",
    AuditEventId.security_alert: "Security Alert",
    AuditEventId.user_authentication: "User Authentication",
}


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator of PS3.15 A.5.1."""

    success = 0
    minor_failure = 4
    serious_failure = 8
    major_failure = 12


@dataclasses.dataclass(frozen=True)
class LocalActor:
    """Who ran a command on the node's machine: the OS account (by its real uid, not the
    environment), ``sudo``'s invoking user when there is one, and the host."""

    user: str
    uid: int
    host: str
    sudo_user: str | None = None

    @property
    def actor(self) -> str:
        return f"cli:{self.user}"

    def details(self) -> dict[str, Any]:
        found: dict[str, Any] = {"os_user": self.user, "uid": self.uid, "host": self.host}
        if self.sudo_user:
            found["sudo_user"] = self.sudo_user  # from the environment: a claim, not proof
        return found

    def fields(self, details: dict[str, Any] | None = None) -> dict[str, Any]:
        """``actor``, ``actor_address`` and ``details`` for :meth:`AuditLog.record`."""
        return {
            "actor": self.actor,
            "actor_address": self.host,
            "details": {**(details or {}), **self.details()},
        }


def local_actor() -> LocalActor:
    """The :class:`LocalActor` of this process."""
    uid = os.getuid()
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        user = getpass.getuser() if os.environ.get("USER") else str(uid)
    return LocalActor(user, uid, socket.gethostname(), os.environ.get("SUDO_USER") or None)


class AuditLog:
    """Appends audit events to the database.

    Parameters
    ----------
    db
        The node's database.
    secret
        Key for patient pseudonyms and the hash chain; never logged.
    checkpoints
        Where signed checkpoints of the chain head go after each committed event; None for
        none (tests, tools that only read).
    """

    def __init__(
        self, db: Database, secret: bytes, checkpoints: CheckpointLog | None = None
    ) -> None:
        self._db = db
        self._secret = secret
        self._chain_key = chain_key(secret)
        self.checkpoints = checkpoints

    @classmethod
    def from_settings(cls, settings: Settings, db: Database) -> AuditLog:
        """The node's audit log: its secret, and checkpoints as configured."""
        from triagenode.audit.keys import load_or_create_secret

        return cls(db, load_or_create_secret(settings), CheckpointLog.from_settings(settings))

    @property
    def db(self) -> Database:
        return self._db

    def verify(
        self,
        anchor: tuple[int, str] | None = None,
        checkpoints: Iterable[Checkpoint | str] | None = None,
        public_key: Ed25519PublicKey | None = None,
    ) -> VerifyReport:
        """Walk the chain with this log's secret (see :func:`triagenode.audit.chain.verify`),
        then check ``checkpoints`` against it with ``public_key`` when given."""
        report = verify(self._db, self._secret, anchor)
        if checkpoints is None or public_key is None or not report.ok:
            return report
        found = check_checkpoints(self._db, checkpoints, public_key, report.head_seq)
        problem = None
        if found.problem is not None:
            kind, seq, message = found.problem
            problem = ChainProblem(kind, seq, None, message)  # type: ignore[arg-type]
        return dataclasses.replace(
            report, ok=problem is None, problem=problem, checkpoints=found.checked
        )

    def checkpoint(self) -> Checkpoint | None:
        """Write a checkpoint of the current head now (None without checkpoints or rows)."""
        if self.checkpoints is None:
            return None
        with self._db.session() as session:
            head = chain_head(session)
        if head is None:
            return None
        return self.checkpoints.write(head[0], head[1])

    def _after_commit(self, session: Session, seq: int, row_hash: str) -> None:
        """Checkpoint the row once ``session`` commits; forget it if it rolls back (a
        checkpoint of a row that never existed would read as a deletion)."""
        checkpoints = self.checkpoints
        if checkpoints is None:
            return
        armed = [True]

        def committed(_session: Session) -> None:
            if armed and armed.pop():
                checkpoints.maybe_write(seq, row_hash)

        def rolled_back(_session: Session, _previous: Any = None) -> None:
            armed.clear()

        event.listen(session, "after_commit", committed, once=True)
        event.listen(session, "after_rollback", rolled_back, once=True)

    def patient_ref(self, patient_id: str | None) -> str | None:
        """HMAC-SHA256 of a patient ID under the audit secret, or None for no ID."""
        if not patient_id:
            return None
        try:  # invalid UTF-8 from a command line hashes as the bytes that were typed
            data = patient_id.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = patient_id.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, data, hashlib.sha256).hexdigest()

    def record(
        self,
        event_id: AuditEventId,
        *,
        event_type: str | None = None,
        action: str = "E",
        outcome: Outcome = Outcome.success,
        actor: str | None = None,
        actor_address: str | None = None,
        study_uid: str | None = None,
        patient_id: str | None = None,
        patient_ref: str | None = None,
        details: dict[str, Any] | None = None,
        session: Session | None = None,
    ) -> None:
        """Append one event, in ``session``'s transaction when given, else in its own.

        ``patient_id`` is hashed before it is stored; pass ``patient_ref`` instead when the
        hash is already known. ``details`` must not contain PHI.
        """
        # Values from outside are kept as received, except what no database can hold (NUL,
        # invalid UTF-8) and what is longer than its column: see encoding.storable.
        row = AuditEvent(
            event_id=AuditEventId(event_id).value,
            event_type=storable(event_type, 64),
            action=action,
            outcome=int(outcome),
            actor=storable(actor, 128),
            actor_address=storable(actor_address, 128),
            study_uid=storable(study_uid, 64),
            patient_ref=storable(patient_ref or self.patient_ref(patient_id), 64),
            details=storable_details(details),
        )
        if session is not None:
            append(session, self._chain_key, row)
            self._after_commit(session, int(row.seq or 0), row.row_hash or "")
            return
        # The chain lock makes conflicts rare; a lost race on the unique seq (or a busy
        # SQLite) is retried with a fresh row rather than surfacing to the caller.
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._db.write_session() as own:
                    written = append(own, self._chain_key, _copy(row))
                    seq, row_hash = int(written.seq or 0), written.row_hash or ""
                if self.checkpoints is not None:
                    self.checkpoints.maybe_write(seq, row_hash)
                return
            except (IntegrityError, OperationalError) as exc:
                if attempt == _ATTEMPTS:
                    raise StorageError(
                        f"audit event {row.event_id} could not be appended: {exc.orig!r}"
                    ) from exc
                log.warning("audit append conflict, retrying (attempt %d)", attempt)


_ATTEMPTS = 5


def _copy(row: AuditEvent) -> AuditEvent:
    return AuditEvent(
        event_id=row.event_id,
        event_type=row.event_type,
        action=row.action,
        outcome=row.outcome,
        actor=row.actor,
        actor_address=row.actor_address,
        study_uid=row.study_uid,
        patient_ref=row.patient_ref,
        details=row.details,
    )
