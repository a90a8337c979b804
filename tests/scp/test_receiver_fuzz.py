"""Property-based fuzzing of the association request parser, the data-phase reader and the
header scan, through a whole :class:`Association` on a socket pair.

Properties, for every input: no exception escapes (nothing logged at ERROR by the receiver,
which is where an unexpected exception would go), the node's every answer is a well-formed
PDU, the association ends in a clean reject, abort, release or close, and nothing is left
on disk except instances answered with success.

The runs here are bounded (a few hundred examples, well under 30 s). A longer run, for
example before a release: ``TRIAGENODE_FUZZ_EXAMPLES=20000 pytest tests/scp/test_receiver_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from tests import factory
from tests.bad_peer import (
    ABORT,
    CT,
    EXPLICIT,
    IMPLICIT,
    RELEASE_RQ,
    VERIFICATION,
    associate_rq,
    async_window,
    command,
    p_data,
    pdv,
    role_selection,
)
from tests.receiver_fixtures import Node, dataset_part
from triagenode.scp.association import Association
from triagenode.scp.header import HEAD_BYTES
from triagenode.scp.structure import IncompleteDataset, check_complete

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

EXAMPLES = int(os.environ.get("TRIAGENODE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VALID_RQ = associate_rq(
    [(1, CT, [EXPLICIT, IMPLICIT]), (3, VERIFICATION, [IMPLICIT])],
    user_items=role_selection(CT, 1, 1) + async_window(2, 2),
)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _answers(data: bytes) -> list[int]:
    """The PDU types the node sent; fails on a malformed PDU."""
    types, offset = [], 0
    while offset < len(data):
        assert offset + 6 <= len(data), "truncated PDU from the node"
        pdu_type, length = struct.unpack_from(">BxI", data, offset)
        assert pdu_type in (0x02, 0x03, 0x04, 0x06, 0x07), pdu_type
        offset += 6 + length
        assert offset <= len(data), "PDU longer than what the node sent"
        types.append(pdu_type)
    return types


def _successes(data: bytes) -> int:
    """C-STORE responses with status 0x0000 in the node's answers."""
    count, offset = 0, 0
    while offset + 6 <= len(data):
        pdu_type, length = struct.unpack_from(">BxI", data, offset)
        body = data[offset + 6 : offset + 6 + length]
        if pdu_type == 0x04 and b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00" in body:
            count += 1
        offset += 6 + length
    return count


def converse(node: Node, sent: bytes) -> tuple[Association, bytes]:
    """Run one association over a socket pair on ``sent``; check the properties."""
    errors = _Errors()
    logger = logging.getLogger("triagenode")
    logger.addHandler(errors)
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(sent)
        ours.shutdown(socket.SHUT_WR)
        association = Association(theirs, "fuzz:0", node.receiver)
        association.run()  # never raises: anything unexpected would be logged at ERROR
        answer = b""
        ours.settimeout(5)
        while chunk := ours.recv(1 << 16):
            answer += chunk
    finally:
        logger.removeHandler(errors)
        ours.close()
    assert [r.getMessage() for r in errors.records] == []
    assert association.info.outcome in ("rejected", "aborted", "released", "closed")
    _answers(answer)
    assert node.receiver.active_associations == 0
    stored = [p for p in node.spool_files() if ".incoming" not in p.parts]
    assert not [p for p in node.spool_files() if ".incoming" in p.parts]
    assert len(stored) == len(node.instances())
    return association, answer


