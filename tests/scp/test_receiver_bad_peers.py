"""A scripted bad peer against each error branch of the association code (PS3.8 state table).

Each test checks what the node answers (A-ABORT reason, A-ASSOCIATE-RJ triple, DIMSE
status), that nothing is left on disk or in the database, and that the node still serves.
"""

from __future__ import annotations

import select
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests import factory
from tests.bad_peer import (
    ABORT,
    CT,
    EXPLICIT,
    MR,
    RELEASE_RQ,
    VERIFICATION,
    Peer,
    associate_rq,
    async_window,
    command,
    p_data,
    pdv,
    role_selection,
)
from tests.peers import wait_for
from tests.receiver_fixtures import Node, dataset_part, echoscu
from triagenode.scp.association import MAX_COMMAND_BYTES
from triagenode.scp.status import AbortReason, RejectReason, StoreStatus

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

C_STORE, C_FIND = 0x0001, 0x0020


def ct_dataset(tmp_path: Path) -> tuple[str, bytes]:
    """A CT slice's SOP Instance UID and its Explicit VR Little Endian dataset bytes."""
    ds = factory.ct_slice(generate_uid(), generate_uid(), 0)
    path = factory.write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    return str(ds.SOPInstanceUID), dataset_part(path)


def nothing_kept(node: Node) -> None:
    """No rows, no files (temp files go when their association ends), still serving."""
    assert node.instances() == []
    wait_for(lambda: node.receiver.active_associations == 0, timeout=10, what="associations end")
    assert node.spool_files() == []
    assert echoscu(node.port).returncode == 0


def send_store(peer: Peer, sop: str, dataset: bytes, *, sop_class: str = CT, ctx: int = 1) -> None:
    peer.send(
        p_data(
            pdv(
                ctx,
                command(C_STORE, sop_class=sop_class, sop_instance=sop),
                is_command=True,
                last=True,
            )
        )
    )
    peer.send(p_data(pdv(ctx, dataset, is_command=False, last=True)))


# Data phase (Sta6) -----------------------------------------------------------------------


