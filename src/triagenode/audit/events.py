"""Audit events: the one function through which every part of the node records activity.

Event identifiers follow DICOM PS3.15 Annex A.5 (IHE ATNA) so the trail can be exported as
DICOM audit messages. Patients are identified only by :func:`patient_ref`, a keyed hash.
Every row is appended to the keyed hash chain of :mod:`triagenode.audit.chain`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
from typing import Any

from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from triagenode.audit.chain import VerifyReport, append, chain_key, verify
from triagenode.errors import StorageError
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

__all__ = ["AuditEventId", "AuditLog", "Outcome"]

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


class AuditLog:
    """Appends audit events to the database.

    Parameters
    ----------
    db
        The node's database.
    secret
        Key for patient pseudonyms and the hash chain; never logged.
    """

    def __init__(self, db: Database, secret: bytes) -> None:
        self._db = db
        self._secret = secret
        self._chain_key = chain_key(secret)

    @property
    def db(self) -> Database:
        return self._db

    def verify(self, anchor: tuple[int, str] | None = None) -> VerifyReport:
        """Walk the chain with this log's secret (see :func:`triagenode.audit.chain.verify`)."""
        return verify(self._db, self._secret, anchor)

    def patient_ref(self, patient_id: str | None) -> str | None:
        """HMAC-SHA256 of a patient ID under the audit secret, or None for no ID."""
        if not patient_id:
            return None
        return hmac.new(self._secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()

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
        row = AuditEvent(
            event_id=AuditEventId(event_id).value,
            event_type=event_type,
            action=action,
            outcome=int(outcome),
            actor=actor,
            actor_address=actor_address,
            study_uid=study_uid,
            patient_ref=patient_ref or self.patient_ref(patient_id),
            details=details,
        )
        if session is not None:
            append(session, self._chain_key, row)
            return
        # The chain lock makes conflicts rare; a lost race on the unique seq (or a busy
        # SQLite) is retried with a fresh row rather than surfacing to the caller.
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._db.write_session() as own:
                    append(own, self._chain_key, _copy(row))
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