def _mutated(data: st.DataObject, raw: bytes) -> bytes:
    """``raw`` with a few bytes changed, cut, or inserted."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(out) - 1)))
        if kind == "flip" and out:
            out[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del out[at : at + data.draw(st.integers(1, 64))]
        else:
            out[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


# The association request parser ---------------------------------------------------------


@sqlite_only
@FUZZ
@given(data=st.data())
def test_fuzzed_association_requests_end_cleanly(node: Node, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        sent = _mutated(data, VALID_RQ)
    else:
        body = data.draw(st.binary(max_size=300))
        sent = struct.pack(">BxI", data.draw(st.sampled_from([1, 1, 1, 4, 7, 9])), len(body))
        sent += body
    association, answer = converse(node, sent)
    types = _answers(answer)
    if association.info.outcome == "rejected":
        assert types == [0x03]


# The data-phase reader ----------------------------------------------------------------------

_CONTEXTS = st.sampled_from([1, 1, 1, 3, 5, 255])


@st.composite
def _pdus(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["command", "dataset", "raw", "control"]))
    if kind == "command":
        field = draw(st.sampled_from([0x0001, 0x0030, 0x0020, 0x0211, 0x8001]))
        payload = command(
            field,
            message_id=draw(st.integers(0, 0xFFFF)),
            sop_class=draw(st.sampled_from([CT, VERIFICATION, None, "1.2.3"])),
            sop_instance=draw(st.sampled_from([None, "1.2.3.4", "1.2.826.0.1.3680043.8.498.17"])),
            has_dataset=draw(st.booleans()),
        )
        if draw(st.booleans()):
            payload = payload[: draw(st.integers(0, len(payload)))]
        return p_data(pdv(draw(_CONTEXTS), payload, is_command=True, last=draw(st.booleans())))
    if kind == "dataset":
        payload = draw(st.binary(max_size=200))
        return p_data(pdv(draw(_CONTEXTS), payload, is_command=False, last=draw(st.booleans())))
    if kind == "raw":
        body = draw(st.binary(max_size=64))
        return struct.pack(">BxI", draw(st.integers(0, 10)), len(body)) + body
    return draw(st.sampled_from([RELEASE_RQ, ABORT]))


@sqlite_only
@FUZZ
@given(pdus=st.lists(_pdus(), max_size=8))
def test_fuzzed_data_phase_ends_cleanly(node: Node, pdus: list[bytes]) -> None:
    _, answer = converse(node, VALID_RQ + b"".join(pdus))
    assert _answers(answer)[0] == 0x02


# The header scan and the completeness check ----------------------------------------------


_UID_ROOT = "1.2.826.0.1.3680043.8.498."
_examples = itertools.count(1)


def _instance_uid(number: int) -> str:
    return _UID_ROOT + "9" + str(number).zfill(37)  # always 64 characters, no leading 0


@pytest.fixture(scope="module")
def ct_instance(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    ds = factory.ct_slice(generate_uid(), generate_uid(), 0, size=32)
    ds.SOPInstanceUID = _instance_uid(0)
    path = factory.write(ds, tmp_path_factory.mktemp("fuzz") / "ct.dcm")
    return str(ds.SOPInstanceUID), dataset_part(path)


@sqlite_only
@FUZZ
@given(data=st.data())
def test_fuzzed_datasets_are_answered_and_leave_nothing_unacknowledged(
    node: Node, ct_instance: tuple[str, bytes], data: st.DataObject
) -> None:
    # A new SOP Instance UID per example: a mutated Study UID must not turn an earlier
    # example's instance into a duplicate moved to another study, which this test's
    # accounting of stored files would not expect.
    template, dataset = ct_instance
    sop = _instance_uid(next(_examples))
    dataset = dataset.replace(template.encode(), sop.encode())
    mutated = _mutated(data, dataset[:2000]) + dataset[2000:]
    store = command(0x0001, sop_instance=sop)
    sent = VALID_RQ + p_data(pdv(1, store, is_command=True, last=True))
    sent += p_data(pdv(1, mutated, is_command=False, last=True)) + RELEASE_RQ
    association, answer = converse(node, sent)
    assert association.info.outcome == "released"
    assert _answers(answer) == [0x02, 0x04, 0x06]  # accepted, answered, released
    if _successes(answer):  # a mutation the node cannot see: stored exactly as sent
        [row] = [r for r in node.instances() if r.sop_instance_uid == sop]
        assert dataset_part(node.data_dir / row.file_path) == mutated


@FUZZ
@given(data=st.data())
def test_completeness_check_raises_only_incomplete_dataset(
    tmp_path: Path, ct_instance: tuple[str, bytes], data: st.DataObject
) -> None:
    _, dataset = ct_instance
    mutated = _mutated(data, dataset)
    syntax = data.draw(st.sampled_from([EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.2"]))
    path = tmp_path / "spooled"
    path.write_bytes(b"M" * 10 + mutated)
    with contextlib.suppress(IncompleteDataset):  # anything else fails the test
        check_complete(mutated[:HEAD_BYTES], len(mutated), syntax, path, 10)
