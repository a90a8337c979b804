"""The node's DICOM receiver: C-ECHO and C-STORE SCP for every storage SOP class.

:class:`DicomReceiver` listens on ``scp.host:scp.port`` and serves each connection in its
own thread (:class:`~triagenode.scp.association.Association`). Negotiation and the data
phase are the node's own lean PS3.8 code, because the receive path must keep up with C++
senders while fsyncing every instance (docs/performance.md); pynetdicom supplies only its
lists of storage SOP classes and transfer syntaxes.

Connections that are not yet associations (TLS handshake, A-ASSOCIATE-RQ still arriving)
are kept apart from associations so that idle or trickling peers cannot lock modalities
out: each has a whole deadline (``scp.tls_handshake_timeout_s``, then the ARTIM
``scp.acse_timeout_s``) that the accept thread enforces, there are at most
``scp.max_pending_connections`` of them (``scp.max_pending_per_address`` per source
address), the oldest being closed to make room for a new one, and only real associations
count against ``scp.max_associations``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.service_class import ServiceClass
from pynetdicom.sop_class import uid_to_service_class

from triagenode.audit.events import AuditEventId, AuditLog, Outcome
from triagenode.config.settings import ScpSettings, Settings
from triagenode.errors import ConfigError
from triagenode.metrics import ASSOCIATIONS
from triagenode.scp.association import Association
from triagenode.scp.negotiation import APPLICATION_CONTEXT, AssociateRequest
from triagenode.scp.status import RejectReason
from triagenode.scp.storage import AssociationInfo, AssociationOutcome, InstanceStorage
from triagenode.store.db import Database
from triagenode.store.ingest import StudyIngest
from triagenode.store.recovery import (
    RunMarker,
    recover_unclean_runs,
)
from triagenode.store.spool import Spool

__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "VERIFICATION_SOP_CLASS", "DicomReceiver"]

log = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
# Every transfer syntax pynetdicom knows: the node stores bytes as received, so it needs no
# codec for any of them; it only reads the header, which is never compressed.
ACCEPTED_TRANSFER_SYNTAXES = frozenset(ALL_TRANSFER_SYNTAXES)
STORAGE_SOP_CLASSES = frozenset(str(c.abstract_syntax) for c in AllStoragePresentationContexts)


class AbstractSyntaxes:
    """The SOP classes the node accepts contexts for: Verification and every storage class
    pynetdicom knows, plus, with ``accept_unknown``, any valid UID that is not a known
    class of another service (a private storage class, one newer than pynetdicom's list)."""

    def __init__(self, accept_unknown: bool) -> None:
        self._known = frozenset([VERIFICATION_SOP_CLASS, *STORAGE_SOP_CLASSES])
        self.accept_unknown = accept_unknown

    def __contains__(self, uid: object) -> bool:
        if uid in self._known:
            return True
        if not self.accept_unknown or not isinstance(uid, str) or not UID(uid).is_valid:
            return False
        return uid_to_service_class(uid) is ServiceClass  # unknown to pynetdicom


@dataclass
class _Pending:
    """A connection that is not an association yet."""

    host: str
    accepted: float
    deadline: float
    watch: socket.socket  # a duplicate of the socket, to shut it from the accept thread
    waiting_for: str


class DicomReceiver:
    """C-ECHO / C-STORE SCP writing to the spool and the database.

    Parameters
    ----------
    settings
        The node's settings (``scp`` section, ``node.data_dir``, ``triage.default_priority``).
    db
        The node's database.
    audit
        The audit log.
    """

    def __init__(self, settings: Settings, db: Database, audit: AuditLog) -> None:
        self.settings = settings
        self.db = db
        self.audit = audit
        self.storage = InstanceStorage(
            Spool(settings.node.data_dir, settings.scp.min_free_bytes),
            StudyIngest(db, settings.triage.default_priority),
            audit,
        )
        self.abstract_syntaxes = AbstractSyntaxes(settings.scp.accept_unknown_sop_classes)
        self.transfer_syntaxes = ACCEPTED_TRANSFER_SYNTAXES
        self._allowed = {ae.strip() for ae in settings.scp.allowed_calling_aets}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[threading.Thread, socket.socket] = {}
        self._pending: dict[threading.Thread, _Pending] = {}
        self._associations = 0
        self._tls: ssl.SSLContext | None = None
        self._marker = RunMarker(self.storage.spool.data_dir)

    @property
    def port(self) -> int:
        """The TCP port listened on (the configured one once started)."""
        if self._listener is None:
            return self.settings.scp.port
        return int(self._listener.getsockname()[1])

    @property
    def scp_settings(self) -> ScpSettings:
        """The ``[scp]`` section, for the associations."""
        return self.settings.scp

    @property
    def active_associations(self) -> int:
        """Established associations (connections still negotiating are not counted)."""
        return self._associations

    @property
    def pending_connections(self) -> int:
        """Connections in a TLS handshake or awaiting their A-ASSOCIATE-RQ."""
        with self._lock:
            return len(self._pending)

    def start(self) -> None:
        """Bind and serve in background threads; returns at once."""
        if self._thread is not None:
            return
        removed = self.storage.spool.prepare()
        if removed:
            log.info("spool: removed %d unacknowledged temp files from a previous run", removed)
        # Rows of new instances commit in parallel with their file's fsync: after a crash,
        # rows whose file never arrived (never acknowledged) are taken back before serving
        # (or, beside other live receivers, once what they have in flight has settled).
        recover_unclean_runs(self.db, self.storage.spool.data_dir, self._marker)
        if self.settings.scp.tls_enabled:
            from triagenode.scp.tls import server_context

            self._tls = server_context(self.settings.scp)
        scp = self.settings.scp
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((scp.host, scp.port))
        except OSError as exc:
            listener.close()
            raise ConfigError(
                f"scp.port: cannot listen on {scp.host}:{scp.port} ({exc.strerror})"
            ) from None
        listener.listen(max(128, scp.max_associations * 2 + scp.max_pending_connections))
        listener.settimeout(0.2)
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="scp-accept", daemon=True)
        self._thread.start()
        log.info(
            "DICOM receiver listening ae_title=%s host=%s port=%s tls=%s",
            scp.ae_title,
            scp.host,
            self.port,
            self._tls is not None,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, end open associations (unacknowledged data is discarded)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            active = dict(self._active)
        for sock in active.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.storage.close()
        if not any(thread.is_alive() for thread in active):
            self.storage.spool.release()
            self._marker.mark_stopped()  # nothing in flight any more
        log.info("DICOM receiver stopped")

    # Threads ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            self._expire()
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                time.sleep(0.1)  # e.g. EMFILE: do not spin
                continue
            thread = threading.Thread(
                target=self._serve,
                args=(sock, f"{peer[0]}:{peer[1]}"),
                daemon=True,
                name=f"scp-{peer[0]}:{peer[1]}",
            )
            scp = self.settings.scp
            now = time.monotonic()
            tls = self._tls is not None
            try:
                watch = sock.dup()
            except OSError:
                sock.close()
                continue
            with self._lock:
                self._make_room(peer[0])
                self._pending[thread] = _Pending(
                    peer[0],
                    now,
                    now + (scp.tls_handshake_timeout_s if tls else scp.acse_timeout_s),
                    watch,
                    "TLS handshake" if tls else "A-ASSOCIATE-RQ",
                )
                self._active[thread] = sock
            thread.start()

    def _make_room(self, host: str) -> None:
        """Close the oldest pending connection when a new one would exceed a cap (locked)."""
        scp = self.settings.scp
        same = [p for p in self._pending.values() if p.host == host]
        if len(same) >= scp.max_pending_per_address:
            self._drop(min(same, key=lambda p: p.accepted), "pending connections from its address")
        elif len(self._pending) >= scp.max_pending_connections:
            oldest = min(self._pending.values(), key=lambda p: p.accepted)
            self._drop(oldest, "pending connections")

    def _expire(self) -> None:
        """Close connections past their handshake or ARTIM deadline (PS3.8 9.1.5)."""
        now = time.monotonic()
        with self._lock:
            for pending in [p for p in self._pending.values() if p.deadline <= now]:
                self._drop(pending, "deadline")

    def _drop(self, pending: _Pending, why: str) -> None:
        for thread, candidate in list(self._pending.items()):
            if candidate is pending:
                del self._pending[thread]
        log.warning(
            "connection from %s closed after %.1f s without %s (%s)",
            pending.host,
            time.monotonic() - pending.accepted,
            pending.waiting_for,
            "no more time" if why == "deadline" else f"room needed: {why}",
        )
        with contextlib.suppress(OSError):
            pending.watch.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            pending.watch.close()

    def _leave_pending(self) -> None:
        with self._lock:
            pending = self._pending.pop(threading.current_thread(), None)
        if pending is not None:
            with contextlib.suppress(OSError):
                pending.watch.close()

    def _handshake_done(self) -> None:
        with self._lock:
            pending = self._pending.get(threading.current_thread())
            if pending is not None:
                pending.deadline = time.monotonic() + self.settings.scp.acse_timeout_s
                pending.waiting_for = "A-ASSOCIATE-RQ"

    def _serve(self, sock: socket.socket, address: str) -> None:
        try:
            # Responses are small and each one gates the sender's next request: never let
            # Nagle hold them back. Receive buffers are left to the kernel's autotuning,
            # which grows them beyond what a fixed SO_RCVBUF would allow.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock.settimeout(self.settings.scp.tls_handshake_timeout_s)
                sock = self._tls.wrap_socket(sock, server_side=True)
                with self._lock:
                    self._active[threading.current_thread()] = sock
                self._handshake_done()
            association = Association(sock, address, self)
            association.run()
            if association.info.outcome is not AssociationOutcome.rejected:
                self._finished(association.info)
        except (OSError, ssl.SSLError) as exc:
            log.warning("connection from %s failed: %s", address, type(exc).__name__)
            sock.close()
        finally:
            self._leave_pending()
            with self._lock:
                self._active.pop(threading.current_thread(), None)

    # Policy and accounting, called by Association -----------------------------------------

    def request_received(self) -> None:
        """The connection's A-ASSOCIATE-RQ has arrived whole: it is no longer pending."""
        self._leave_pending()

    def admission(self, info: AssociationInfo, request: AssociateRequest) -> RejectReason | None:
        """Why an association request is refused, or None to accept it.

        None also counts the association against ``scp.max_associations``; the caller
        calls :meth:`association_ended` when it ends.
        """
        scp = self.settings.scp
        if not request.supports_version_1:
            return RejectReason.protocol_version_not_supported
        if request.application_context_name != APPLICATION_CONTEXT:
            return RejectReason.application_context_not_supported
        if scp.check_called_ae and request.called_ae_title != scp.ae_title:
            return RejectReason.called_ae_not_recognised
        if self._allowed and info.calling_ae not in self._allowed:
            return RejectReason.calling_ae_not_recognised
        with self._lock:
            if self._associations >= scp.max_associations:
                return RejectReason.local_limit_exceeded
            self._associations += 1
        return None

    def association_ended(self) -> None:
        with self._lock:
            self._associations -= 1

    def association_accepted(self, info: AssociationInfo) -> None:
        ASSOCIATIONS.labels(outcome="accepted").inc()
        log.debug("association accepted calling_ae=%s address=%s", info.calling_ae, info.address)

    def association_rejected(self, info: AssociationInfo, reason: RejectReason) -> None:
        ASSOCIATIONS.labels(outcome="rejected").inc()
        log.warning(
            "association rejected calling_ae=%s called_ae=%s address=%s reason=%s",
            info.calling_ae,
            info.called_ae,
            info.address,
            reason.name,
        )
        if reason is RejectReason.local_limit_exceeded:
            return  # load, not a security matter
        try:
            self.audit.record(
                AuditEventId.security_alert,
                event_type="association-rejected",
                outcome=Outcome.minor_failure,
                actor=info.calling_ae,
                actor_address=info.address,
                details={"reason": reason.name, "called_ae": info.called_ae},
            )
        except Exception as exc:
            log.error("audit event for a rejected association not recorded: %s", exc)

    def _finished(self, info: AssociationInfo) -> None:
        seconds = time.monotonic() - info.started
        log.info(
            "association %s calling_ae=%s address=%s instances=%d bytes=%d seconds=%.3f "
            "failures=%d studies=%d",
            info.outcome.value,
            info.calling_ae,
            info.address,
            info.instances,
            info.bytes,
            seconds,
            info.failures,
            len(info.studies),
        )
        for study_uid, tally in info.studies.items():
            try:
                self.audit.record(
                    AuditEventId.instances_transferred,
                    event_type="received",
                    action="C",
                    actor=info.calling_ae,
                    actor_address=info.address,
                    study_uid=study_uid,
                    patient_ref=tally.patient_ref,
                    details={
                        "instances": tally.instances,
                        "bytes": tally.bytes,
                        "replaced": tally.replaced,
                        "called_ae": info.called_ae,
                        "association": info.outcome.value,
                    },
                )
            except Exception as exc:
                log.error("audit event for received instances not recorded: %s", exc)
