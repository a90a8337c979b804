"""Workers: claim a study's job, classify it, write its SR, queue the exports.

Each step is a function call or a database row, so a worker killed at any point leaves a
lease that expires and a job that another worker (or the restarted node) completes. SR UIDs
derive from (study, model, run): redoing the same work rewrites the same SR, never a second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from sqlalchemy import select

from triagenode.audit.events import AuditEventId, AuditLog
from triagenode.config.settings import Settings
from triagenode.domain import Priority, StudyResult, StudyState
from triagenode.errors import TriageNodeError
from triagenode.inference.classifier import NoUsableImagesError, ZeroShotClassifier
from triagenode.inference.select import (
    InstanceRecord,
    Selection,
    SeriesPreference,
    choose_images,
)
from triagenode.metrics import STUDIES_PROCESSED
from triagenode.pipeline.notify import CriticalFindingNotifier
from triagenode.pipeline.queue import ClaimedJob, JobQueue
from triagenode.reports.result_json import result_to_json
from triagenode.reports.sr import build_sr, write_sr
from triagenode.scp.exporter import ExportOutbox
from triagenode.store.db import Database
from triagenode.store.models import Instance, Result, Series, Study
from triagenode.store.study_state import set_study_state

__all__ = ["StudyProcessor", "WorkerPool"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _StudySnapshot:
    study_id: int
    study_uid: str
    run: int
    priority: Priority
    priority_rule: str | None
    label_set: str | None
    triage_inputs: dict[str, str]
    records: list[InstanceRecord]


class StudyProcessor:
    """Turns one claimed job into a result, an SR on disk and export rows."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        audit: AuditLog,
        classifier: ZeroShotClassifier,
        outbox: ExportOutbox,
        notifier: CriticalFindingNotifier | None = None,
        on_exports_queued: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_exports_queued = on_exports_queued
        self.db = db
        self.audit = audit
        self.classifier = classifier
        self.outbox = outbox
        self.notifier = notifier

    def _snapshot(self, study_id: int) -> _StudySnapshot:
        data_dir = self.settings.node.data_dir
        with self.db.session() as session:
            study = session.get(Study, study_id)
            if study is None:
                raise TriageNodeError(f"study id {study_id} no longer exists")
            rows = session.execute(
                select(Instance, Series)
                .join(Series, Instance.series_id == Series.id)
                .where(Series.study_id == study_id)
            ).all()
            records = [
                InstanceRecord(
                    sop_class_uid=instance.sop_class_uid,
                    sop_instance_uid=instance.sop_instance_uid,
                    series_uid=series.series_uid,
                    modality=series.modality,
                    instance_number=instance.instance_number,
                    number_of_frames=instance.number_of_frames or 1,
                    path=data_dir / instance.file_path,
                )
                for instance, series in rows
            ]
            return _StudySnapshot(
                study_id=study.id,
                study_uid=study.study_uid,
                run=study.run,
                priority=Priority(study.priority),
                priority_rule=study.priority_rule,
                label_set=study.label_set,
                triage_inputs=dict(study.triage_inputs or {}),
                records=records,
            )

    def _set_state(self, snapshot: _StudySnapshot, state: StudyState, reason: str) -> None:
        with self.db.write_session() as session:
            set_study_state(session, snapshot.study_id, state, reason)
            if state is StudyState.not_applicable:
                self.audit.record(
                    AuditEventId.instances_accessed,
                    event_type="not-applicable",
                    study_uid=snapshot.study_uid,
                    actor=self.settings.scp.ae_title,
                    details={"reason": reason, "run": snapshot.run},
                    session=session,
                )
        STUDIES_PROCESSED.labels(state.value, snapshot.priority.name).inc()

    def process(self, job: ClaimedJob) -> StudyResult | None:
        """Classify the job's study and queue its SR.

        Returns None when there was nothing to classify: the study is then marked
        ``ignored`` (no images) or ``not_applicable`` (images, but no label set is made for
        them), with the reason; neither is a failure, and neither gets an SR.
        """
        snapshot = self._snapshot(job.study_id)
        with self.db.write_session() as session:
            set_study_state(session, snapshot.study_id, StudyState.processing, "worker claimed job")
        label_set: str | None
        if snapshot.label_set:
            label_set, why = snapshot.label_set, f"set by triage rule {snapshot.priority_rule!r}"
        else:
            choice = self.classifier.labels.explain_choice(snapshot.triage_inputs)
            label_set, why = choice.label_set, choice.reason
        selection = choose_images(
            snapshot.records,
            slices_per_series=self.settings.model.slices_per_series,
            max_images=self.settings.model.max_images_per_study,
            prefer=self._preference(label_set),
        )
        if not selection.images:
            reason = "no classifiable images" + _skipped_note(selection)
            self._set_state(snapshot, StudyState.ignored, reason)
            log.info("study %s: nothing to classify", snapshot.study_uid)
            return None
        if label_set is None:
            self._set_state(snapshot, StudyState.not_applicable, why)
            log.info("study %s: not classified: %s", snapshot.study_uid, why)
            return None

        started = time.perf_counter()
        result = self.classifier.classify_study(
            snapshot.study_uid,
            [(image.ref, image.path) for image in selection.images],
            label_set=label_set,
            priority=snapshot.priority,
            priority_rule=snapshot.priority_rule,
            label_set_reason=why,
            series_skipped=selection.skipped,
        )
        if result.critical and result.priority < Priority.stat:
            escalated = ", ".join(f.name for f in result.findings if f.escalates)
            result = replace(
                result, priority=Priority.stat, priority_rule=f"critical finding: {escalated}"
            )
        classify_ms = (time.perf_counter() - started) * 1000
        self._report(snapshot, result, selection.images[0].path)
        log.info(
            "study %s classified: label_set=%s top=%s critical=%s flagged=%s images=%d "
            "failed=%d %.0f ms%s",
            snapshot.study_uid,
            result.label_set,
            result.top_finding.name if result.top_finding else None,
            result.critical,
            result.flagged,
            len(result.images_used),
            len(result.images_failed),
            classify_ms,
            " [DEMO, NOT FOR CLINICAL USE]" if result.model.is_demo else "",
        )
        return result

    def _preference(self, label_set: str | None) -> SeriesPreference | None:
        """What the label set's diagnostic series looks like, for image selection."""
        if label_set is None:
            return None
        rules = [r for r in self.classifier.labels.domains if r.label_set == label_set]
        chosen = self.classifier.label_set(label_set)
        return SeriesPreference(
            modalities=tuple(m for r in rules for m in r.modalities),
            body_parts=tuple(b for r in rules for b in r.body_parts),
            keywords=tuple(chosen.series_keywords),
        )

    def _predecessor(self, snapshot: _StudySnapshot) -> list[pydicom.Dataset]:
        """The newest SR of an earlier run of this study, which the new one supersedes."""
        with self.db.session() as session:
            earlier = session.execute(
                select(Result.sr_path)
                .where(
                    Result.study_id == snapshot.study_id,
                    Result.run < snapshot.run,
                    Result.sr_path.is_not(None),
                )
                .order_by(Result.run.desc(), Result.id.desc())
                .limit(1)
            ).scalar_one_or_none()
        if earlier is None:
            return []
        try:
            return [pydicom.dcmread(self.settings.node.data_dir / earlier, stop_before_pixels=True)]
        except (OSError, ValueError) as exc:
            # the result row stays the record of it; the new SR is still written
            log.warning("study %s: earlier SR unreadable (%s)", snapshot.study_uid, exc)
            return []

    def _report(self, snapshot: _StudySnapshot, result: StudyResult, source_path: Path) -> None:
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
        predecessors = self._predecessor(snapshot)
        sr = build_sr(result, source, self.settings, run=snapshot.run, predecessors=predecessors)
        sr_path = write_sr(sr, self.settings, result=result)
        relative = sr_path.relative_to(self.settings.node.data_dir)
        priority = int(max(snapshot.priority, result.priority))
        supersedes = str(predecessors[0].SOPInstanceUID) if predecessors else None
        with self.db.write_session() as session:
            row = session.execute(
                select(Result).where(
                    Result.study_id == snapshot.study_id,
                    Result.run == snapshot.run,
                    Result.weights_sha256 == result.model.weights_sha256,
                )
            ).scalar_one_or_none()
            if row is None:
                row = Result(study_id=snapshot.study_id, run=snapshot.run)
                session.add(row)
            row.model_name = result.model.name
            row.model_version = result.model.version
            row.weights_sha256 = result.model.weights_sha256
            row.is_demo = result.model.is_demo
            row.backend = result.backend
            row.label_set = result.label_set
            row.top_finding = result.top_finding.name if result.top_finding else None
            row.critical = result.critical
            row.findings = result_to_json(
                result,
                sr_sop_instance_uid=sr.SOPInstanceUID,
                sr_series_uid=sr.SeriesInstanceUID,
                supersedes=supersedes,
            )
            row.sr_sop_instance_uid = sr.SOPInstanceUID
            row.sr_series_uid = sr.SeriesInstanceUID
            row.sr_path = str(relative)
            session.flush()
            study = session.get(Study, snapshot.study_id)
            assert study is not None
            study.critical = result.critical
            if result.critical and study.priority < Priority.stat:
                study.priority = int(Priority.stat)
                study.priority_rule = result.priority_rule
            self.outbox.enqueue(
                row.id,
                snapshot.study_uid,
                sr.SOPInstanceUID,
                relative,
                priority=priority,
                session=session,
            )
            set_study_state(session, snapshot.study_id, StudyState.reported, None)
            if result.flagged:
                self.audit.record(
                    AuditEventId.export,
                    event_type="critical-finding" if result.critical else "critical-flagged",
                    study_uid=snapshot.study_uid,
                    patient_ref=study.patient_ref,
                    actor=self.settings.scp.ae_title,
                    details={
                        "findings": [f.name for f in result.findings if f.critical],
                        "escalated": result.critical,
                        "sr_uid": sr.SOPInstanceUID,
                    },
                    session=session,
                )
        STUDIES_PROCESSED.labels("reported", snapshot.priority.name).inc()
        if self.on_exports_queued is not None:
            self.on_exports_queued()
        if result.critical and self.notifier is not None:
            self.notifier.notify(result, sr_uid=sr.SOPInstanceUID)


