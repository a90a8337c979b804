"""Storing one received C-STORE instance: spool file, header check, rows, status.

A :class:`PendingInstance` takes a temp file when the C-STORE command arrives; the
association streams the dataset fragments into :meth:`PendingInstance.write`;
:meth:`PendingInstance.finish` then decides the status. Success is returned only after the
file is durable at its final path and the rows are committed (rules of the house 1 and 2).
The association's thread fsyncs, renames and fsyncs the folder while the database writer
stages (for a new instance of a known study, commits) the rows, so the flushes overlap
instead of adding up.
"""

from __future__ import annotations

import enum
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from triagenode.audit.events import AuditEventId, AuditLog, Outcome
from triagenode.errors import StorageError
from triagenode.metrics import INSTANCES_RECEIVED, INSTANCES_REJECTED, RECEIVED_BYTES
from triagenode.scp.header import HEAD_BYTES, InstanceHeader, parse_header
from triagenode.scp.status import StoreStatus
from triagenode.scp.structure import IncompleteDataset, check_complete
from triagenode.store.group_commit import PendingWrite
from triagenode.store.ingest import IngestOutcome, InstanceRecord, StudyIngest
from triagenode.store.models import utcnow
from triagenode.store.part10 import file_meta_bytes
from triagenode.store.spool import (
    IncomingInstance,
    Spool,
    SpoolError,
    is_path_safe_uid,
)

__all__ = [
    "AssociationInfo",
    "AssociationOutcome",
    "InstanceStorage",
    "PendingInstance",
    "StudyTally",
]

log = logging.getLogger(__name__)


class AssociationOutcome(str, enum.Enum):
    """How an association ended; its text goes to the log and the audit trail."""

    open = "open"  # still running
    released = "released"  # A-RELEASE (the normal end)
    aborted = "aborted"  # A-ABORT, sent or received, or a timer expired in the association
    rejected = "rejected"  # A-ASSOCIATE-RJ: never established
    closed = "closed"  # the connection ended without a release or an abort


@dataclass
class StudyTally:
    """What one association delivered for one study: one audit event at the end."""

    instances: int = 0
    bytes: int = 0
    replaced: int = 0
    patient_ref: str | None = None


@dataclass
class AssociationInfo:
    """Who is sending and what they sent so far; no PHI."""

    address: str
    calling_ae: str = ""
    called_ae: str = ""
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    bytes: int = 0
    failures: int = 0
    echoes: int = 0
    studies: dict[str, StudyTally] = field(default_factory=dict)
    outcome: AssociationOutcome = AssociationOutcome.open


class InstanceStorage:
    """The receive path shared by all associations.

    Parameters
    ----------
    spool
        Where instance files go.
    ingest
        Records the rows.
    audit
        Records rejections (successful transfers are summarised per association).
    """

    def __init__(self, spool: Spool, ingest: StudyIngest, audit: AuditLog) -> None:
        self.spool = spool
        self.ingest = ingest
        self.audit = audit

    def close(self) -> None:
        """Finish queued work and stop the database writer (it restarts on next use)."""
        self.ingest.close()

    def open_spare(self) -> IncomingInstance | None:
        """An empty temp file for an association's next instance, or None if the spool
        refuses (the next instance then opens its own and reports the error).

        Associations call this right after answering a C-STORE, while the sender gets its
        next instance ready, so creating the file delays no answer.
        """
        try:
            return self.spool.open_instance()
        except SpoolError:
            return None

    def record_failure(
        self,
        info: AssociationInfo,
        status: StoreStatus,
        reason: str,
        header: InstanceHeader | None,
        sop_instance_uid: str,
    ) -> None:
        """Log, count and audit a refused instance (best effort if the database is down)."""
        info.failures += 1
        INSTANCES_REJECTED.labels(reason=status.name).inc()
        # ERROR when the node is at fault (full disk, database down), so monitoring that
        # alerts on errors catches it; WARNING when the sender's data was refused.
        log.log(
            logging.ERROR if status.is_node_fault else logging.WARNING,
            "instance refused status=0x%04X (%s) calling_ae=%s address=%s sop_uid=%s: %s",
            int(status),
            status.name,
            info.calling_ae,
            info.address,
            sop_instance_uid or "-",
            reason,
        )
        try:
            self.audit.record(
                AuditEventId.instances_transferred,
                event_type="rejected",
                action="C",
                outcome=Outcome.serious_failure,
                actor=info.calling_ae,
                actor_address=info.address,
                study_uid=header.study_uid if header else None,
                patient_id=header.patient_id if header else None,
                details={
                    "status": f"0x{int(status):04X}",
                    "reason": reason,
                    "sop_instance_uid": sop_instance_uid,
                    "called_ae": info.called_ae,
                },
            )
        except Exception as exc:  # the database may be what failed
            log.error("audit event for a refused instance not recorded: %s", type(exc).__name__)


