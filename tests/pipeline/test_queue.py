"""The persistent job queue: order, aging, idempotence, leases, retries, concurrent claims."""

from __future__ import annotations

import multiprocessing
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select

from triagenode.config.settings import Settings
from triagenode.domain import JobState, Priority, StudyState
from triagenode.pipeline.queue import JobQueue, effective_priority
from triagenode.store.db import Database
from triagenode.store.models import Job, Study, StudyEvent

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=timezone.utc)


def add_studies(db: Database, count: int) -> list[int]:
    with db.session() as session:
        studies = [
            Study(study_uid=f"1.2.826.0.1.3680043.10.1.{i}", state=StudyState.stable.value)
            for i in range(count)
        ]
        session.add_all(studies)
        session.flush()
        return [s.id for s in studies]


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(
        triage={"aging_after_s": 600, "lease_s": 60, "retry_backoff_s": 10},
        study={"max_attempts": 3},
    )


@pytest.fixture
def queue(db: Database, settings: Settings) -> JobQueue:
    return JobQueue(db, settings)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def drain(queue: JobQueue, now: datetime) -> list[int]:
    claimed = []
    while (job := queue.claim("w", now=now)) is not None:
        claimed.append(job.id)
        assert queue.complete(job.id, "w")
    return claimed


def test_highest_priority_first_and_fifo_within(db: Database, queue: JobQueue) -> None:
    ids = add_studies(db, 6)
    plan = [Priority.routine, Priority.low, Priority.stat, Priority.routine, Priority.urgent]
    pairs = enumerate(zip(ids[:5], plan, strict=True))
    jobs = [queue.enqueue(s, p, 1, now=at(i)) for i, (s, p) in pairs]
    jobs.append(queue.enqueue(ids[5], "stat", 1, now=at(5)))
    assert drain(queue, at(10)) == [jobs[2], jobs[5], jobs[4], jobs[0], jobs[3], jobs[1]]


def test_claimed_job_carries_the_study(db: Database, queue: JobQueue) -> None:
    [study] = add_studies(db, 1)
    job_id = queue.enqueue(study, 40, 3, kind="classify", now=at(0))
    job = queue.claim("worker-a", now=at(1))
    assert job is not None
    assert (job.id, job.study_id, job.run, job.kind) == (job_id, study, 3, "classify")
    assert job.study_uid == "1.2.826.0.1.3680043.10.1.0"
    assert job.priority is Priority.stat and job.attempts == 1
    assert job.lease_owner == "worker-a" and job.lease_expires_at == at(61)


def test_aging_promotes_one_level_per_period(db: Database, queue: JobQueue) -> None:
    old_routine, urgent, old_low, stat = add_studies(db, 4)
    low_job = queue.enqueue(old_low, Priority.low, 1, now=at(0))
    routine_job = queue.enqueue(old_routine, Priority.routine, 1, now=at(1000))
    urgent_job = queue.enqueue(urgent, Priority.urgent, 1, now=at(1500))
    # At 1650 s: low waited 2 periods (-> urgent), routine 1 period (-> urgent): all three
    # are urgent now, so the oldest goes first.
    job = queue.claim("w", now=at(1650))
    assert job is not None and job.id == low_job
    assert job.effective_priority is Priority.urgent
    stat_job = queue.enqueue(stat, Priority.stat, 1, now=at(1700))
    assert [queue.claim("w", now=at(1701)).id for _ in range(3)] == [  # type: ignore[union-attr]
        stat_job,
        routine_job,
        urgent_job,
    ]


def test_aging_is_capped_at_stat() -> None:
    assert effective_priority(Priority.low, at(0), at(10_000), 60) is Priority.stat
    assert effective_priority(Priority.routine, at(0), at(59), 60) is Priority.routine
    assert effective_priority(Priority.routine, at(0), at(60), 60) is Priority.urgent


def test_aged_job_beats_newer_stat_of_the_same_effective_level(
    db: Database, queue: JobQueue
) -> None:
    low, stat = add_studies(db, 2)
    low_job = queue.enqueue(low, Priority.low, 1, now=at(0))
    queue.enqueue(stat, Priority.stat, 1, now=at(3000))
    job = queue.claim("w", now=at(3001))
    assert job is not None and job.id == low_job and job.effective_priority is Priority.stat


