"""The loop that turns quiet studies into queued jobs.

Every tick it asks the :class:`~triagenode.pipeline.tracker.StudyTracker` which studies
became stable, and queues a classification job for each at the study's priority. Both steps
read and write only the database, so a restart resumes them: a study that became stable
before a crash but was never queued is found again by :meth:`StudyScheduler.requeue_orphans`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select

from triagenode.domain import StudyState
from triagenode.pipeline.queue import JobQueue
from triagenode.pipeline.tracker import StudyTracker
from triagenode.store.db import Database
from triagenode.store.models import Study, utcnow
from triagenode.store.study_state import set_study_state

__all__ = ["StudyScheduler"]

log = logging.getLogger(__name__)


class StudyScheduler:
    def __init__(
        self,
        db: Database,
        tracker: StudyTracker,
        queue: JobQueue,
        *,
        on_queued: Callable[[], None] | None = None,
        interval_s: float = 0.2,
    ) -> None:
        self.db = db
        self.tracker = tracker
        self.queue = queue
        self.on_queued = on_queued
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> int:
        """One pass: stable studies (new ones and any left over) get a job. Returns how many."""
        self.tracker.poll()
        queued = 0
        with self.db.session() as session:
            waiting = session.execute(
                select(Study.id, Study.priority, Study.run).where(
                    Study.state == StudyState.stable.value
                )
            ).all()
        for study_id, priority, run in waiting:
            with self.db.write_session() as session:
                self.queue.enqueue(study_id, priority, run, session=session)
                set_study_state(session, study_id, StudyState.queued, None)
            queued += 1
        if queued:
            log.info("queued %d stable stud%s", queued, "y" if queued == 1 else "ies")
            if self.on_queued is not None:
                self.on_queued()
        return queued

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _pause(self) -> float:
        """Seconds until the next tick: the tick interval, or sooner when a study's quiet
        period ends before it (a stat study should not wait for the tick)."""
        due = self.tracker.next_stable_at
        if due is None:
            return self.interval_s
        return min(self.interval_s, max(0.005, (due - utcnow()).total_seconds()))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the database may be briefly away; try again next tick
                log.exception("scheduler tick failed")
            self._stop.wait(self._pause())
