"""One DICOM association on the receiving side: negotiation, then the data phase.

The data phase reads P-DATA-TF PDUs straight off the socket (PS3.8 9.3.5): command
fragments are collected in memory, dataset fragments are streamed to the spool as they
arrive, so an instance is never held whole in memory and never re-encoded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from triagenode.scp import negotiation, pdu
from triagenode.scp.status import AbortReason, StoreStatus
from triagenode.scp.storage import AssociationInfo, PendingInstance
from triagenode.store.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

if TYPE_CHECKING:
    from triagenode.scp.receiver import DicomReceiver
    from triagenode.store.spool import IncomingInstance

__all__ = ["Association", "ProtocolError"]

log = logging.getLogger(__name__)

_UNRECOGNISED_OPERATION = 0x0211  # PS3.7 C.4.5
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted with ``reason``."""

    def __init__(self, reason: AbortReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Closed(Exception):
    """The peer closed the connection."""


class Association:
    """Serves one connection until release, abort or close.

    Parameters
    ----------
    sock
        The accepted (and TLS-wrapped, when configured) socket.
    address
        ``host:port`` of the peer, for logs and audit.
    receiver
        The node's receiver: admission policy and instance storage.
    """

    def __init__(self, sock: socket.socket, address: str, receiver: DicomReceiver) -> None:
        self._sock = sock
        self._receiver = receiver
        self.info = AssociationInfo(address=address)
        self._reader = sock.makefile("rb", buffering=1 << 20)
        self._contexts: dict[int, tuple[str, str]] = {}
        self._peer_max_pdu = 0
        self._command = bytearray()
        self._pending: PendingInstance | None = None
        self._pending_context = 0
        self._spare: IncomingInstance | None = None  # temp file for the next instance
        self._hasher: ThreadPoolExecutor | None = None  # hashes fragments as they arrive

    # I/O ----------------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        data = self._reader.read(n)
        if len(data) != n:
            raise _Closed()
        return data

    def _send(self, data: bytes) -> None:
        self._sock.sendall(data)

    # Phases -------------------------------------------------------------------------------

    def run(self) -> None:
        """Negotiate, then serve until the association ends; never raises."""
        settings = self._receiver.settings.scp
        try:
            self._sock.settimeout(settings.acse_timeout_s)
            if not self._negotiate():
                return
            self._sock.settimeout(settings.network_timeout_s)
            self._data_phase()
        except ProtocolError as exc:
            self.info.outcome = "aborted"
            log.warning(
                "association aborted calling_ae=%s address=%s: %s",
                self.info.calling_ae,
                self.info.address,
                exc,
            )
            self._try_send(pdu.abort_pdu(exc.reason))
        except (_Closed, OSError) as exc:
            if self.info.outcome == "open":
                self.info.outcome = "closed"
                if not isinstance(exc, _Closed):
                    log.warning(
                        "association connection lost calling_ae=%s address=%s: %s",
                        self.info.calling_ae,
                        self.info.address,
                        type(exc).__name__,
                    )
        except Exception:
            self.info.outcome = "aborted"
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

    def _negotiate(self) -> bool:
        pdu_type, length = struct.unpack(">BxI", self._read(6))
        if pdu_type != pdu.A_ASSOCIATE_RQ_TYPE:
            raise ProtocolError(AbortReason.unexpected_pdu, f"PDU type {pdu_type} before RQ")
        if length > 1 << 20:
            raise ProtocolError(AbortReason.invalid_pdu_parameter, "A-ASSOCIATE-RQ too long")
        raw = struct.pack(">BxI", pdu_type, length) + self._read(length)
        try:
            request = negotiation.parse_associate_rq(raw)
        except (ValueError, UnicodeError) as exc:
            raise ProtocolError(AbortReason.invalid_pdu_parameter, "bad A-ASSOCIATE-RQ") from exc
        self.info.calling_ae = request.calling_ae_title
        self.info.called_ae = request.called_ae_title
        reason = self._receiver.admission(self.info, request)
        if reason is not None:
            self.info.outcome = "rejected"
            self._send(negotiation.reject_pdu(reason))
            self._receiver.association_rejected(self.info, reason)
            return False
        self._peer_max_pdu = request.maximum_length_received
        accept, self._contexts = negotiation.accept_pdu(
            request,
            self._receiver.abstract_syntaxes,
            self._receiver.transfer_syntaxes,
            self._receiver.settings.scp.max_pdu,
            IMPLEMENTATION_CLASS_UID,
            IMPLEMENTATION_VERSION_NAME,
        )
        self._send(accept)
        self._receiver.association_accepted(self.info)
        return True

    def _data_phase(self) -> None:
        max_pdu = self._receiver.settings.scp.max_pdu
        while True:
            pdu_type, length = struct.unpack(">BxI", self._read(6))
            if pdu_type == pdu.P_DATA_TF:
                if max_pdu and length > max_pdu:
                    raise ProtocolError(
                        AbortReason.invalid_pdu_parameter,
                        f"P-DATA-TF of {length} bytes exceeds the negotiated {max_pdu}",
                    )
                self._p_data(length)
            elif pdu_type == pdu.A_RELEASE_RQ:
                self._read(length)
                self.info.outcome = "released"
                self._discard_spare()  # before the reply: the peer may look at the spool
                self._send(pdu.release_rp_pdu())
                self._linger()
                return
            elif pdu_type == pdu.A_ABORT:
                self._read(length)
                self.info.outcome = "aborted"
                return
            elif pdu_type in (0x01, 0x02, 0x03, 0x06):
                raise ProtocolError(AbortReason.unexpected_pdu, f"PDU type {pdu_type}")
            else:
                raise ProtocolError(AbortReason.unrecognised_pdu, f"PDU type {pdu_type}")

    def _linger(self) -> None:
        # PS3.8 Sta13: the requestor closes the connection after A-RELEASE-RP; give it a
        # moment so our close does not race its last read.
        try:
            self._sock.settimeout(2.0)
            self._sock.recv(1)
        except OSError:
            pass

    def _p_data(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            item_length, context_id, control = struct.unpack(">IBB", self._read(6))
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError(AbortReason.invalid_pdu_parameter, "bad PDV item length")
            remaining -= 4 + item_length
            if context_id not in self._contexts:
                raise ProtocolError(
                    AbortReason.invalid_pdu_parameter, f"PDV on unknown context {context_id}"
                )
            data = self._read(item_length - 2)
            if control & 0x01:
                self._command += data
                if control & 0x02:
                    command, self._command = bytes(self._command), bytearray()
                    self._on_command(context_id, command)
            else:
                if self._pending is None or context_id != self._pending_context:
                    raise ProtocolError(AbortReason.unexpected_pdu, "dataset without command")
                self._pending.write(data, last=bool(control & 0x02))
                if control & 0x02:
                    pending, self._pending = self._pending, None
                    status, comment = pending.finish()
                    self._respond(
                        context_id,
                        pending.message_id,
                        pdu.C_STORE_RQ,
                        status,
                        pending.sop_class_uid,
                        pending.sop_instance_uid,
                        comment,
                    )
                    if self._spare is None:  # for the next instance, made after answering
                        self._spare = self._receiver.storage.open_spare()

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
        field_ = pdu.command_us(elements, pdu.COMMAND_FIELD)
        message_id = pdu.command_us(elements, pdu.MESSAGE_ID) or 0
        has_dataset = pdu.command_us(elements, pdu.DATASET_TYPE) != pdu.NO_DATASET
        sop_class = pdu.command_uid(elements, pdu.AFFECTED_SOP_CLASS)
        sop_instance = pdu.command_uid(elements, pdu.AFFECTED_SOP_INSTANCE)
        abstract_syntax, transfer_syntax = self._contexts[context_id]
        if field_ == pdu.C_ECHO_RQ:
            self.info.echoes += 1
            self._respond(context_id, message_id, field_, StoreStatus.success, sop_class, None)
        elif field_ == pdu.C_STORE_RQ and has_dataset:
            # A hashing helper only pays while a core is idle (see PendingInstance).
            helpers = self._receiver.active_associations < _CORES
            if helpers and self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="scp-hash")
            self._pending_context = context_id
            self._pending = PendingInstance(
                self._receiver.storage,
                self.info,
                message_id=message_id,
                sop_class_uid=sop_class or abstract_syntax,
                sop_instance_uid=sop_instance or "",
                transfer_syntax_uid=transfer_syntax,
                priority=pdu.command_us(elements, pdu.PRIORITY),
                spare=self._spare,
                hasher=self._hasher if helpers else None,
            )
            self._spare = None
        elif field_ == pdu.C_STORE_RQ:
            self.info.failures += 1
            self._respond(
                context_id,
                message_id,
                field_,
                StoreStatus.cannot_understand,
                sop_class,
                sop_instance,
                "C-STORE-RQ without a dataset",
            )
        else:
            if has_dataset:
                raise ProtocolError(AbortReason.unexpected_pdu, f"command 0x{field_ or 0:04X}")
            self._respond(
                context_id,
                message_id,
                field_ or 0,
                _UNRECOGNISED_OPERATION,
                sop_class,
                sop_instance,
            )
