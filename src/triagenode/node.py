"""Composition root: builds every part of one triagenode process from settings, then runs it.

:meth:`Node.build` is the only place that knows which parts exist and how they are wired. It
opens the database, brings its schema up to date, loads the model and constructs every part
*before* any thread starts, so a bad setting, an unreadable calibration file or a model that
will not load stops the process before it accepts a single association. :meth:`Node.start`
then starts the parts, consumers first and the receiver last; :meth:`Node.stop` stops them in
the reverse order.

Which parts a process builds follows its roles (``node.roles``, ``serve --role``):

``receiver``
    The DICOM Storage SCP. It writes instances to the spool and rows to the database.
``worker``
    The model, the job queue's worker pool, critical-finding notifications.
``exporter``
    The outbox's C-STORE lanes to the destinations.
``api``
    The admin API and the operator console, and the destination probe behind ``/readyz``.

Every process also offers to run the node's duties (finding stable studies, retention, audit
forwarding and, for a node split by role, audit checkpoints); on PostgreSQL one process of the
cluster at a time holds each, under an advisory lock, and another takes over when it dies
(:mod:`triagenode.pipeline.cluster`). The parts talk only through the database, so processes
with different roles may share one PostgreSQL database and one spool.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import uvicorn

from triagenode import __version__
from triagenode.api.server import build_server
from triagenode.api.services import ApiServices
from triagenode.audit.checkpoint import HeadCheckpointer
from triagenode.audit.events import AuditEventId, AuditLog, Outcome
from triagenode.audit.syslog import AuditForwarder
from triagenode.config.settings import ALL_ROLES, Settings
from triagenode.delivery.exporter import Exporter
from triagenode.delivery.outbox import ExportOutbox
from triagenode.delivery.probe import DestinationProbe
from triagenode.domain import DEMO_WARNING
from triagenode.inference.backends.select import select_backend
from triagenode.inference.batcher import DynamicBatcher
from triagenode.inference.classifier import ZeroShotClassifier
from triagenode.inference.model import load_model
from triagenode.inference.predictor import ClassifierPredictor
from triagenode.optimization.builder import OptimizationBuilder
from triagenode.pipeline.cluster import ClusterSingleton, ClusterWork
from triagenode.pipeline.cluster import Part as ClusterPart
from triagenode.pipeline.notify import CriticalFindingNotifier
from triagenode.pipeline.queue import JobQueue
from triagenode.pipeline.retention import RetentionPurger
from triagenode.pipeline.scheduler import StudyScheduler
from triagenode.pipeline.tracker import StudyTracker
from triagenode.pipeline.triage import TriageRules
from triagenode.pipeline.worker import StudyProcessor, WorkerPool
from triagenode.scp.receiver import DicomReceiver
from triagenode.store import migrate
from triagenode.store.db import Database
from triagenode.validation.calibration_file import apply_calibration, load_calibration
from triagenode.web import create_web_app

__all__ = ["Node", "Part", "build_classifier"]

log = logging.getLogger(__name__)


class Part(Protocol):
    """A running piece of the node: a thread or a pool of them."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def build_classifier(settings: Settings, *, batched: bool = True) -> ZeroShotClassifier:
    """The one way the node, ``classify`` and ``evaluate`` get a classifier.

    Loads the model (``model.source``), applies the site calibration file
    (``model.calibration``, refused for other weights), opens the best usable backend
    (:func:`~triagenode.inference.backends.select.select_backend`) and, when ``batched``,
    puts a :class:`~triagenode.inference.batcher.DynamicBatcher` in front of it so
    concurrent workers share batches. Decoding overlaps encoding as ``model.prefetch_workers``
    and ``model.prefetch_images`` say. Release it with :func:`close_classifier`.
    """
    calibration = None
    if settings.model.calibration is not None:
        calibration = load_calibration(settings.model.calibration)  # a bad file fails first
    cache_dir = settings.node.data_dir / "cache"
    model = load_model(settings.model, cache_dir=cache_dir)
    labels = settings.labels
    if calibration is not None:
        labels = apply_calibration(labels, calibration, model.identity.weights_sha256)
        log.info(
            "site calibration %s applied to label set %s", calibration.tag, calibration.label_set
        )
    encoder = select_backend(
        settings.model, settings.artifacts_dir, model, builder=OptimizationBuilder()
    )
    batcher = None
    if batched:
        batcher = DynamicBatcher(encoder, settings.model.max_batch, settings.model.max_wait_ms)
    return ZeroShotClassifier(
        model,
        encoder,
        labels,
        cache_dir,
        batcher=batcher,
        prefetch_workers=settings.model.prefetch_workers,
        prefetch_images=settings.model.prefetch_images,
    )


