"""The node's DICOM receiver: C-ECHO and C-STORE SCP for every storage SOP class.

:class:`DicomReceiver` listens on ``scp.host:scp.port`` and serves each association in its
own thread (:class:`~triagenode.scp.association.Association`). Negotiation follows PS3.8
with pynetdicom's PDU codecs; the data phase is the node's own lean reader, because the
receive path must keep up with C++ senders while fsyncing every instance (see README).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time

from pynetdicom._globals import ALL_TRANSFER_SYNTAXES
from pynetdicom.sop_class import _STORAGE_CLASSES

from triagenode.audit.events import AuditEventId, AuditLog, Outcome
from triagenode.config.settings import Settings
from triagenode.errors import ConfigError
from triagenode.metrics import ASSOCIATIONS
from triagenode.scp.association import Association
from triagenode.scp.negotiation import APPLICATION_CONTEXT, AssociateRequest
from triagenode.scp.status import RejectReason
from triagenode.scp.storage import AssociationInfo, InstanceStorage
from triagenode.store.db import Database
from triagenode.store.ingest import StudyIngest
from triagenode.store.recovery import RunMarker, remove_rows_without_files
from triagenode.store.spool import Spool

__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "VERIFICATION_SOP_CLASS", "DicomReceiver"]

log = logging.getLogger(__name__)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
# Every transfer syntax pynetdicom knows: the node stores bytes as received, so it needs no
# codec for any of them; it only reads the header, which is never compressed.
ACCEPTED_TRANSFER_SYNTAXES = frozenset(ALL_TRANSFER_SYNTAXES)


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
        self.abstract_syntaxes = frozenset([VERIFICATION_SOP_CLASS, *_STORAGE_CLASSES.values()])
        self.transfer_syntaxes = ACCEPTED_TRANSFER_SYNTAXES
        self._allowed = {ae.strip() for ae in settings.scp.allowed_calling_aets}
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[threading.Thread, socket.socket] = {}
        self._tls: ssl.SSLContext | None = None
        self._marker = RunMarker(self.storage.spool.data_dir)

    @property
    def port(self) -> int:
        """The TCP port listened on (the configured one once started)."""
        if self._listener is None:
            return self.settings.scp.port
        return int(self._listener.getsockname()[1])

    @property
    def active_associations(self) -> int:
        with self._lock:
            return len(self._active)

    def start(self) -> None:
        """Bind and serve in background threads; returns at once."""
        if self._thread is not None:
            return
        removed = self.storage.spool.prepare()
        if removed:
            log.info("spool: removed %d unacknowledged temp files from a previous run", removed)
        # Rows of new instances commit in parallel with their file's fsync: after a crash,
        # rows whose file never arrived (never acknowledged) are taken back before serving.
        unclean, since = self._marker.unclean_since()
        if unclean:
            remove_rows_without_files(self.db, self.storage.spool.data_dir, since)
        self._marker.mark_running()
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
        listener.listen(max(64, scp.max_associations * 2))
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
            self._marker.mark_stopped()  # nothing in flight any more
        log.info("DICOM receiver stopped")

    # Threads ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
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
            with self._lock:
                self._active[thread] = sock
            thread.start()

    def _serve(self, sock: socket.socket, address: str) -> None:
        try:
            # Responses are small and each one gates the sender's next request: never let
            # Nagle hold them back. Receive buffers are left to the kernel's autotuning,
            # which grows them beyond what a fixed SO_RCVBUF would allow.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                sock.settimeout(self.settings.scp.acse_timeout_s)
                sock = self._tls.wrap_socket(sock, server_side=True)
                with self._lock:
                    self._active[threading.current_thread()] = sock
            association = Association(sock, address, self)
            association.run()
            if association.info.outcome != "rejected":
                self._finished(association.info)
        except (OSError, ssl.SSLError) as exc:
            log.warning("connection from %s failed: %s", address, type(exc).__name__)
            sock.close()
        finally:
            with self._lock:
                self._active.pop(threading.current_thread(), None)

    # Policy and accounting, called by Association -----------------------------------------

    def admission(self, info: AssociationInfo, request: AssociateRequest) -> RejectReason | None:
        """Why an association request is refused, or None to accept it."""
        if request.application_context_name != APPLICATION_CONTEXT:
            return RejectReason.application_context_not_supported
        if self._allowed and info.calling_ae not in self._allowed:
            return RejectReason.calling_ae_not_recognised
        # This association's own thread is already counted in _active.
        if self.active_associations > self.settings.scp.max_associations:
            return RejectReason.local_limit_exceeded
        return None

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
            info.outcome,
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
                        "association": info.outcome,
                    },
                )
            except Exception as exc:
                log.error("audit event for received instances not recorded: %s", exc)
