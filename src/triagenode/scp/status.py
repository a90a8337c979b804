"""DIMSE status codes and association-level answers the receiver sends, named once.

Values from PS3.7 Annex C (general statuses) and PS3.4 B.2.3 (Storage Service Class), and
the A-ASSOCIATE-RJ / A-ABORT parameters of PS3.8 9.3.4 and 9.3.8.
"""

from __future__ import annotations

import enum

__all__ = ["AbortReason", "RejectReason", "StoreStatus"]


class StoreStatus(enum.IntEnum):
    """C-STORE / C-ECHO response statuses the node sends."""

    success = 0x0000
    # PS3.4 B.2.3: 0xA7xx Refused: Out of Resources. The low byte tells the operator which
    # resource ran out; peers treat the whole range alike and retry later.
    out_of_resources = 0xA700
    out_of_resources_spool = 0xA701  # the spool could not be written (full, unwritable)
    out_of_resources_database = 0xA702  # the database did not commit (down, locked)
    # PS3.4 B.2.3: 0xA9xx Error: Data Set does not match SOP Class.
    dataset_does_not_match = 0xA900
    # PS3.4 B.2.3: 0xCxxx Error: Cannot understand.
    cannot_understand = 0xC000
    cannot_understand_missing_uid = 0xC001  # Study, Series or SOP Instance UID absent
    cannot_understand_sop_uid_mismatch = 0xC002  # dataset's SOP UID differs from request's
    cannot_understand_unparsable = 0xC003  # the dataset's header could not be read
    cannot_understand_incomplete = 0xC004  # the dataset ends inside an element
    # PS3.7 C.4.2: processing failure, for anything unexpected inside the handler.
    processing_failure = 0x0110
    # PS3.7 C.4.4: SOP class not supported (command on an unknown abstract syntax).
    sop_class_not_supported = 0x0122
    # PS3.7 C.4.5: a DIMSE command the node does not perform.
    unrecognised_operation = 0x0211

    @property
    def is_success(self) -> bool:
        return self == StoreStatus.success

    @property
    def is_node_fault(self) -> bool:
        """The node could not store (disk, database, a bug), whatever was sent: an operator
        must act. Other failures are the sender's data and are the sender's to fix."""
        return (self & 0xFF00) == 0xA700 or self == StoreStatus.processing_failure


class RejectReason(enum.Enum):
    """A-ASSOCIATE-RJ (result, source, reason/diag.) triples of PS3.8 9.3.4."""

    calling_ae_not_recognised = (0x01, 0x01, 0x03)  # rejected-permanent, service-user
    called_ae_not_recognised = (0x01, 0x01, 0x07)
    application_context_not_supported = (0x01, 0x01, 0x02)
    protocol_version_not_supported = (0x01, 0x02, 0x02)  # service-provider (ACSE)
    local_limit_exceeded = (0x02, 0x03, 0x02)  # rejected-transient, presentation related

    @property
    def result(self) -> int:
        return self.value[0]

    @property
    def source(self) -> int:
        return self.value[1]

    @property
    def diagnostic(self) -> int:
        return self.value[2]


class AbortReason(enum.IntEnum):
    """A-ABORT reasons of PS3.8 9.3.8 when the service provider (source 2) aborts."""

    not_specified = 0x00
    unrecognised_pdu = 0x01
    unexpected_pdu = 0x02
    unrecognised_pdu_parameter = 0x04
    unexpected_pdu_parameter = 0x05
    invalid_pdu_parameter = 0x06