def _spool_status(exc: SpoolError) -> tuple[StoreStatus, str]:
    return StoreStatus.out_of_resources_spool, exc.comment


def _check(
    header: InstanceHeader, sop_class_uid: str, sop_instance_uid: str
) -> tuple[StoreStatus, str] | None:
    """Why a dataset cannot be stored under the request that carried it, or None."""
    missing = [
        name
        for name, value in (
            ("StudyInstanceUID", header.study_uid),
            ("SeriesInstanceUID", header.series_uid),
            ("SOPInstanceUID", header.sop_instance_uid),
        )
        if not value
    ]
    if missing:
        return StoreStatus.cannot_understand_missing_uid, f"missing {', '.join(missing)}"
    if header.sop_instance_uid != sop_instance_uid:
        return (
            StoreStatus.cannot_understand_sop_uid_mismatch,
            "SOPInstanceUID differs from the request's Affected SOP Instance UID",
        )
    if header.sop_class_uid and header.sop_class_uid != sop_class_uid:
        return (
            StoreStatus.dataset_does_not_match,
            "SOPClassUID differs from the request's Affected SOP Class UID",
        )
    for uid in (header.study_uid, header.series_uid, header.sop_instance_uid):
        if not is_path_safe_uid(uid or ""):
            return StoreStatus.cannot_understand, "UID is not valid"
    return None