def test_abort_mid_instance_keeps_nothing(node: Node, tmp_path: Path) -> None:
    sop, dataset = ct_dataset(tmp_path)
    peer = Peer(node.port)
    peer.associate()
    peer.send(p_data(pdv(1, command(C_STORE, sop_instance=sop), is_command=True, last=True)))
    peer.send(p_data(pdv(1, dataset[: len(dataset) // 2], is_command=False, last=False)))
    peer.send(ABORT)
    peer.closed_within(5)
    peer.close()
    nothing_kept(node)


def test_pdu_over_negotiated_maximum_is_aborted(node_factory: object) -> None:
    node = node_factory(scp={"max_pdu": 16384})
    peer = Peer(node.port)
    accept = peer.associate()
    assert struct.pack(">BxHI", 0x51, 4, 16384) in accept  # the limit is advertised
    # The header alone announces too much: the node aborts without reading the body.
    peer.send(struct.pack(">BxI", 0x04, 16385) + pdv(1, b"\0" * 16, is_command=False, last=False))
    assert peer.expect_abort() == AbortReason.invalid_pdu_parameter
    peer.close()
    nothing_kept(node)


def test_default_max_pdu_is_finite_and_enforced(node: Node) -> None:
    assert 16 * 1024 <= node.settings.scp.max_pdu <= 256 * 1024
    peer = Peer(node.port)
    peer.associate()
    peer.send(struct.pack(">BxI", 0x04, node.settings.scp.max_pdu + 1))
    assert peer.expect_abort() == AbortReason.invalid_pdu_parameter


def test_data_on_unknown_context_is_aborted(node: Node) -> None:
    peer = Peer(node.port)
    peer.associate()
    peer.send(p_data(pdv(3, command(C_STORE), is_command=True, last=True)))
    assert peer.expect_abort() == AbortReason.invalid_pdu_parameter
    peer.close()
    nothing_kept(node)


def test_dataset_without_command_is_aborted(node: Node, tmp_path: Path) -> None:
    _, dataset = ct_dataset(tmp_path)
    peer = Peer(node.port)
    peer.associate()
    peer.send(p_data(pdv(1, dataset, is_command=False, last=True)))
    assert peer.expect_abort() == AbortReason.unexpected_pdu
    peer.close()
    nothing_kept(node)


def test_unknown_dimse_is_answered_0211_with_or_without_dataset(node: Node, tmp_path: Path) -> None:
    peer = Peer(node.port)
    peer.associate()
    peer.send(p_data(pdv(1, command(C_FIND, has_dataset=False), is_command=True, last=True)))
    assert peer.response_status() == StoreStatus.unrecognised_operation
    # With a dataset: read, dropped, then answered; the association goes on.
    _, dataset = ct_dataset(tmp_path)
    peer.send(p_data(pdv(1, command(C_FIND, message_id=2), is_command=True, last=True)))
    peer.send(p_data(pdv(1, dataset, is_command=False, last=True)))
    assert peer.response_status() == StoreStatus.unrecognised_operation
    sop, dataset = ct_dataset(tmp_path)
    send_store(peer, sop, dataset)
    assert peer.response_status() == StoreStatus.success
    peer.send(RELEASE_RQ)
    assert peer.pdu()[0] == 0x06


def test_c_store_without_dataset_cannot_be_understood(node: Node) -> None:
    peer = Peer(node.port)
    peer.associate()
    store = command(C_STORE, sop_instance="1.2.3", has_dataset=False)
    peer.send(p_data(pdv(1, store, is_command=True, last=True)))
    assert peer.response_status() == StoreStatus.cannot_understand
    peer.close()
    nothing_kept(node)


def test_command_set_over_the_cap_is_aborted(node: Node) -> None:
    peer = Peer(node.port)
    peer.associate()
    chunk = b"\0" * 8000
    for _ in range(MAX_COMMAND_BYTES // len(chunk)):
        peer.send(p_data(pdv(1, chunk, is_command=True, last=False)))
    peer.send(p_data(pdv(1, chunk, is_command=True, last=False)))
    assert peer.expect_abort() == AbortReason.invalid_pdu_parameter
    peer.close()
    nothing_kept(node)


def test_release_inside_a_message_is_aborted(node: Node, tmp_path: Path) -> None:
    sop, dataset = ct_dataset(tmp_path)
    peer = Peer(node.port)
    peer.associate()
    peer.send(p_data(pdv(1, command(C_STORE, sop_instance=sop), is_command=True, last=True)))
    peer.send(p_data(pdv(1, dataset[:100], is_command=False, last=False)))
    peer.send(RELEASE_RQ)
    assert peer.expect_abort() == AbortReason.unexpected_pdu
    peer.close()
    nothing_kept(node)


@pytest.mark.parametrize("pdu_type", [0x01, 0x02, 0x06, 0x0A])
def test_unexpected_or_unknown_pdu_after_association_is_aborted(node: Node, pdu_type: int) -> None:
    peer = Peer(node.port)
    peer.associate()
    peer.send(struct.pack(">BxI", pdu_type, 4) + b"\0" * 4)
    expected = AbortReason.unrecognised_pdu if pdu_type > 0x07 else AbortReason.unexpected_pdu
    assert peer.expect_abort() == expected


def test_truncated_dataset_is_refused_and_not_kept(node: Node, tmp_path: Path) -> None:
    """The last-fragment bit set early, inside Pixel Data: 0xC004, nothing kept."""
    sop, dataset = ct_dataset(tmp_path)
    peer = Peer(node.port)
    peer.associate()
    send_store(peer, sop, dataset[:-1000])
    status = peer.response_status()
    assert status == StoreStatus.cannot_understand_incomplete
    assert 0xC000 <= status <= 0xCFFF
    peer.close()
    nothing_kept(node)


def test_c_store_on_another_sop_class_context_is_refused(node: Node, tmp_path: Path) -> None:
    """A CT instance sent on the MR (or Verification) context: 0xA900, nothing stored."""
    sop, dataset = ct_dataset(tmp_path)
    peer = Peer(node.port)
    peer.associate(associate_rq([(1, MR, [EXPLICIT]), (3, VERIFICATION, ["1.2.840.10008.1.2"])]))
    send_store(peer, sop, dataset, ctx=1)
    assert peer.response_status() == StoreStatus.dataset_does_not_match
    send_store(peer, sop, dataset, ctx=3)
    assert peer.response_status() == StoreStatus.dataset_does_not_match
    peer.close()
    nothing_kept(node)


def test_one_pdv_larger_than_the_chunk_is_stored_whole(
    node_factory: object, tmp_path: Path
) -> None:
    """With an unlimited PDU (max_pdu 0) the sender may put 3 MB in one PDV: streamed."""
    node = node_factory(scp={"max_pdu": 0})
    ds = factory.ct_slice(generate_uid(), generate_uid(), 0, size=1200)
    path = factory.write(ds, tmp_path / "big.dcm")
    dataset = dataset_part(path)
    assert len(dataset) > 2 * 1024 * 1024
    peer = Peer(node.port)
    peer.associate()
    send_store(peer, str(ds.SOPInstanceUID), dataset)
    assert peer.response_status() == StoreStatus.success
    [row] = node.instances()
    assert dataset_part(node.data_dir / row.file_path) == dataset
    meta = pydicom.dcmread(node.data_dir / row.file_path, stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == EXPLICIT  # the context's, always


# Negotiation (Sta2) ----------------------------------------------------------------------

BAD_REQUESTS = {
    "even context id": associate_rq([(2, CT, [EXPLICIT])]),
    "repeated context id": associate_rq([(1, CT, [EXPLICIT]), (1, MR, [EXPLICIT])]),
    "129 contexts": associate_rq([(1 + 2 * (n % 128), CT, [EXPLICIT]) for n in range(129)]),
    "item past its PDU": associate_rq() + b"\x10\x00\x00\x64ab",
    "short header": struct.pack(">BxI", 0x01, 10) + b"\0" * 10,
    "role item short": associate_rq(user_items=b"\x54\x00\x00\x01\x00"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_malformed_request_is_aborted(node: Node, name: str) -> None:
    raw = BAD_REQUESTS[name]
    if name == "item past its PDU":  # keep the header's length right, break the last item
        raw = raw[:2] + struct.pack(">I", len(raw) - 6) + raw[6:]
    peer = Peer(node.port)
    peer.send(raw)
    assert peer.expect_abort() == AbortReason.invalid_pdu_parameter
    assert node.receiver.active_associations == 0
    peer.close()
    nothing_kept(node)


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (associate_rq(version=2), RejectReason.protocol_version_not_supported),
        (associate_rq(called="ANY-SCP"), RejectReason.called_ae_not_recognised),
        (
            associate_rq(application_context="1.2.3.4"),
            RejectReason.application_context_not_supported,
        ),
    ],
    ids=["version bit", "called AE", "application context"],
)
def test_unacceptable_request_is_rejected(
    node: Node, request_: bytes, reason: RejectReason
) -> None:
    peer = Peer(node.port)
    peer.send(request_)
    assert peer.expect_reject() == reason.value
    peer.close()
    nothing_kept(node)


def test_called_ae_check_can_be_turned_off(node_factory: object) -> None:
    node = node_factory(scp={"check_called_ae": False})
    Peer(node.port).associate(associate_rq(called="ANY-SCP"))


@pytest.mark.parametrize("pdu_type", [0x04, 0x05, 0x0B])
def test_other_pdu_before_the_request_is_aborted(node: Node, pdu_type: int) -> None:
    peer = Peer(node.port)
    peer.send(struct.pack(">BxI", pdu_type, 4) + b"\0" * 4)
    expected = AbortReason.unrecognised_pdu if pdu_type > 0x07 else AbortReason.unexpected_pdu
    assert peer.expect_abort() == expected


def test_role_selection_and_async_window_are_answered(node: Node) -> None:
    from pynetdicom.pdu import A_ASSOCIATE_AC
    from pynetdicom.pdu_primitives import (
        AsynchronousOperationsWindowNegotiation,
        SCP_SCU_RoleSelectionNegotiation,
    )

    user = role_selection(CT, 1, 1) + role_selection("1.2.3.999", 1, 0) + async_window(4, 4)
    body = Peer(node.port).associate(associate_rq(user_items=user))
    ac = A_ASSOCIATE_AC()
    ac.decode(struct.pack(">BxI", 0x02, len(body)) + body)
    items = ac.to_primitive().user_information
    roles = [i for i in items if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in roles] == [(CT, True, False)]
    [window] = [i for i in items if isinstance(i, AsynchronousOperationsWindowNegotiation)]
    assert (
        window.maximum_number_operations_invoked,
        window.maximum_number_operations_performed,
    ) == (1, 1)


# Timers ----------------------------------------------------------------------------------


def trickle_until_closed(peer: Peer, data: bytes, limit: float) -> float:
    """Send ``data`` one byte every 0.2 s until the node closes; seconds it took."""
    start = time.monotonic()
    for index in range(len(data)):
        try:
            peer.send(data[index : index + 1])
        except OSError:
            break
        readable, _, _ = select.select([peer.sock], [], [], 0.2)
        if readable and not peer.sock.recv(1):
            break
        if time.monotonic() - start > limit:
            raise AssertionError(f"still open after {limit} s of trickling")
    return time.monotonic() - start


def test_idle_and_trickling_requests_are_closed_at_the_artim_deadline(node_factory: object) -> None:
    node = node_factory(scp={"acse_timeout_s": 1.0})
    idle, trickle = Peer(node.port), Peer(node.port)
    # Each byte arrives well within the timeout; the whole request never does.
    assert trickle_until_closed(trickle, associate_rq(), limit=3.0) < 2.0
    assert idle.closed_within(1.0) < 1.0
    assert node.receiver.pending_connections == 0
    nothing_kept(node)


def test_idle_association_is_aborted_after_the_network_timeout(node_factory: object) -> None:
    node = node_factory(scp={"network_timeout_s": 1.0})
    peer = Peer(node.port)
    peer.associate()
    assert peer.expect_abort() == AbortReason.not_specified


def test_stalled_message_is_aborted_after_the_dimse_timeout(
    node_factory: object, tmp_path: Path
) -> None:
    node = node_factory(scp={"dimse_timeout_s": 1.0})
    sop, dataset = ct_dataset(tmp_path)
    peer = Peer(node.port)
    peer.associate()
    peer.send(p_data(pdv(1, command(C_STORE, sop_instance=sop), is_command=True, last=True)))
    peer.send(p_data(pdv(1, dataset[:100], is_command=False, last=False)))
    assert peer.expect_abort() == AbortReason.not_specified
    peer.close()
    nothing_kept(node)
