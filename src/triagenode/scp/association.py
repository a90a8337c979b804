"""One DICOM association on the receiving side: negotiation, then the data phase.

The data phase reads P-DATA-TF PDUs straight off the socket (PS3.8 9.3.5): command
fragments are collected in memory (at most :data:`MAX_COMMAND_BYTES`), dataset fragments are
streamed to the spool in chunks of at most :data:`CHUNK_BYTES` as they arrive, so an instance
is never held whole in memory and never re-encoded, whatever PDU size the sender uses.

What the acceptor does on each PDU is written down once, as data, in the PS3.8 9.2 state
table's terms: :data:`STA2` (awaiting the A-ASSOCIATE-RQ) and :data:`STA6` (association
established). Each action is a method named after the standard's (``AE_6``, ``DT_2``...).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from triagenode.config.settings import ScpSettings
from triagenode.scp import negotiation, pdu
from triagenode.scp.negotiation import AssociateRequest
from triagenode.scp.status import AbortReason, RejectReason, StoreStatus
from triagenode.scp.storage import (
    AssociationInfo,
    AssociationOutcome,
    InstanceStorage,
    PendingInstance,
)
from triagenode.store.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

if TYPE_CHECKING:
    from triagenode.store.spool import IncomingInstance

__all__ = [
    "CHUNK_BYTES",
    "MAX_ASSOCIATE_RQ_BYTES",
    "MAX_COMMAND_BYTES",
    "STA2",
    "STA6",
    "Association",
    "AssociationHost",
    "ProtocolError",
]

log = logging.getLogger(__name__)

_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# A command set is a dozen short elements (PS3.7 E.1); a few hundred bytes in practice.
MAX_COMMAND_BYTES = 16 * 1024
# Dataset bytes read from the socket at once, whatever the PDV's size.
CHUNK_BYTES = 1024 * 1024
# DCMTK proposes ~120 contexts in about 20 KB; 128 contexts with many syntaxes fit easily.
MAX_ASSOCIATE_RQ_BYTES = 256 * 1024
# A-RELEASE-RQ and A-ABORT have 4-byte bodies.
_MAX_CONTROL_PDU = 64


class ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted with ``reason``."""

    def __init__(self, reason: AbortReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Closed(Exception):
    """The peer closed the connection."""


class _Ended(Exception):
    """The association ended normally (released, or aborted by the peer)."""


class _Discarded:
    """A message whose dataset is read and dropped, then answered with a refusal."""

    def __init__(
        self,
        command_field: int,
        message_id: int,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
        status: int,
        comment: str,
        on_finish: Callable[[], None] | None = None,
    ) -> None:
        self.command_field = command_field
        self.message_id = message_id
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self._answer = (status, comment)
        self._on_finish = on_finish

    def write(self, data: bytes, last: bool = False) -> None:
        pass

    def abandon(self) -> None:
        pass

    def finish(self) -> tuple[int, str | None]:
        if self._on_finish is not None:
            self._on_finish()
        return self._answer


class AssociationHost(Protocol):
    """What an association needs from the receiver that accepted its connection: settings,
    the admission policy and its accounting, the accepted syntaxes and instance storage.
    (:class:`~triagenode.scp.receiver.DicomReceiver` is the one host; the protocol keeps the
    import one-way, receiver -> association.)"""

    @property
    def scp_settings(self) -> ScpSettings: ...

    @property
    def storage(self) -> InstanceStorage: ...

    @property
    def abstract_syntaxes(self) -> Container[str]: ...

    @property
    def transfer_syntaxes(self) -> Container[str]: ...

    @property
    def active_associations(self) -> int: ...

    def request_received(self) -> None: ...

    def admission(
        self, info: AssociationInfo, request: AssociateRequest
    ) -> RejectReason | None: ...

    def association_accepted(self, info: AssociationInfo) -> None: ...

    def association_rejected(self, info: AssociationInfo, reason: RejectReason) -> None: ...

    def association_ended(self) -> None: ...


class Association:
    """Serves one connection until release, abort or close.

    Parameters
    ----------
    sock
        The accepted (and TLS-wrapped, when configured) socket.
    address
        ``host:port`` of the peer, for logs and audit.
    receiver
        The node's receiver (an :class:`AssociationHost`): admission policy and storage.
    """

    def __init__(self, sock: socket.socket, address: str, receiver: AssociationHost) -> None:
        self._sock = sock
        self._receiver = receiver
        self.info = AssociationInfo(address=address)
        self._reader = sock.makefile("rb", buffering=1 << 20)
        self._contexts: dict[int, tuple[str, str]] = {}
        self._peer_max_pdu = 0
        self._max_pdu = receiver.scp_settings.max_pdu
        self._command = bytearray()
        self._pending: PendingInstance | _Discarded | None = None
        self._pending_context = 0
        self._spare: IncomingInstance | None = None  # temp file for the next instance
        self._hasher: ThreadPoolExecutor | None = None  # hashes fragments as they arrive
        self._counted = False  # holds one of scp.max_associations
        self._mid_message = False

    # I/O ----------------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        data: bytes = self._reader.read(n)
        if len(data) != n:
            raise _Closed()
        return data

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _message_begun(self, begun: bool) -> None:
        # Between messages the association may idle (network timeout); within one, each
        # fragment must follow the previous one (DIMSE timeout).
        if begun != self._mid_message:
            self._mid_message = begun
            scp = self._receiver.scp_settings
            self._sock.settimeout(scp.dimse_timeout_s if begun else scp.network_timeout_s)

    # Phases -------------------------------------------------------------------------------

    def run(self) -> None:
        """Negotiate, then serve until the association ends; never raises."""
        settings = self._receiver.scp_settings
        try:
            self._sock.settimeout(settings.acse_timeout_s)
            if not self._sta2():
                return
            self._sock.settimeout(settings.network_timeout_s)
            self._sta6()
        except ProtocolError as exc:
            self.info.outcome = AssociationOutcome.aborted
            log.warning(
                "association aborted calling_ae=%s address=%s: %s",
                self.info.calling_ae,
                self.info.address,
                exc,
            )
            self._try_send(pdu.abort_pdu(exc.reason))
        except TimeoutError:
            if self._counted:  # PS3.8: a timer expiring in an association aborts it
                self.info.outcome = AssociationOutcome.aborted
                self._try_send(pdu.abort_pdu(AbortReason.not_specified))
            else:  # ARTIM expired awaiting the request (Sta2): just close
                self.info.outcome = AssociationOutcome.closed
            log.warning(
                "association timed out calling_ae=%s address=%s while %s",
                self.info.calling_ae,
                self.info.address,
                "receiving a message" if self._mid_message else "idle",
            )
        except (_Closed, OSError) as exc:
            if self.info.outcome is AssociationOutcome.open:
                self.info.outcome = AssociationOutcome.closed
                if not isinstance(exc, _Closed):
                    log.warning(
                        "association connection lost calling_ae=%s address=%s: %s",
                        self.info.calling_ae,
                        self.info.address,
                        type(exc).__name__,
                    )
        except Exception:
            self.info.outcome = AssociationOutcome.aborted
            log.exception("association failed calling_ae=%s", self.info.calling_ae)
            self._try_send(pdu.abort_pdu(AbortReason.not_specified))
        finally:
            if self._pending is not None:
                self._pending.abandon()
                self._pending = None
            self._discard_spare()
            if self._hasher is not None:
                self._hasher.shutdown(wait=False)
            self._close()
            if self._counted:
                self._counted = False
                self._receiver.association_ended()

    def _discard_spare(self) -> None:
        if self._spare is not None:
            self._spare.discard()
            self._spare = None

    def _try_send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._send(data)

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def _sta2(self) -> bool:
        """Sta2, transport open, awaiting the A-ASSOCIATE-RQ; True once associated."""
        pdu_type, length = struct.unpack(">BxI", self._read(6))
        action = STA2.get(pdu_type, Association.AA_1_unrecognised)
        return action(self, pdu_type, length)

    def _sta6(self) -> None:
        """Sta6, association established: serve PDUs until release or abort."""
        read, table = self._read, STA6
        try:
            while True:
                pdu_type, length = struct.unpack(">BxI", read(6))
                table.get(pdu_type, Association.AA_8_unrecognised)(self, pdu_type, length)
        except _Ended:
            return

    # PS3.8 9.2 actions ------------------------------------------------------------------

    def AE_6(self, pdu_type: int, length: int) -> bool:
        """A-ASSOCIATE-RQ received: accept (AE-7) or reject (AE-8)."""
        if length > MAX_ASSOCIATE_RQ_BYTES:
            raise ProtocolError(AbortReason.invalid_pdu_parameter, "A-ASSOCIATE-RQ too long")
        raw = struct.pack(">BxI", pdu_type, length) + self._read(length)
        self._receiver.request_received()  # no longer a pending connection
        try:
            request = negotiation.parse_associate_rq(raw)
        except (ValueError, UnicodeError, struct.error) as exc:
            raise ProtocolError(
                AbortReason.invalid_pdu_parameter, f"bad A-ASSOCIATE-RQ: {exc}"
            ) from exc
        self.info.calling_ae = request.calling_ae_title
        self.info.called_ae = request.called_ae_title
        reason = self._receiver.admission(self.info, request)
        if reason is not None:  # AE-8
            self.info.outcome = AssociationOutcome.rejected
            self._send(negotiation.reject_pdu(reason))
            self._receiver.association_rejected(self.info, reason)
            return False
        self._counted = True  # admission() counted this association
        self._peer_max_pdu = request.maximum_length_received
        accept, self._contexts = negotiation.accept_pdu(
            request,
            self._receiver.abstract_syntaxes,
            self._receiver.transfer_syntaxes,
            self._max_pdu,
            IMPLEMENTATION_CLASS_UID,
            IMPLEMENTATION_VERSION_NAME,
        )
        self._send(accept)  # AE-7
        self._receiver.association_accepted(self.info)
        return True

    def AA_2(self, pdu_type: int, length: int) -> bool:
        """A-ABORT before association: close."""
        self.info.outcome = AssociationOutcome.aborted
        return False

    def AA_1_unexpected(self, pdu_type: int, length: int) -> bool:
        raise ProtocolError(AbortReason.unexpected_pdu, f"PDU type {pdu_type} before RQ")

    def AA_1_unrecognised(self, pdu_type: int, length: int) -> bool:
        raise ProtocolError(AbortReason.unrecognised_pdu, f"PDU type {pdu_type} before RQ")

    def AA_8_unexpected(self, pdu_type: int, length: int) -> None:
        raise ProtocolError(AbortReason.unexpected_pdu, f"PDU type {pdu_type}")

    def AA_8_unrecognised(self, pdu_type: int, length: int) -> None:
        raise ProtocolError(AbortReason.unrecognised_pdu, f"PDU type {pdu_type}")

    def _control_body(self, length: int) -> None:
        if length > _MAX_CONTROL_PDU:
            raise ProtocolError(AbortReason.invalid_pdu_parameter, f"{length}-byte control PDU")
        self._read(length)

    def AR_2(self, pdu_type: int, length: int) -> None:
        """A-RELEASE-RQ: answer A-RELEASE-RP (AR-4), then wait for the close (Sta13)."""
        self._control_body(length)
        if self._pending is not None or self._command:
            raise ProtocolError(AbortReason.unexpected_pdu, "A-RELEASE-RQ inside a message")
        self.info.outcome = AssociationOutcome.released
        self._discard_spare()  # before the reply: the peer may look at the spool
        self._send(pdu.release_rp_pdu())
        self._linger()
        raise _Ended()

    def AA_3(self, pdu_type: int, length: int) -> None:
        """A-ABORT from the peer: close; an instance in progress is dropped."""
        self._control_body(length)
        self.info.outcome = AssociationOutcome.aborted
        raise _Ended()

    def _linger(self) -> None:
        # PS3.8 Sta13: the requestor closes the connection after A-RELEASE-RP; give it a
        # moment so our close does not race its last read.
        try:
            self._sock.settimeout(2.0)
            self._sock.recv(1)
        except OSError:
            pass

    def DT_2(self, pdu_type: int, length: int) -> None:
        """P-DATA-TF: each PDV goes to the command being collected or the dataset's file."""
        if self._max_pdu and length > self._max_pdu:
            raise ProtocolError(
                AbortReason.invalid_pdu_parameter,
                f"P-DATA-TF of {length} bytes exceeds the negotiated {self._max_pdu}",
            )
        read = self._read
        remaining = length
        while remaining > 0:
            if remaining < 6:
                raise ProtocolError(AbortReason.invalid_pdu_parameter, "bad PDV item length")
            item_length, context_id, control = struct.unpack(">IBB", read(6))
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError(AbortReason.invalid_pdu_parameter, "bad PDV item length")
            remaining -= 4 + item_length
            if context_id not in self._contexts:
                raise ProtocolError(
                    AbortReason.invalid_pdu_parameter, f"PDV on unknown context {context_id}"
                )
            size = item_length - 2
            last = bool(control & 0x02)
            if control & 0x01:
                if len(self._command) + size > MAX_COMMAND_BYTES:
                    raise ProtocolError(
                        AbortReason.invalid_pdu_parameter,
                        f"command set longer than {MAX_COMMAND_BYTES} bytes",
                    )
                self._command += read(size)
                self._message_begun(True)
                if last:
                    command, self._command = bytes(self._command), bytearray()
                    self._on_command(context_id, command)
                continue
            pending = self._pending
            if pending is None or context_id != self._pending_context:
                raise ProtocolError(AbortReason.unexpected_pdu, "dataset without command")
            while size > CHUNK_BYTES:
                pending.write(read(CHUNK_BYTES))
                size -= CHUNK_BYTES
            pending.write(read(size), last=last)
            if last:
                self._pending = None
                status, comment = pending.finish()
                self._respond(
                    context_id,
                    pending.message_id,
                    getattr(pending, "command_field", pdu.C_STORE_RQ),
                    status,
                    pending.sop_class_uid,
                    pending.sop_instance_uid,
                    comment,
                )
                self._message_begun(False)
                if self._spare is None:  # for the next instance, made after answering
                    self._spare = self._receiver.storage.open_spare()

    # DIMSE --------------------------------------------------------------------------------

    def _respond(
        self,
        context_id: int,
        message_id: int,
        command_field: int,
        status: int,
        sop_class_uid: str | None,
        sop_instance_uid: str | None,
        comment: str | None = None,
    ) -> None:
        response = pdu.encode_response(
            command_field, message_id, status, sop_class_uid, sop_instance_uid, comment
        )
        for fragment in pdu.p_data_pdus(context_id, response, True, self._peer_max_pdu):
            self._send(fragment)

    def _on_command(self, context_id: int, command: bytes) -> None:
        if self._pending is not None:
            raise ProtocolError(AbortReason.unexpected_pdu, "command before dataset ended")
        elements = pdu.decode_command(command)
        field_ = pdu.command_us(elements, pdu.COMMAND_FIELD) or 0
        message_id = pdu.command_us(elements, pdu.MESSAGE_ID) or 0
        has_dataset = pdu.command_us(elements, pdu.DATASET_TYPE) != pdu.NO_DATASET
        sop_class = pdu.command_uid(elements, pdu.AFFECTED_SOP_CLASS)
        sop_instance = pdu.command_uid(elements, pdu.AFFECTED_SOP_INSTANCE)
        abstract_syntax, transfer_syntax = self._contexts[context_id]
        self._pending_context = context_id
        if field_ == pdu.C_STORE_RQ and has_dataset:
            if sop_class is not None and sop_class != abstract_syntax:
                self._pending = self._refused_store(message_id, sop_class, sop_instance)
                return
            # A hashing helper only pays while a core is idle (see PendingInstance).
            helpers = self._receiver.active_associations < _CORES
            if helpers and self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="scp-hash")
            self._pending = PendingInstance(
                self._receiver.storage,
                self.info,
                message_id=message_id,
                sop_class_uid=abstract_syntax,
                sop_instance_uid=sop_instance or "",
                transfer_syntax_uid=transfer_syntax,
                priority=pdu.command_us(elements, pdu.PRIORITY),
                spare=self._spare,
                hasher=self._hasher if helpers else None,
            )
            self._spare = None
            return
        if has_dataset:  # answered once its dataset has been read and dropped
            self._pending = _Discarded(
                field_,
                message_id,
                sop_class,
                sop_instance,
                StoreStatus.unrecognised_operation,
                f"command 0x{field_:04X} not supported",
            )
            return
        if field_ == pdu.C_ECHO_RQ:
            self.info.echoes += 1
            status, comment = StoreStatus.success, None
        elif field_ == pdu.C_STORE_RQ:
            self.info.failures += 1
            status, comment = StoreStatus.cannot_understand, "C-STORE-RQ without a dataset"
        else:
            status, comment = StoreStatus.unrecognised_operation, None
        self._respond(context_id, message_id, field_, status, sop_class, sop_instance, comment)
        self._message_begun(False)

    def _refused_store(
        self, message_id: int, sop_class: str, sop_instance: str | None
    ) -> _Discarded:
        """A C-STORE whose SOP class is not its presentation context's (PS3.7 9.1.1.1.2)."""
        reason = "Affected SOP Class differs from the presentation context's"
        status = StoreStatus.dataset_does_not_match
        storage, info = self._receiver.storage, self.info

        def record() -> None:
            storage.record_failure(info, status, reason, None, sop_instance or "")

        return _Discarded(
            pdu.C_STORE_RQ, message_id, sop_class, sop_instance, status, reason, record
        )


