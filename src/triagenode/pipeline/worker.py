"""Workers: claim a study's job, classify it, write its SR, queue the exports.

Each step is a function call or a database row, so a worker killed at any point leaves a
lease that expires and a job that another worker (or the restarted node) completes. SR UIDs
derive from (study, model, run): redoing the same work rewrites the same SR, never a second.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from sqlalchemy import select

from triagenode.audit.events import AuditEventId, AuditLog
from triagenode.config.settings import Settings
from triagenode.delivery.outbox import ExportOutbox
from triagenode.domain import JobState, Priority, StudyResult, StudyState
from triagenode.errors import TriageNodeError
from triagenode.inference.classifier import NoUsableImagesError, ZeroShotClassifier
from triagenode.inference.plan import plan_study
from triagenode.inference.preprocess import display_dataset, read_dataset
from triagenode.inference.select import InstanceRecord, Selection
from triagenode.metrics import FINDING_POSITIVE, FINDING_SCORE, STUDIES_PROCESSED
from triagenode.pipeline.notify import CriticalFindingNotifier
from triagenode.pipeline.queue import ClaimedJob, JobQueue
from triagenode.reports.content import SrUids
from triagenode.reports.kos import build_kos
from triagenode.reports.objects import ObjectKind, key_images, write_objects
from triagenode.reports.result_json import result_to_json
from triagenode.reports.sr import build_sr, write_sr
from triagenode.reports.summary_card import Thumbnail, layout_card
from triagenode.reports.summary_pdf import build_summary_pdf
from triagenode.reports.summary_sc import build_summary_sc
from triagenode.store.db import Database
from triagenode.store.models import Instance, Result, Series, Study
from triagenode.store.study_state import set_study_state

__all__ = ["StudyProcessor", "WorkerPool", "build_summary_objects", "key_thumbnails"]

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
        plan = plan_study(
            self.classifier.labels,
            snapshot.records,
            snapshot.triage_inputs,
            slices_per_series=self.settings.model.slices_per_series,
            max_images=self.settings.model.max_images_per_study,
            label_set=snapshot.label_set or None,
            label_set_reason=f"set by triage rule {snapshot.priority_rule!r}",
        )
        label_set, why, selection = plan.label_set, plan.reason, plan.selection
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
        for finding in result.findings:
            FINDING_SCORE.labels(result.label_set, finding.name).observe(finding.score)
            if finding.present:
                FINDING_POSITIVE.labels(result.label_set, finding.name).inc()
        chosen = self.classifier.label_set(label_set)
        window = (chosen.window.center, chosen.window.width) if chosen.window else None
        paths = {image.ref.sop_instance_uid: image.path for image in selection.images}
        self._report(snapshot, result, selection.images[0].path, paths, window)
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

    def _summaries(
        self,
        snapshot: _StudySnapshot,
        result: StudyResult,
        source: pydicom.Dataset,
        sr: pydicom.Dataset,
        paths: dict[str, Path],
        window: tuple[float, float] | None,
    ) -> list[tuple[ObjectKind, str, Path]]:
        """Build and write the summary objects some destination takes; (kind, SOP Instance
        UID, file) of each. A failure here costs only the summaries, never the SR."""
        kinds = [
            k
            for k in (ObjectKind.summary_sc, ObjectKind.summary_pdf, ObjectKind.kos)
            if self.outbox.wanted(k.value)
        ]
        if not kinds:
            return []
        written: list[tuple[ObjectKind, str, Path]] = []
        try:
            objects = build_summary_objects(
                result,
                source,
                sr,
                self.settings,
                kinds,
                run=snapshot.run,
                paths=paths,
                window=window,
            )
            paths_written = write_objects([dataset for _kind, dataset in objects], self.settings)
            for (kind, dataset), path in zip(objects, paths_written, strict=True):
                written.append((kind, str(dataset.SOPInstanceUID), path))
        except Exception as exc:
            log.error(
                "study %s: summary objects not made (%s: %s); the SR is still sent",
                snapshot.study_uid,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, TriageNodeError),
            )
        return written

    def _report(
        self,
        snapshot: _StudySnapshot,
        result: StudyResult,
        source_path: Path,
        paths: dict[str, Path] | None = None,
        window: tuple[float, float] | None = None,
    ) -> None:
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
        predecessors = self._predecessor(snapshot)
        sr = build_sr(result, source, self.settings, run=snapshot.run, predecessors=predecessors)
        sr_path = write_sr(sr, self.settings, result=result)
        summaries = self._summaries(snapshot, result, source, sr, paths or {}, window)
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
            shadow = self.settings.export.mode == "shadow"
            # what would have been sent, and whether it was: the API and the CLI show it
            row.findings = {
                **row.findings,
                "delivery": {
                    "mode": self.settings.export.mode,
                    "destinations": [d.name for d in self.settings.destinations],
                    "sent": not shadow,
                },
            }
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
            if shadow:
                # shadow mode (validation before go-live): the SR and the result stay here
                self.audit.record(
                    AuditEventId.export,
                    event_type="shadow-not-sent",
                    study_uid=snapshot.study_uid,
                    patient_ref=study.patient_ref,
                    actor=self.settings.scp.ae_title,
                    details={
                        "sr_uid": sr.SOPInstanceUID,
                        "would_send_to": [d.name for d in self.settings.destinations],
                    },
                    session=session,
                )
            else:
                self.outbox.enqueue(
                    row.id,
                    snapshot.study_uid,
                    sr.SOPInstanceUID,
                    relative,
                    priority=priority,
                    session=session,
                )
            for kind, sop_instance_uid, path in [] if shadow else summaries:
                self.outbox.enqueue(
                    row.id,
                    snapshot.study_uid,
                    sop_instance_uid,
                    path.relative_to(self.settings.node.data_dir),
                    priority=priority,
                    session=session,
                    kind=kind.value,
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
        STUDIES_PROCESSED.labels(StudyState.reported.value, snapshot.priority.name).inc()
        if self.on_exports_queued is not None and not shadow:
            self.on_exports_queued()
        if result.critical and self.notifier is not None:
            self.notifier.notify(result, sr_uid=sr.SOPInstanceUID)


def key_thumbnails(
    result: StudyResult, paths: dict[str, Path], window: tuple[float, float] | None
) -> list[Thumbnail]:
    """The key images as the model saw them (same display pipeline and window); an image
    whose file is not at hand or does not decode is left out."""
    thumbnails = []
    for ref in key_images(result):
        path = paths.get(ref.sop_instance_uid)
        if path is None:
            continue
        try:
            pixels = display_dataset(read_dataset(path), ref.frame, window=window)
        except Exception as exc:  # a thumbnail is not worth failing the card for
            log.warning("study %s: no thumbnail of an image (%s)", result.study_uid, exc)
            continue
        names = [
            f.code_meaning
            for f in sorted(result.findings, key=lambda f: (not f.present, -f.score))
            if any(i.sop_instance_uid == ref.sop_instance_uid for i in f.images)
        ]
        caption = ", ".join(names[:2]) or "analysed image"
        if ref.frame is not None:
            caption += f" (frame {ref.frame})"
        thumbnails.append(Thumbnail(ref, pixels, caption))
    return thumbnails


def build_summary_objects(
    result: StudyResult,
    source: pydicom.Dataset,
    sr: pydicom.Dataset,
    settings: Settings,
    kinds: list[ObjectKind],
    *,
    run: int,
    paths: dict[str, Path],
    window: tuple[float, float] | None,
) -> list[tuple[ObjectKind, pydicom.Dataset]]:
    """The summary SC, PDF and KOS of ``result`` that ``kinds`` asks for (not written).

    The SC and PDF share one layout and one set of thumbnails; the PDF and KOS reference
    the SR ``sr``.
    """
    objects: list[tuple[ObjectKind, pydicom.Dataset]] = []
    if ObjectKind.summary_sc in kinds or ObjectKind.summary_pdf in kinds:
        thumbnails = key_thumbnails(result, paths, window)
        layout = layout_card(result, thumbnails)
        if ObjectKind.summary_sc in kinds:
            sc = build_summary_sc(
                result, source, settings, run=run, thumbnails=thumbnails, layout=layout
            )
            objects.append((ObjectKind.summary_sc, sc))
        if ObjectKind.summary_pdf in kinds:
            sr_ids = SrUids(result.study_uid, sr.SeriesInstanceUID, sr.SOPInstanceUID)
            pdf = build_summary_pdf(
                result, source, settings, run=run, sr=sr_ids, thumbnails=thumbnails, layout=layout
            )
            objects.append((ObjectKind.summary_pdf, pdf))
    if ObjectKind.kos in kinds:
        objects.append(
            (ObjectKind.kos, build_kos(result, source, settings, run=run, companions=[sr]))
        )
    return objects


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
        # Lease owners must differ between processes sharing the queue, or one process
        # could renew or complete a job another took over after its lease lapsed.
        owner = f"{socket.gethostname()}:{os.getpid()}"
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._run,
                args=(f"{self.name}-{index}@{owner}"[:128],),
                name=f"{self.name}-{index}",
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
                final = state is JobState.failed
                set_study_state(
                    session,
                    job.study_id,
                    StudyState.failed if final else StudyState.queued,
                    reason if final else f"retrying after: {reason}",
                )
            if state is JobState.failed:
                STUDIES_PROCESSED.labels(StudyState.failed.value, Priority(job.priority).name).inc()
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
