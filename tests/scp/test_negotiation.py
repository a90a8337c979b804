"""The hand-written negotiation PDUs agree with pynetdicom's codecs (PS3.8 9.3.2-9.3.4)."""

from __future__ import annotations

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from triagenode.scp.negotiation import accept_pdu, parse_associate_rq, reject_pdu
from triagenode.scp.status import RejectReason

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT, JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"


def _request() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "TRIAGENODE"
    contexts = [
        build_context(CT, [JPEG, EXPLICIT, IMPLICIT]),
        build_context(MR, ["1.2.3.4.5"]),  # a syntax the node does not know
        build_context("1.2.3.999", [EXPLICIT]),  # not a storage class
    ]
    for number, context in enumerate(contexts):
        context.context_id = 1 + 2 * number
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_request_is_read_like_pynetdicom_reads_it() -> None:
    request = parse_associate_rq(_request())
    assert (request.calling_ae_title, request.called_ae_title) == ("MODALITY", "TRIAGENODE")
    assert request.application_context_name == "1.2.840.10008.3.1.1.1"
    assert request.maximum_length_received == 16384
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in request.contexts] == [
        (1, CT, (JPEG, EXPLICIT, IMPLICIT)),
        (3, MR, ("1.2.3.4.5",)),
        (5, "1.2.3.999", (EXPLICIT,)),
    ]


def test_accept_decodes_with_pynetdicom() -> None:
    request = parse_associate_rq(_request())
    raw, accepted = accept_pdu(
        request, frozenset([CT, MR]), frozenset([EXPLICIT, JPEG]), 0, "1.2.3.4", "TEST_1"
    )
    assert accepted == {1: (CT, JPEG)}
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    primitive = ac.to_primitive()
    assert str(primitive.called_ae_title).strip() == "TRIAGENODE"
    assert str(primitive.calling_ae_title).strip() == "MODALITY"
    results = {
        c.context_id: (c.result, str(c.transfer_syntax[0]))
        for c in primitive.presentation_context_definition_results_list
    }
    assert results == {1: (0, JPEG), 3: (4, "1.2.3.4.5"), 5: (3, EXPLICIT)}
    assert primitive.maximum_length_received == 0
    assert str(primitive.implementation_class_uid) == "1.2.3.4"
    versions = [
        item.implementation_version_name
        for item in primitive.user_information
        if isinstance(item, ImplementationVersionNameNotification)
    ]
    assert versions == [b"TEST_1"] or versions == ["TEST_1"]


def test_reject_decodes_with_pynetdicom() -> None:
    rj = A_ASSOCIATE_RJ()
    rj.decode(reject_pdu(RejectReason.calling_ae_not_recognised))
    assert (rj.result, rj.source, rj.reason_diagnostic) == (0x01, 0x01, 0x03)


@pytest.mark.parametrize("cut", [10, -3])
def test_truncated_request_is_an_error(cut: int) -> None:
    with pytest.raises(ValueError):
        parse_associate_rq(_request()[:cut])


def test_extended_negotiation_items_are_read() -> None:
    from tests.bad_peer import associate_rq, async_window, role_selection

    identity = bytes([0x58, 0, 0, 8, 1, 1, 0, 2]) + b"me" + b"\0\0"
    raw = associate_rq(user_items=role_selection(CT, 1, 0) + async_window(3, 2) + identity)
    request = parse_associate_rq(raw)
    assert request.roles == {CT: (1, 0)}
    assert request.async_window == (3, 2)
    assert request.user_identity == (1, True)
    assert request.supports_version_1


@pytest.mark.parametrize(
    "contexts",
    [[(2, CT, [EXPLICIT])], [(1, CT, [EXPLICIT]), (1, MR, [EXPLICIT])]],
    ids=["even", "repeated"],
)
def test_bad_context_ids_are_errors(contexts: list[tuple[int, str, list[str]]]) -> None:
    from tests.bad_peer import associate_rq

    with pytest.raises(ValueError, match="context ID"):
        parse_associate_rq(associate_rq(contexts))


def test_version_without_bit_0_is_noted() -> None:
    from tests.bad_peer import associate_rq

    assert not parse_associate_rq(associate_rq(version=2)).supports_version_1