def test_enqueue_is_idempotent_per_study_run_kind(db: Database, queue: JobQueue) -> None:
    study, other = add_studies(db, 2)
    first = queue.enqueue(study, Priority.routine, 1)
    assert queue.enqueue(study, Priority.low, 1) == first  # never lowered
    assert queue.enqueue(study, Priority.urgent, 1) == first  # raised
    assert queue.depth()[Priority.urgent] == 1
    assert queue.enqueue(study, Priority.routine, 2) != first  # a new run is new work
    assert queue.enqueue(study, Priority.routine, 1, kind="export") != first
    assert queue.enqueue(other, Priority.routine, 1) != first
    job = queue.claim("w")
    assert job is not None and job.id == first
    assert queue.enqueue(study, Priority.stat, 1) == first  # leased: still the same job
    assert queue.complete(first, "w")
    assert queue.enqueue(study, Priority.routine, 1) != first  # done: may be queued again


def test_enqueue_joins_the_callers_transaction(db: Database, queue: JobQueue) -> None:
    [study] = add_studies(db, 1)
    with pytest.raises(RuntimeError), db.write_session() as session:
        queue.enqueue(study, Priority.stat, 1, session=session)
        raise RuntimeError("the caller's transaction fails")
    assert queue.depth()[Priority.stat] == 0
    with db.write_session() as session:
        queue.enqueue(study, Priority.stat, 1, session=session)
    assert queue.depth()[Priority.stat] == 1


def test_expired_lease_is_claimed_again_with_attempts_counted(
    db: Database, queue: JobQueue
) -> None:
    [study] = add_studies(db, 1)
    job_id = queue.enqueue(study, Priority.routine, 1, now=at(0))
    assert queue.claim("dead-worker", now=at(1)) is not None
    assert queue.claim("w2", now=at(30)) is None  # still leased
    again = queue.claim("w2", now=at(62))  # lease_s = 60 after the claim at 1
    assert again is not None and again.id == job_id and again.attempts == 2
    assert not queue.complete(job_id, "dead-worker")  # lost its lease: changes nothing
    assert not queue.heartbeat(job_id, "dead-worker")
    assert queue.complete(job_id, "w2")
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "done" and "expired" in (job.last_error or "")


def test_heartbeat_extends_the_lease(db: Database, queue: JobQueue) -> None:
    [study] = add_studies(db, 1)
    queue.enqueue(study, Priority.routine, 1, now=at(0))
    job = queue.claim("w1", now=at(0))
    assert job is not None
    assert queue.heartbeat(job.id, "w1", now=at(50))  # now leased until 110
    assert queue.claim("w2", now=at(100)) is None
    assert queue.claim("w2", now=at(111)) is not None


def test_lease_expiring_on_every_attempt_fails_job_and_study(db: Database, queue: JobQueue) -> None:
    [study] = add_studies(db, 1)
    job_id = queue.enqueue(study, Priority.routine, 1, now=at(0))
    for attempt in range(3):  # study.max_attempts = 3 claims, each worker dies
        job = queue.claim(f"w{attempt}", now=at(100 * attempt))
        assert job is not None and job.attempts == attempt + 1
    assert queue.claim("w9", now=at(1000)) is None
    with db.session() as session:
        job_row = session.get(Job, job_id)
        assert job_row is not None and job_row.state == "failed"
        study_row = session.get(Study, study)
        assert study_row is not None and study_row.state == StudyState.failed.value
        events = session.scalars(select(StudyEvent).where(StudyEvent.study_id == study)).all()
        assert events[-1].to_state == "failed" and "expired" in (events[-1].reason or "")