def _skipped_note(selection: Selection) -> str:
    if not selection.skipped:
        return ""
    reasons = sorted({s.reason for s in selection.skipped})
    return f" (left out: {'; '.join(reasons)})"


class WorkerPool:
    """Threads that claim jobs from the queue and run :class:`StudyProcessor` on them."""

    def __init__(
        self,
        processor: StudyProcessor,
        queue: JobQueue,
        *,
        workers: int = 1,
        poll_interval_s: float = 0.1,
        name: str = "worker",
    ) -> None:
        self.processor = processor
        self.queue = queue
        self.workers = workers
        self.poll_interval_s = poll_interval_s
        self.name = name
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._run, args=(f"{self.name}-{index}",), name=f"{self.name}-{index}"
            )
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """Tell idle workers that a job was queued, so they claim it without waiting."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def run_once(self, worker_id: str) -> bool:
        """Claim and process one job; False when the queue was empty."""
        job = self.queue.claim(worker_id)
        if job is None:
            return False
        try:
            # The lease is renewed while the study is processed, so a slow study is not
            # taken over by another worker; a killed worker's lease simply expires.
            with self.queue.keep_alive(job.id, worker_id):
                self.processor.process(job)
        except Exception as exc:  # one study failing must never stop the worker
            reason = f"{type(exc).__name__}: {exc}"
            log.error(
                "study job %d failed: %s",
                job.id,
                reason,
                exc_info=not isinstance(exc, TriageNodeError),
            )
            # Images that cannot be decoded will not decode on the next attempt either.
            retry = not isinstance(exc, NoUsableImagesError)
            state = self.queue.fail(job.id, worker_id, reason, retry=retry)
            with self.processor.db.write_session() as session:
                final = state == "failed"
                set_study_state(
                    session,
                    job.study_id,
                    StudyState.failed if final else StudyState.queued,
                    reason if final else f"retrying after: {reason}",
                )
            if state == "failed":
                STUDIES_PROCESSED.labels("failed", Priority(job.priority).name).inc()
            return True
        self.queue.complete(job.id, worker_id)
        return True

    def _run(self, worker_id: str) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once(worker_id)
            except Exception:  # database briefly unavailable: keep the thread alive
                log.exception("worker %s: queue error", worker_id)
                busy = False
            if not busy:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