class PendingInstance:
    """An instance whose dataset is arriving; owned by one association's thread.

    Made when the C-STORE request arrives. ``spare`` is an empty temp file opened earlier
    (:meth:`InstanceStorage.open_spare`), so creating one is off the critical path.

    ``hasher``, a one-thread pool, hashes the bytes while they arrive
    (:meth:`IncomingInstance.hash_with`). That shortens one instance's path when a core is
    idle; when every core is busy anyway (as many associations as cores), pass None: handing
    each fragment to another thread then costs more CPU than it saves, so the association's
    own thread hashes as it writes.
    """

    def __init__(
        self,
        storage: InstanceStorage,
        info: AssociationInfo,
        *,
        message_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        priority: int | None,
        spare: IncomingInstance | None = None,
        hasher: Executor | None = None,
    ) -> None:
        self._storage = storage
        self._info = info
        self.message_id = message_id
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax_uid = transfer_syntax_uid
        self._priority = priority
        self._head = bytearray()
        self._error: SpoolError | None = None
        self._incoming: IncomingInstance | None = None
        self._meta = file_meta_bytes(
            sop_class_uid, sop_instance_uid, transfer_syntax_uid, info.calling_ae
        )
        try:
            storage.spool.check_room()
            self._incoming = spare if spare is not None else storage.spool.open_instance()
            if hasher is not None:
                self._incoming.hash_with(hasher)
            self._incoming.write_meta(self._meta)  # removes the temp file if it fails
        except SpoolError as exc:
            if self._incoming is None and spare is not None:
                spare.discard()  # refused before the spare was taken
            self._error = exc
            self._incoming = None

    def write(self, data: bytes, last: bool = False) -> None:
        """Append a dataset fragment, ``last`` for the final one (after a spool error,
        fragments are dropped)."""
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        if self._incoming is None:
            return
        try:
            self._incoming.write(data, last)
        except SpoolError as exc:  # the temp file is already removed
            self._error = exc
            self._incoming = None

    def abandon(self) -> None:
        """The association ended before the dataset did: leave nothing behind."""
        if self._incoming is not None:
            self._incoming.discard()
            self._incoming = None

    def finish(self) -> tuple[int, str | None]:
        """Store the complete instance; return the DIMSE status and an error comment."""
        try:
            return self._finish()
        except Exception:
            # Anything unexpected becomes a failure status, never a dead association.
            log.exception("instance handling failed sop_uid=%s", self.sop_instance_uid)
            self.abandon()
            self._storage.record_failure(
                self._info,
                StoreStatus.processing_failure,
                "internal error",
                None,
                self.sop_instance_uid,
            )
            return StoreStatus.processing_failure, "internal error"

    def _refuse(
        self, status: StoreStatus, reason: str, header: InstanceHeader | None = None
    ) -> tuple[int, str | None]:
        self.abandon()
        self._storage.record_failure(self._info, status, reason, header, self.sop_instance_uid)
        return status, reason

    def _finish(self) -> tuple[int, str | None]:
        incoming = self._incoming
        if self._error is not None or incoming is None:
            status, reason = _spool_status(self._error or SpoolError("spool"))
            return self._refuse(status, reason)
        info = self._info
        head = bytes(self._head)
        try:
            check_complete(
                head,
                incoming.dataset_size,
                self.transfer_syntax_uid,
                incoming.temp_path,
                len(self._meta),
            )
        except IncompleteDataset as exc:
            return self._refuse(StoreStatus.cannot_understand_incomplete, str(exc))
        try:
            header = parse_header(
                self._meta,
                head,
                incoming.dataset_size <= len(self._head),
                self.transfer_syntax_uid,
                incoming.temp_path,
                self._priority,
                info.calling_ae,
            )
        except Exception as exc:
            return self._refuse(
                StoreStatus.cannot_understand_unparsable, f"header unreadable: {type(exc).__name__}"
            )
        problem = _check(header, self.sop_class_uid, self.sop_instance_uid)
        if problem is not None:
            return self._refuse(*problem, header)
        assert header.study_uid and header.series_uid and header.sop_instance_uid
        # The database writer stages the rows (and, for a new instance of a known study,
        # commits them) while this thread makes the file durable, so the two flushes
        # overlap. (Handing the fsync to a helper thread as well was no faster and used more
        # CPU: docs/performance.md.)
        uids = (header.study_uid, header.series_uid, header.sop_instance_uid)
        self._incoming = None
        try:
            pending = self._storage.ingest.submit(self._record(header, incoming), commit_early=True)
        except BaseException:
            incoming.discard()
            raise
        # Success needs both the file and the rows, whichever finishes first.
        try:
            incoming.place(*uids)
        except SpoolError as exc:
            pending.file_durable(False)
            self._take_back(pending)
            status, reason = _spool_status(exc)
            return self._refuse(status, reason, header)
        except BaseException:
            pending.file_durable(False)
            incoming.discard()
            incoming.revert()
            self._take_back(pending)
            raise
        pending.file_durable(True)
        try:
            outcome = pending.wait()
        except StorageError as exc:
            incoming.revert()
            return self._refuse(StoreStatus.out_of_resources_database, str(exc), header)
        except BaseException:
            incoming.revert()
            raise
        incoming.settle()
        patient_ref = pending.item.patient_ref
        size = incoming.size
        tally = info.studies.get(header.study_uid)
        if tally is None:
            tally = info.studies[header.study_uid] = StudyTally(patient_ref=patient_ref)
        tally.instances += 1
        tally.bytes += size
        info.instances += 1
        info.bytes += size
        if outcome.superseded_path is not None:
            # the row now names the new copy: the older one, elsewhere, is nobody's file
            self._storage.spool.remove_superseded(outcome.superseded_path)
        if outcome.replaced:
            tally.replaced += 1
            log.info(
                "duplicate instance replaced the older copy sop_uid=%s calling_ae=%s",
                header.sop_instance_uid,
                info.calling_ae,
            )
        INSTANCES_RECEIVED.inc()
        RECEIVED_BYTES.inc(size)
        return StoreStatus.success, None

    def _record(self, header: InstanceHeader, incoming: IncomingInstance) -> InstanceRecord:
        assert header.study_uid and header.series_uid and header.sop_instance_uid
        return InstanceRecord(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=self.sop_class_uid,
            transfer_syntax_uid=self.transfer_syntax_uid,
            size=incoming.size,
            sha256=incoming.digest(),
            file_path=incoming.relative_path(
                header.study_uid, header.series_uid, header.sop_instance_uid
            ),
            calling_ae=self._info.calling_ae or None,
            received_at=utcnow(),
            patient_ref=self._storage.audit.patient_ref(header.patient_id),
            modality=header.modality,
            body_part=header.body_part,
            instance_number=header.instance_number,
            number_of_frames=header.number_of_frames,
            triage_inputs=header.triage_inputs,
        )

    def _take_back(self, pending: PendingWrite[InstanceRecord, IngestOutcome]) -> None:
        """The file failed: remove the rows if they were committed without waiting for it."""
        try:
            pending.wait()
        except StorageError:
            return  # not committed
        if pending.committed_early:
            self._storage.ingest.unrecord(pending.item)