_Sta2Action = Callable[[Association, int, int], bool]
_Sta6Action = Callable[[Association, int, int], None]

# PS3.8 9.2 state table, the acceptor's rows. Events are the PDU types received; any type
# not listed is Evt19 (unrecognised PDU). Timer expiries are TimeoutError in run().
STA2: dict[int, _Sta2Action] = {
    0x01: Association.AE_6,  # Evt6 A-ASSOCIATE-RQ
    0x02: Association.AA_1_unexpected,  # Evt3 A-ASSOCIATE-AC
    0x03: Association.AA_1_unexpected,  # Evt4 A-ASSOCIATE-RJ
    0x04: Association.AA_1_unexpected,  # Evt10 P-DATA-TF
    0x05: Association.AA_1_unexpected,  # Evt12 A-RELEASE-RQ
    0x06: Association.AA_1_unexpected,  # Evt13 A-RELEASE-RP
    0x07: Association.AA_2,  # Evt16 A-ABORT
}
STA6: dict[int, _Sta6Action] = {
    0x01: Association.AA_8_unexpected,  # Evt6 A-ASSOCIATE-RQ
    0x02: Association.AA_8_unexpected,  # Evt3 A-ASSOCIATE-AC
    0x03: Association.AA_8_unexpected,  # Evt4 A-ASSOCIATE-RJ
    0x04: Association.DT_2,  # Evt10 P-DATA-TF
    0x05: Association.AR_2,  # Evt12 A-RELEASE-RQ
    0x06: Association.AA_8_unexpected,  # Evt13 A-RELEASE-RP
    0x07: Association.AA_3,  # Evt16 A-ABORT
}
