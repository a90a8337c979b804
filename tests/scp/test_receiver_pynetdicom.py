"""pynetdicom as a sender: the PDU size matrix, extended negotiation, unknown SOP classes."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    UserIdentityNegotiation,
)

from tests import factory
from tests.bad_peer import EXPLICIT, Peer, associate_rq
from tests.receiver_fixtures import NODE_AE, Node
from triagenode.scp.status import StoreStatus

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

PRIVATE_CLASS = "1.3.6.1.4.1.99999.7.1"  # a vendor's private storage class
FIND_CLASS = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Q/R FIND: not storage


def _extended_negotiation() -> list[object]:
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"radiographer"
    identity.positive_response_requested = True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    return [build_role(CTImageStorage, scu_role=True, scp_role=True), identity, window]


@pytest.mark.parametrize("max_pdu", [0, 16 * 1024, 1024 * 1024], ids=["0", "16KiB", "1MiB"])
def test_pynetdicom_sender_matrix(node_factory: object, max_pdu: int) -> None:
    """Node and sender both at 0 (unlimited) / 16 KiB / 1 MiB, with every request item a
    sender may add: role selection, user identity (positive response requested), async ops."""
    node: Node = node_factory(scp={"max_pdu": max_pdu})  # type: ignore[operator]
    ae = AE(ae_title="PYNET")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE, ext_neg=_extended_negotiation())
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
        assert (context.as_scu, context.as_scp) == (True, False)  # SCP role refused
        assert assoc.acceptor.maximum_length == max_pdu
        study = generate_uid()
        big = factory.ct_slice(study, generate_uid(), 0, size=1200)  # ~2.9 MB
        small = factory.ct_slice(study, generate_uid(), 1)
        for ds in (big, small):
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            assert assoc.send_c_store(ds).Status == StoreStatus.success
    finally:
        assoc.release()
    stored = {
        row.sop_instance_uid: pydicom.dcmread(node.data_dir / row.file_path)
        for row in node.instances()
    }
    for ds in (big, small):
        assert stored[ds.SOPInstanceUID].PixelData == ds.PixelData


def _context_result(accept: bytes, context_id: int) -> int:
    offset = 68
    while offset + 4 <= len(accept):
        item_type = accept[offset]
        (length,) = struct.unpack_from(">H", accept, offset + 2)
        if item_type == 0x21 and accept[offset + 4] == context_id:
            return accept[offset + 6]
        offset += 4 + length
    raise AssertionError(f"no result for context {context_id}")


def test_unknown_sop_classes_are_refused_by_default(node: Node) -> None:
    accept = Peer(node.port).associate(associate_rq([(1, PRIVATE_CLASS, [EXPLICIT])]))
    assert _context_result(accept, 1) == 0x03  # abstract syntax not supported


def test_unknown_storage_classes_accepted_when_configured(
    node_factory: object, tmp_path: Path
) -> None:
    node: Node = node_factory(scp={"accept_unknown_sop_classes": True})  # type: ignore[operator]
    accept = Peer(node.port).associate(
        associate_rq([(1, PRIVATE_CLASS, [EXPLICIT]), (3, FIND_CLASS, [EXPLICIT])])
    )
    assert _context_result(accept, 1) == 0x00
    assert _context_result(accept, 3) == 0x03  # a known class of another service

    ae = AE(ae_title="PACS")
    ae.add_requested_context(PRIVATE_CLASS, ExplicitVRLittleEndian)
    ds = factory.ct_slice(generate_uid(), generate_uid(), 0, SOPClassUID=PRIVATE_CLASS)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == StoreStatus.success
    finally:
        assoc.release()
    [row] = node.instances()
    assert row.sop_class_uid == PRIVATE_CLASS
