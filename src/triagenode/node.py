"""Composition root: builds every part of the node from settings and runs ``serve``.

Nothing here holds state of its own: the parts talk through the database, and this module
only decides which parts exist, wires them together, and starts and stops them in order.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from triagenode import __version__
from triagenode.audit.events import AuditEventId, AuditLog, Outcome
from triagenode.config.settings import Settings
from triagenode.domain import DEMO_WARNING
from triagenode.store import migrate
from triagenode.store.db import Database

__all__ = ["Node", "build_classifier"]

log = logging.getLogger(__name__)


def build_classifier(settings: Settings) -> Any:
    """Load the model, pick its backend and build the zero-shot classifier with a batcher."""
    from triagenode.inference.backends.select import select_backend
    from triagenode.inference.batcher import DynamicBatcher
    from triagenode.inference.classifier import ZeroShotClassifier
    from triagenode.inference.model import load_model
    from triagenode.optimization.builder import OptimizationBuilder

    calibration = None
    if settings.model.calibration is not None:
        from triagenode.validation.calibration_file import apply_calibration, load_calibration

        calibration = load_calibration(settings.model.calibration)  # a bad file fails first
    cache_dir = settings.node.data_dir / "cache"
    model = load_model(settings.model, cache_dir=cache_dir)
    labels = settings.labels
    if calibration is not None:
        # refused for other weights before any backend thread starts
        labels = apply_calibration(labels, calibration, model.identity.weights_sha256)
        log.info(
            "site calibration %s applied to label set %s", calibration.tag, calibration.label_set
        )
    encoder = select_backend(
        settings.model, settings.artifacts_dir, model, builder=OptimizationBuilder()
    )
    batcher = DynamicBatcher(encoder, settings.model.max_batch, settings.model.max_wait_ms)
    return ZeroShotClassifier(model, encoder, labels, cache_dir, batcher=batcher)


@dataclass
class Node:
    """Every running part of one triagenode process."""

    settings: Settings
    workers: int = 1
    db: Database = field(init=False)
    audit: AuditLog = field(init=False)
    _parts: list[Any] = field(default_factory=list, init=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        # pynetdicom and pydicom log dataset contents (patient names) at DEBUG/INFO.
        for noisy in ("pynetdicom", "pydicom"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.db = Database(self.settings.database_url, echo=self.settings.database.echo)
        self.audit = AuditLog.from_settings(self.settings, self.db)
        self.classifier: Any = None
        self.receiver: Any = None
        self.probe: Any = None
        self.api_server: Any = None
        self._api_thread: threading.Thread | None = None
        self._forwarder: Any = None

    # Start-up ------------------------------------------------------------------------

    def start(self) -> None:
        from triagenode.delivery.exporter import Exporter, ExportOutbox
        from triagenode.delivery.probe import DestinationProbe
        from triagenode.pipeline.notify import CriticalFindingNotifier
        from triagenode.pipeline.queue import JobQueue
        from triagenode.pipeline.scheduler import StudyScheduler
        from triagenode.pipeline.tracker import StudyTracker
        from triagenode.pipeline.triage import TriageRules
        from triagenode.pipeline.worker import StudyProcessor, WorkerPool
        from triagenode.scp.receiver import DicomReceiver

        settings = self.settings
        revision = migrate.upgrade(self.db)
        log.info(
            "triagenode %s starting: database %s (schema %s), data %s",
            __version__,
            self.db.safe_url,
            revision,
            settings.node.data_dir.resolve(),
        )
        self.classifier = build_classifier(settings)
        identity = self.classifier.model.identity
        if identity.is_demo:
            log.warning("model is the built-in demo model: %s", DEMO_WARNING)
        if settings.export.mode == "shadow":
            log.warning("export.mode is shadow: results and SRs are kept here, nothing is sent")

        rules = TriageRules(settings.triage)
        queue = JobQueue(self.db, settings)
        outbox = ExportOutbox(self.db, self.audit, settings)
        exporter = Exporter(outbox, settings, self.audit)
        self.notifier = CriticalFindingNotifier(settings.triage)
        processor = StudyProcessor(
            settings,
            self.db,
            self.audit,
            self.classifier,
            outbox,
            notifier=self.notifier,
            on_exports_queued=exporter.wake,
        )
        pool = WorkerPool(processor, queue, workers=self.workers)
        tracker = StudyTracker(settings, self.db, self.audit, prioritizer=rules.prioritize)
        scheduler = StudyScheduler(self.db, tracker, queue, on_queued=pool.wake)
        self.receiver = DicomReceiver(settings, self.db, self.audit)
        self.tracker = tracker
        self.queue = queue
        self.outbox = outbox
        self.exporter = exporter

        # Consumers first, the receiver last: nothing arrives before it can be handled.
        for part in (exporter, pool, scheduler):
            part.start()
            self._parts.append(part)
        if settings.api.enabled:
            self.probe = DestinationProbe(
                settings.destinations,
                lambda destination: exporter.echo(destination, settings.export.timeout_s),
                settings.export.probe_interval_s,
            )
            self.probe.start()
            self._parts.append(self.probe)
            self._start_api()
        if settings.audit.syslog.enabled:
            self._start_audit_forwarder()
        self.receiver.start()
        self._parts.append(self.receiver)
        self.audit.record(
            AuditEventId.application_activity,
            event_type="start",
            actor=settings.scp.ae_title,
            details={"version": __version__, "model": identity.display_name},
        )
        log.info(
            "listening as %s on %s:%d; model %s (%s)",
            settings.scp.ae_title,
            settings.scp.host,
            self.receiver.port,
            identity.display_name,
            getattr(self.classifier.encoder, "backend", "?"),
        )

    def _start_api(self) -> None:
        from triagenode.api.app import ApiServices, create_app
        from triagenode.api.server import build_server
        from triagenode.inference.predictor import ClassifierPredictor

        services = ApiServices(
            predictor=ClassifierPredictor(self.classifier),
            model_loaded=lambda: self.classifier is not None,
            destinations_reachable=self.probe.reachable,
            destinations_probed_at=self.probe.probed_at,
        )
        app = create_app(self.settings, self.db, self.audit, services)
        server = build_server(app, self.settings.api.host, self.settings.api.port)
        server.install_signal_handlers = lambda: None  # type: ignore[attr-defined,method-assign]
        thread = threading.Thread(target=server.run, name="api", daemon=True)
        thread.start()
        self.api_server = server
        self._api_thread = thread
        log.info("admin API on http://%s:%d", self.settings.api.host, self.settings.api.port)

    def _start_audit_forwarder(self) -> None:
        from triagenode.audit.syslog import AuditForwarder

        forwarder = AuditForwarder.from_settings(self.settings, self.db, self.audit)
        forwarder.start()
        self._forwarder = forwarder

    # Shut-down -----------------------------------------------------------------------

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Producers first: stop accepting, then let consumers finish what they hold.
        for part in reversed(self._parts):
            try:
                part.stop()
            except Exception:
                log.exception("error stopping %s", type(part).__name__)
        if self.api_server is not None:
            self.api_server.should_exit = True
            if self._api_thread is not None:
                self._api_thread.join(10)
        if getattr(self, "notifier", None) is not None:
            self.notifier.close(5.0)
        batcher = getattr(self.classifier, "batcher", None)
        if batcher is not None:
            batcher.close()
        try:
            self.audit.record(
                AuditEventId.application_activity,
                event_type="stop",
                actor=self.settings.scp.ae_title,
                outcome=Outcome.success,
            )
        except Exception:
            log.exception("could not record the stop event")
        if self._forwarder is not None:
            self._forwarder.stop()
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
