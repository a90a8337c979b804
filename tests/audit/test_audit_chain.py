"""The audit hash chain: tampering of every kind is found, concurrent writers never fork."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text

from tests.audit_support import drop_append_only_guard
from tests.factory import PATIENT_ID
from triagenode.audit import AuditEventId, AuditLog, Outcome, load_or_create_secret, verify
from triagenode.audit.chain import GENESIS
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent

SECRET = b"chain-test-secret-0123456789"


def _fill(log: AuditLog, n: int = 6) -> None:
    for i in range(n):
        log.record(
            AuditEventId.instances_transferred,
            event_type="received",
            actor="MODALITY",
            actor_address="127.0.0.1",
            study_uid=f"1.2.3.{i}",
            patient_id=PATIENT_ID,
            details={"instances": i, "bytes": 1024 * i},
        )


def _sql(db: Database, *statements: str) -> None:
    with db.engine.begin() as connection:
        drop_append_only_guard(connection)
        for statement in statements:
            connection.execute(text(statement))


def test_clean_chain_vouches_for_every_row(db: Database) -> None:
    log = AuditLog(db, SECRET)
    assert verify(db, SECRET).ok and verify(db, SECRET).count == 0
    _fill(log)
    report = verify(db, SECRET)
    assert report.ok, report.problem
    assert (report.count, report.vouched, report.head_seq) == (6, 6, 6)
    assert report.first_at is not None and report.last_at >= report.first_at
    with db.session() as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.row_hash for a, b in itertools.pairwise(rows))
    # The wrong key vouches for nothing.
    wrong = verify(db, b"another-secret-0123456789")
    assert not wrong.ok and wrong.vouched == 0


def test_patient_id_is_never_stored(db: Database) -> None:
    log = AuditLog(db, SECRET)
    _fill(log, 2)
    with db.engine.connect() as connection:
        dump = repr(connection.execute(text("SELECT * FROM audit_events")).all())
    assert PATIENT_ID not in dump
    assert log.patient_ref(PATIENT_ID) in dump


def test_events_in_a_caller_session_join_the_chain(db: Database) -> None:
    log = AuditLog(db, SECRET)
    _fill(log, 2)
    with db.write_session() as session:
        log.record(AuditEventId.query, actor="a", session=session)
        log.record(AuditEventId.query, actor="b", session=session)
    with pytest.raises(RuntimeError), db.write_session() as session:
        log.record(AuditEventId.query, actor="rolled-back", session=session)
        raise RuntimeError("the caller's transaction fails")
    report = verify(db, SECRET)
    assert report.ok and report.count == 4


@pytest.mark.parametrize(
    ("tamper", "kind", "seq"),
    [
        (["UPDATE audit_events SET actor = 'mallory' WHERE seq = 3"], "edited", 3),
        (["UPDATE audit_events SET outcome = 0, details = NULL WHERE seq = 5"], "edited", 5),
        (["DELETE FROM audit_events WHERE seq = 3"], "deleted", 4),
        (["DELETE FROM audit_events WHERE seq IN (1, 2)"], "deleted", 3),
        (
            [  # delete row 3 and renumber the rest to hide the gap
                "DELETE FROM audit_events WHERE seq = 3",
                "UPDATE audit_events SET seq = seq + 1000 WHERE seq > 3",
                "UPDATE audit_events SET seq = seq - 1001 WHERE seq > 1000",
            ],
            "deleted",
            3,
        ),
        (
            [  # make room at 3, then forge a row linked to row 2
                "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 3",
                "UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000",
                "INSERT INTO audit_events (seq, at, event_id, action, outcome, actor, prev_hash,"
                " row_hash) SELECT 3, at, '110112', 'E', 0, 'mallory', row_hash, '"
                + "ab" * 32
                + "' FROM audit_events WHERE seq = 2",
            ],
            "inserted",
            3,
        ),
        (
            [
                "INSERT INTO audit_events (seq, at, event_id, action, outcome, actor, row_hash)"
                " SELECT 7, at, '110112', 'E', 0, 'mallory', '" + "cd" * 32 + "'"
                " FROM audit_events WHERE seq = 6"
            ],
            "inserted",
            7,
        ),
        (
            [
                "INSERT INTO audit_events (at, event_id, action, outcome, actor)"
                " SELECT at, '110112', 'E', 0, 'mallory' FROM audit_events WHERE seq = 6"
            ],
            "inserted",
            None,
        ),
        (
            [  # swap rows 3 and 4
                "UPDATE audit_events SET seq = -1 WHERE seq = 3",
                "UPDATE audit_events SET seq = 3 WHERE seq = 4",
                "UPDATE audit_events SET seq = 4 WHERE seq = -1",
            ],
            "reordered",
            3,
        ),
    ],
    ids=[
        "edited",
        "edited-outcome",
        "deleted",
        "deleted-first",
        "deleted-renumbered",
        "inserted",
        "inserted-at-end",
        "inserted-without-seq",
        "swapped",
    ],
)
def test_tampering_is_found(
    db: Database, tamper: list[str], kind: str, seq: int | None, request: pytest.FixtureRequest
) -> None:
    _fill(AuditLog(db, SECRET))
    _sql(db, *tamper)
    report = verify(db, SECRET)
    assert not report.ok
    assert report.problem is not None
    assert (report.problem.kind, report.problem.seq) == (kind, seq), report.problem
    # Everything before the break is still vouched for.
    assert report.vouched == {"deleted-first": 0, "edited-outcome": 4}.get(
        request.node.callspec.id.split("-", 1)[1], 6 if kind == "inserted" and seq != 3 else 2
    )


def _hammer(url: str, writer: int, count: int) -> None:
    """Append ``count`` events through a Database of its own (thread or process)."""
    database = Database(url)
    try:
        log = AuditLog(database, SECRET)
        for i in range(count):
            log.record(AuditEventId.query, actor=f"writer-{writer}", details={"i": i})
    finally:
        database.dispose()


def test_concurrent_threads_keep_one_chain(db: Database) -> None:
    shared = AuditLog(db, SECRET)
    threads = [
        threading.Thread(
            target=lambda w=w: [shared.record(AuditEventId.query, actor=f"t{w}") for _ in range(15)]
        )
        for w in range(3)
    ]
    # Separate engines as well: another process's connection pool behaves the same way.
    threads += [threading.Thread(target=_hammer, args=(db.url, 10 + w, 15)) for w in range(2)]

    def in_caller_sessions(writer: int) -> None:
        # Callers that record inside their own (not write-locked) transaction.
        for _ in range(15):
            with db.session() as session:
                shared.record(AuditEventId.query, actor=f"s{writer}", session=session)

    threads += [threading.Thread(target=in_caller_sessions, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    report = verify(db, SECRET)
    assert report.ok, report.problem
    assert report.count == 105 and report.head_seq == 105


@pytest.mark.postgres
def test_concurrent_processes_keep_one_chain(postgres_url: str) -> None:
    from triagenode.store import migrate

    database = Database(postgres_url)
    migrate.upgrade(database)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hammer, args=(postgres_url, w, 20)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    report = verify(database, SECRET)
    database.dispose()
    assert report.ok, report.problem
    assert report.count == 60


def test_outcome_and_details_round_trip(db: Database) -> None:
    log = AuditLog(db, SECRET)
    log.record(
        AuditEventId.security_alert,
        event_type="bad_token",
        outcome=Outcome.minor_failure,
        details={"float": 0.1, "nested": {"b": [1, 2], "a": None}, "text": "naïve"},
    )
    assert verify(db, SECRET).ok


def test_secret_file_is_created_once_with_mode_0600(make_settings, tmp_path: Path) -> None:
    settings = make_settings(audit={"secret": None})
    first = load_or_create_secret(settings)
    key_file = settings.node.data_dir / "audit.key"
    assert oct(os.stat(key_file).st_mode & 0o777) == "0o600"
    assert len(first) == 64
    assert load_or_create_secret(settings) == first
    configured = make_settings()
    assert load_or_create_secret(configured) == b"test-secret-0123456789abcdef"


def test_anchor_catches_deleted_newest_rows(db: Database) -> None:
    log = AuditLog(db, SECRET)
    _fill(log)
    earlier = verify(db, SECRET)
    anchor = (earlier.head_seq, earlier.head_hash)
    log.record(AuditEventId.query, actor="later")
    assert verify(db, SECRET, anchor).ok
    _sql(db, "DELETE FROM audit_events WHERE seq >= 6")
    assert verify(db, SECRET).ok  # the chain alone cannot tell
    truncated = verify(db, SECRET, anchor)
    assert not truncated.ok and truncated.problem.kind == "deleted"
    assert truncated.problem.seq == 6
    assert not verify(db, SECRET, (3, "0" * 64)).ok