def close_classifier(classifier: ZeroShotClassifier) -> None:
    """Stop the classifier's prefetch and batcher threads, then release its backend (after
    the workers using it have stopped)."""
    classifier.close()
    if classifier.batcher is not None:
        classifier.batcher.close()
    classifier.encoder.close()


class _ApiServer:
    """The admin API's uvicorn server on a thread of its own, as a :class:`Part`."""

    def __init__(self, server: uvicorn.Server, where: str) -> None:
        self._server = server
        self._where = where
        self._thread = threading.Thread(target=server.run, name="api", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("admin API on %s", self._where)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)


@dataclass
class Node:
    """Every part of one triagenode process, built by :meth:`build`.

    The attributes for a role the process does not run are None.
    """

    settings: Settings
    roles: frozenset[str]
    db: Database
    audit: AuditLog
    schema_revision: str
    classifier: ZeroShotClassifier | None = None
    queue: JobQueue | None = None
    tracker: StudyTracker | None = None
    outbox: ExportOutbox | None = None
    exporter: Exporter | None = None
    notifier: CriticalFindingNotifier | None = None
    receiver: DicomReceiver | None = None
    probe: DestinationProbe | None = None
    forwarder: ClusterSingleton | None = None
    # Started in this order, stopped in reverse: consumers first, the receiver last.
    parts: list[Part] = field(default_factory=list)
    _started: list[Part] = field(default_factory=list, init=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False)

    # Building --------------------------------------------------------------------------

    @classmethod
    def build(
        cls, settings: Settings, *, roles: Sequence[str] | None = None, workers: int = 1
    ) -> Node:
        """Open the database, migrate it, and build every part ``roles`` need.

        ``roles`` defaults to ``node.roles``; ``"all"`` means every role.
        """
        if roles is None:
            chosen = settings.roles
        else:
            chosen = frozenset(ALL_ROLES) if "all" in roles else frozenset(roles)
        db = Database(settings.database_url, echo=settings.database.echo)
        try:
            revision = migrate.upgrade(db)
            audit = AuditLog.from_settings(settings, db)
            node = cls(settings, chosen, db, audit, revision)
            node._build_parts(workers)
        except BaseException:
            db.dispose()
            raise
        return node

    def _build_parts(self, workers: int) -> None:
        settings, db, audit = self.settings, self.db, self.audit
        wake_exporter: Callable[[], None] | None = None
        if self.roles & {"worker", "exporter", "api"}:
            # workers queue exports, the exporter sends them, the API's probe C-ECHOes
            self.outbox = ExportOutbox(db, audit, settings)
            self.exporter = Exporter(self.outbox, settings, audit)
        if "exporter" in self.roles:
            assert self.exporter is not None
            wake_exporter = self.exporter.wake
            self.parts.append(self.exporter)

        self.queue = JobQueue(db, settings)
        pool: WorkerPool | None = None
        if "worker" in self.roles:
            assert self.outbox is not None
            self.classifier = build_classifier(settings)
            self.notifier = CriticalFindingNotifier(settings.triage)
            processor = StudyProcessor(
                settings,
                db,
                audit,
                self.classifier,
                self.outbox,
                notifier=self.notifier,
                on_exports_queued=wake_exporter,
            )
            pool = WorkerPool(processor, self.queue, workers=workers)
            self.parts.append(pool)

        # Duties: whatever its roles, every process offers to run them; one process of the
        # cluster at a time does (pipeline/cluster.py), and another takes over when it dies.
        def duty(work: ClusterWork, build: Callable[[], ClusterPart]) -> ClusterSingleton:
            cluster = settings.cluster
            return ClusterSingleton(
                db, work, build, retry_s=cluster.retry_s, check_s=cluster.check_s
            )

        rules = TriageRules(settings.triage)
        tracker = self.tracker = StudyTracker(settings, db, audit, prioritizer=rules.prioritize)
        queue, wake = self.queue, pool.wake if pool is not None else None
        self.parts.append(
            duty(ClusterWork.scheduler, lambda: StudyScheduler(db, tracker, queue, on_queued=wake))
        )
        self.parts.append(duty(ClusterWork.retention, lambda: RetentionPurger(settings, db, audit)))
        checkpoints = audit.checkpoints
        if self.roles != frozenset(ALL_ROLES) and checkpoints is not None:
            # several processes append to one chain: one of them checkpoints its head
            audit.checkpoints = None
            self.parts.append(
                duty(ClusterWork.audit_checkpoints, lambda: HeadCheckpointer(db, checkpoints))
            )
        if settings.audit.syslog.enabled:
            # outside ``parts``: it starts first and stops last, after the stop event
            self.forwarder = duty(
                ClusterWork.audit_forwarding,
                lambda: AuditForwarder.from_settings(settings, db, audit),
            )

        if "api" in self.roles and settings.api.enabled:
            self._build_api()
        if "receiver" in self.roles:
            self.receiver = DicomReceiver(settings, db, audit)
            self.parts.append(self.receiver)

    def _build_api(self) -> None:
        settings = self.settings
        exporter = self.exporter
        assert exporter is not None
        self.probe = DestinationProbe(
            settings.destinations,
            lambda destination: exporter.echo(destination, settings.export.timeout_s),
            settings.export.probe_interval_s,
        )
        self.parts.append(self.probe)
        classifier = self.classifier
        services = ApiServices(
            predictor=ClassifierPredictor(classifier) if classifier is not None else None,
            model_loaded=(lambda: True) if classifier is not None else None,
            destinations_reachable=self.probe.reachable,
            destinations_probed_at=self.probe.probed_at,
        )
        app = create_web_app(settings, self.db, self.audit, services)
        server = build_server(app, settings.api.host, settings.api.port)
        server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
        scheme = "https" if settings.api.tls_cert is not None else "http"
        self.parts.append(_ApiServer(server, f"{scheme}://{settings.api.host}:{settings.api.port}"))

    # Running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start every part, in order, and record the start in the audit trail."""
        settings = self.settings
        log.info(
            "triagenode %s starting as %s: database %s (schema %s), data %s",
            __version__,
            "+".join(sorted(self.roles)),
            self.db.safe_url,
            self.schema_revision,
            settings.node.data_dir.resolve(),
        )
        model_name = None
        if self.classifier is not None:
            identity = self.classifier.model.identity
            model_name = identity.display_name
            if identity.is_demo:
                log.warning("model is the built-in demo model: %s", DEMO_WARNING)
            log.info("model %s on backend %s", model_name, self.classifier.backend)
        if settings.export.mode == "shadow" and "worker" in self.roles:
            log.warning("export.mode is shadow: results and SRs are kept here, nothing is sent")
        if self.forwarder is not None:
            self.forwarder.start()
        for part in self.parts:
            part.start()
            self._started.append(part)
        details: dict[str, object] = {"version": __version__, "roles": sorted(self.roles)}
        if model_name is not None:
            details["model"] = model_name
        self.audit.record(
            AuditEventId.application_activity,
            event_type="start",
            actor=settings.scp.ae_title,
            details=details,
        )
        if self.receiver is not None:
            log.info(
                "listening as %s on %s:%d",
                settings.scp.ae_title,
                settings.scp.host,
                self.receiver.port,
            )

    def stop(self) -> None:
        """Stop every started part in reverse order, then close the model and the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Producers first: stop accepting, then let consumers finish what they hold.
        for part in reversed(self._started):
            try:
                part.stop()
            except Exception:
                log.exception("error stopping %s", type(part).__name__)
        if self.notifier is not None:
            self.notifier.close(5.0)
        if self.classifier is not None:
            close_classifier(self.classifier)
        try:
            self.audit.record(
                AuditEventId.application_activity,
                event_type="stop",
                actor=self.settings.scp.ae_title,
                outcome=Outcome.success,
            )
        except Exception:
            log.exception("could not record the stop event")
        if self.forwarder is not None:
            self.forwarder.stop()
        self.db.dispose()
        log.info("triagenode stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGINT/SIGTERM, then stop cleanly."""
        done = threading.Event()

        def _signal(signum: int, _frame: object) -> None:
            log.info("received signal %d, stopping", signum)
            done.set()

        signal.signal(signal.SIGINT, _signal)
        signal.signal(signal.SIGTERM, _signal)
        self.start()
        try:
            done.wait()
        finally:
            self.stop()
