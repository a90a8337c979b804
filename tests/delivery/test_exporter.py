"""The export outbox on SQLite and PostgreSQL: idempotent rows, order, backoff, dead letters."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from triagenode.audit.events import AuditLog
from triagenode.config.settings import Settings
from triagenode.delivery.exporter import ExportOutbox, backoff_delay
from triagenode.domain import ExportState, Priority
from triagenode.store.db import Database
from triagenode.store.models import Export, utcnow

DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
    {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243},
]


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(
        destinations=DESTINATIONS,
        export={"max_attempts": 3, "backoff_initial_s": 10.0, "backoff_max_s": 25.0},
    )


@pytest.fixture
def outbox(db: Database, settings: Settings) -> ExportOutbox:
    return ExportOutbox(db, AuditLog(db, b"test-secret-0123456789abcdef"), settings)


def _enqueue(outbox: ExportOutbox, n: int, priority: int = Priority.routine) -> list[int]:
    data_dir = Path(outbox.settings.node.data_dir).absolute()
    return outbox.enqueue(
        None, f"1.2.3.{n}", f"2.25.{n}", data_dir / "results" / f"{n}.dcm", int(priority)
    )


def test_enqueue_makes_one_row_per_destination_once(outbox: ExportOutbox) -> None:
    ids = _enqueue(outbox, 1)
    assert len(ids) == 2 and len(set(ids)) == 2
    assert _enqueue(outbox, 1) == ids  # same SR again: the same rows, never new ones
    rows = outbox.list()
    assert sorted(r.id for r in rows) == sorted(ids)
    assert {r.destination for r in rows} == {"pacs", "archive"}
    assert all(r.state == ExportState.pending.value and r.attempts == 0 for r in rows)
    # Stored relative to the data folder, resolved back to the absolute file.
    assert rows[0].file_path == str(Path("results") / "1.dcm")
    assert outbox.absolute_path(rows[0]) == Path(outbox.settings.node.data_dir) / "results/1.dcm"


def test_enqueue_joins_the_callers_transaction(outbox: ExportOutbox, db: Database) -> None:
    with pytest.raises(RuntimeError), db.write_session() as session:
        _ids = outbox.enqueue(None, "1.2.3", "2.25.9", "results/9.dcm", 20, session=session)
        raise RuntimeError("the result could not be stored")
    assert outbox.list() == []
    with db.write_session() as session:
        ids = outbox.enqueue(None, "1.2.3", "2.25.9", "results/9.dcm", 20, session=session)
    assert [r.id for r in outbox.list()] == sorted(ids, reverse=True)


def test_due_orders_by_priority_then_age_and_skips_future_rows(outbox: ExportOutbox) -> None:
    routine = _enqueue(outbox, 1, Priority.routine)
    stat = _enqueue(outbox, 2, Priority.stat)
    later_routine = _enqueue(outbox, 3, Priority.routine)
    low = _enqueue(outbox, 4, Priority.low)
    due = outbox.due(now=utcnow() + timedelta(seconds=1))
    assert [r.id for r in due] == stat + routine + later_routine + low
    outbox.mark_failed(stat[0], "refused")
    assert stat[0] not in [r.id for r in outbox.due(now=utcnow() + timedelta(seconds=1))]
    claimed = outbox.claim(now=utcnow() + timedelta(seconds=1), limit=2)
    assert [r.id for r in claimed] == [stat[1], routine[0]]
    assert all(r.state == ExportState.sending.value for r in claimed)


def test_failures_back_off_exponentially_then_dead_then_retry(outbox: ExportOutbox) -> None:
    export_id = _enqueue(outbox, 1)[0]
    start = utcnow()
    first = outbox.mark_failed(export_id, "association rejected", now=start)
    assert first.state == ExportState.pending.value and first.attempts == 1
    assert 10.0 <= (first.next_attempt_at - start).total_seconds() <= 11.0 + 0.01
    second = outbox.mark_failed(export_id, "association rejected", now=start)
    assert 20.0 <= (second.next_attempt_at - start).total_seconds() <= 22.0 + 0.01
    third = outbox.mark_failed(export_id, "status 0xA700", now=start)
    assert third.state == ExportState.dead.value and third.attempts == 3
    assert third.last_error == "status 0xA700"
    assert outbox.due(now=start + timedelta(days=1)) != [] and export_id not in [
        r.id for r in outbox.due(now=start + timedelta(days=1))
    ]
    assert outbox.retry(export_id) is True
    row = outbox.get(export_id)
    assert row is not None and row.state == ExportState.pending.value and row.attempts == 0
    sent = outbox.mark_sent(export_id)
    assert sent.state == ExportState.sent.value and sent.sent_at is not None
    assert outbox.retry(export_id) is False  # a sent SR is never queued again
    assert outbox.retry(999999) is False


def test_backoff_is_capped() -> None:
    assert backoff_delay(1, 2.0, 300.0, jitter=0) == 2.0
    assert backoff_delay(4, 2.0, 300.0, jitter=0) == 16.0
    assert backoff_delay(30, 2.0, 300.0, jitter=0) == 300.0
    assert 300.0 <= backoff_delay(30, 2.0, 300.0) <= 330.0


def test_retry_all_dead_requeues_only_dead_rows(outbox: ExportOutbox) -> None:
    ids = _enqueue(outbox, 1) + _enqueue(outbox, 2)
    for export_id in ids[:3]:
        for _ in range(3):
            outbox.mark_failed(export_id, "refused")
    assert outbox.counts()["dead"] == 3
    assert outbox.retry_all_dead() == 3
    assert outbox.counts() == {"pending": 4, "sending": 0, "sent": 0, "dead": 0}
    assert outbox.retry_all_dead() == 0


def test_stale_sending_rows_come_back(outbox: ExportOutbox, db: Database, settings) -> None:
    ids = _enqueue(outbox, 1)
    claimed = outbox.claim()
    assert {r.id for r in claimed} == set(ids)
    assert outbox.claim() == []  # leased: nobody else takes them
    assert outbox.due(now=utcnow() + timedelta(seconds=outbox.lease_s)) == []
    after_lease = utcnow() + timedelta(seconds=outbox.lease_s + 2 * 30 + 1)
    assert {r.id for r in outbox.due(now=after_lease)} == set(ids)
    # A restart: a new outbox on the same database releases them at once.
    restarted = ExportOutbox(db, outbox.audit, settings)
    assert restarted.requeue_sending() == 2
    assert {r.state for r in restarted.list()} == {ExportState.pending.value}
    with db.session() as session:
        assert session.query(Export).count() == 2


def test_claim_serves_one_lane_at_a_time(outbox: ExportOutbox) -> None:
    routine = _enqueue(outbox, 1, Priority.routine)  # [pacs, archive]
    stat = _enqueue(outbox, 2, Priority.stat)
    now = utcnow() + timedelta(seconds=1)
    pacs = outbox.claim(now=now, destination="pacs")
    assert [r.id for r in pacs] == [stat[0], routine[0]]  # stat first within the lane
    assert outbox.next_due_at(destination="pacs") is not None  # leased, due at the lease end
    assert outbox.claim(now=now, not_in=["pacs", "archive"]) == []
    stray = outbox.claim(now=now, not_in=["pacs"])  # "archive" is no longer configured
    assert [r.id for r in stray] == [stat[1], routine[1]]
    assert outbox.claim(now=now, destination="archive") == []  # already claimed
    assert outbox.next_due_at(destination="elsewhere") is None