def test_fail_retries_with_backoff_then_fails(db: Database, queue: JobQueue) -> None:
    [study] = add_studies(db, 1)
    job_id = queue.enqueue(study, Priority.urgent, 1, now=at(0))
    job = queue.claim("w", now=at(0))
    assert job is not None
    assert queue.fail(job_id, "w", "decoder crashed", retry=True, now=at(0)) == "pending"
    assert queue.claim("w", now=at(9)) is None  # back-off 10 s
    assert queue.claim("w", now=at(10)) is not None
    assert queue.fail(job_id, "w", "decoder crashed", retry=True, now=at(10)) == "pending"
    assert queue.claim("w", now=at(29)) is None  # back-off doubled: 20 s
    assert queue.claim("w", now=at(30)) is not None
    state = queue.fail(job_id, "w", "decoder crashed", retry=True, now=at(30))
    assert state is JobState.failed and state == "failed"
    assert queue.claim("w", now=at(10_000)) is None
    with db.session() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.attempts == 3 and row.last_error == "decoder crashed"


def test_fail_without_retry_is_final_and_needs_the_lease(db: Database, queue: JobQueue) -> None:
    [study] = add_studies(db, 1)
    job_id = queue.enqueue(study, Priority.routine, 1)
    assert queue.claim("w") is not None
    assert queue.fail(job_id, "intruder", "x", retry=False) == "leased"  # not its job
    assert queue.fail(job_id, "w", "not an image", retry=False) == "failed"


def test_depth_and_pending_listing(db: Database, queue: JobQueue) -> None:
    a, b, c = add_studies(db, 3)
    queue.enqueue(a, Priority.routine, 1, now=at(0))
    queue.enqueue(b, Priority.stat, 1, now=at(1))
    queue.enqueue(c, Priority.routine, 1, now=at(2))
    assert queue.depth() == {
        Priority.low: 0,
        Priority.routine: 2,
        Priority.urgent: 0,
        Priority.stat: 1,
    }
    listed = queue.pending(now=at(3))
    assert [j.study_id for j in listed] == [b, a, c]
    assert listed[0].study_uid.endswith(".1") and listed[0].state is JobState.pending
    assert queue.claim("w", now=at(3)) is not None
    assert queue.leased() == 1 and sum(queue.depth().values()) == 2


def test_cancel_leaves_leased_jobs(db: Database, queue: JobQueue) -> None:
    a, b = add_studies(db, 2)
    queue.enqueue(a, Priority.stat, 1)
    assert queue.claim("w") is not None
    queue.enqueue(a, Priority.routine, 2)
    queue.enqueue(b, Priority.routine, 1)
    assert queue.cancel(a, "superseded") == 1
    assert [j.study_id for j in queue.pending()] == [b]


def _claim_all(queue: JobQueue, worker: str, out: list[int]) -> None:
    while (job := queue.claim(worker)) is not None:
        out.append(job.id)
        assert queue.complete(job.id, worker)


def test_threads_never_claim_the_same_job(db: Database, settings: Settings) -> None:
    studies = add_studies(db, 40)
    queue = JobQueue(db, settings)
    for i, study in enumerate(studies):
        queue.enqueue(study, list(Priority)[i % 4], 1)
    results: list[list[int]] = [[] for _ in range(4)]
    threads = [
        threading.Thread(target=_claim_all, args=(queue, f"t{i}", results[i])) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    claimed = [job for part in results for job in part]
    assert len(claimed) == 40 and len(set(claimed)) == 40


def _claim_in_process(url: str, worker: str, start: Any) -> list[int]:
    db = Database(url)
    queue = JobQueue(db, Settings())
    out: list[int] = []
    start.wait(30)
    _claim_all(queue, worker, out)
    db.dispose()
    return out


@pytest.mark.postgres
@pytest.mark.slow
def test_processes_never_claim_the_same_job_on_postgres(postgres_url: str) -> None:
    from triagenode.store import migrate

    db = Database(postgres_url)
    migrate.upgrade(db)
    studies = add_studies(db, 60)
    queue = JobQueue(db, Settings())
    for i, study in enumerate(studies):
        queue.enqueue(study, list(Priority)[i % 4], 1)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(3) as pool:
        start = manager.Event()
        pending = [
            pool.apply_async(_claim_in_process, (postgres_url, f"p{i}", start)) for i in range(3)
        ]
        start.set()
        parts = [p.get(120) for p in pending]
    claimed = [job for part in parts for job in part]
    assert len(claimed) == 60 and len(set(claimed)) == 60
    assert sum(1 for part in parts if part) >= 2  # the work really was shared
    with db.session() as session:
        states = session.scalars(select(Job.state)).all()
    assert set(states) == {"done"}
    db.dispose()


def test_concurrent_enqueue_of_one_job_makes_one_row(db: Database, settings: Settings) -> None:
    [study] = add_studies(db, 1)
    queue = JobQueue(db, settings)
    ids: list[int] = []
    barrier = threading.Barrier(4)

    def enqueue() -> None:
        barrier.wait(10)
        ids.append(queue.enqueue(study, Priority.routine, 1))

    threads = [threading.Thread(target=enqueue) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(ids) == 4 and len(set(ids)) == 1
    with db.session() as session:
        assert len(session.scalars(select(Job.id)).all()) == 1


def test_enqueue_race_lost_to_another_node_returns_its_job(
    db: Database, queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    [study] = add_studies(db, 1)
    first = queue.enqueue(study, Priority.routine, 1)
    real_active = JobQueue._active
    calls = []

    def blind_once(session, study_id, run, kind):  # type: ignore[no-untyped-def]
        calls.append(1)
        # The first look misses the job, as if the other node had not committed yet.
        return None if len(calls) == 1 else real_active(session, study_id, run, kind)

    monkeypatch.setattr(JobQueue, "_active", staticmethod(blind_once))
    assert queue.enqueue(study, Priority.routine, 1) == first
    assert len(calls) == 2
    with db.session() as session:
        assert len(session.scalars(select(Job.id)).all()) == 1


def test_keep_alive_renews_the_lease_while_working(db: Database, make_settings) -> None:  # type: ignore[no-untyped-def]
    from tests.peers import wait_for
    from triagenode.store.models import utcnow

    queue = JobQueue(db, make_settings(triage={"lease_s": 0.6}))
    [study] = add_studies(db, 1)
    queue.enqueue(study, Priority.routine, 1)
    job = queue.claim("slow-worker")
    assert job is not None
    with queue.keep_alive(job.id, "slow-worker", interval_s=0.1) as lost:
        wait_for(lambda: utcnow() > job.lease_expires_at + timedelta(seconds=0.3), timeout=5)
        assert queue.claim("other") is None  # the first lease would have lapsed by now
        assert not lost.is_set()
    assert queue.complete(job.id, "slow-worker")


def test_keep_alive_reports_a_lost_lease(db: Database, queue: JobQueue) -> None:
    from tests.peers import wait_for

    [study] = add_studies(db, 1)
    queue.enqueue(study, Priority.routine, 1, now=at(0))
    job = queue.claim("w1", now=at(0))
    assert job is not None
    assert queue.claim("w2", now=at(1000)) is not None  # w1's lease lapsed long ago
    with queue.keep_alive(job.id, "w1", interval_s=0.05) as lost:
        wait_for(lost.is_set, timeout=5, what="lost lease noticed")


_DYING_WORKER = """
import sys
from triagenode.config.settings import Settings
from triagenode.pipeline.queue import JobQueue
from triagenode.store.db import Database

queue = JobQueue(Database(sys.argv[1]), Settings(triage={"lease_s": 1.0}))
job = queue.claim("doomed-worker")
print(job.id, flush=True)
sys.stdin.read()  # "working" until killed
"""


def test_worker_killed_with_sigkill_leaves_a_lease_that_expires(
    db: Database, settings: Settings
) -> None:
    import signal
    import subprocess
    import sys

    from tests.peers import wait_for

    [study] = add_studies(db, 1)
    queue = JobQueue(db, settings)
    job_id = queue.enqueue(study, Priority.stat, 1)
    worker = subprocess.Popen(
        [sys.executable, "-c", _DYING_WORKER, db.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert int(worker.stdout.readline()) == job_id
        assert queue.claim("survivor") is None  # leased by the live worker
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    again = wait_for(lambda: queue.claim("survivor"), timeout=10, what="the lease to lapse")
    assert again.id == job_id and again.attempts == 2
    assert queue.complete(job_id, "survivor")
    with db.session() as session:
        row = session.get(Job, job_id)
        assert row is not None and row.state == "done"
        assert row.last_error == "lease of doomed-worker expired (attempt 1)"
