"""``/healthz``, ``/readyz`` and ``/metrics``: for load balancers and Prometheus, no token.

None of them reveals patient data: metrics carry counts by state, priority and destination.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from triagenode.api.deps import DbDep, ServicesDep, SettingsDep
from triagenode.api.schemas import ReadyOut
from triagenode.audit.syslog import AuditForwardingCollector, forwarding_status
from triagenode.domain import JobState, Priority
from triagenode.metrics import REGISTRY
from triagenode.store.db import Database
from triagenode.store.models import AuditEvent, Export, Job, Study

__all__ = ["DatabaseStateCollector", "router"]

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


def _priority_name(value: int) -> str:
    try:
        return Priority(value).name
    except ValueError:
        return str(value)


class DatabaseStateCollector(Collector):
    """Gauges read from the database at scrape time, so they are right after a restart."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        studies = GaugeMetricFamily("triagenode_studies", "Studies by state", labels=["state"])
        queue = GaugeMetricFamily(
            "triagenode_queue_depth", "Pending jobs by priority", labels=["priority"]
        )
        exports = GaugeMetricFamily("triagenode_exports", "Exports by state", labels=["state"])
        chain = GaugeMetricFamily("triagenode_audit_chain_length", "Rows in the audit hash chain")
        try:
            with self.db.session() as session:
                for state, count in session.execute(
                    select(Study.state, func.count()).group_by(Study.state)
                ):
                    studies.add_metric([state], count)
                pending = session.execute(
                    select(Job.priority, func.count())
                    .where(Job.state == JobState.pending.value)
                    .group_by(Job.priority)
                ).all()
                by_priority = {p.name: 0 for p in Priority}
                for priority, count in pending:
                    by_priority[_priority_name(priority)] = count
                for name, count in by_priority.items():
                    queue.add_metric([name], count)
                for state, count in session.execute(
                    select(Export.state, func.count()).group_by(Export.state)
                ):
                    exports.add_metric([state], count)
                chain.add_metric([], session.scalar(select(func.max(AuditEvent.seq))) or 0)
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: database gauges unavailable: %s", type(exc).__name__)
            return
        yield from (studies, queue, exports, chain)


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyOut,
    summary="Ready to work: database, spool space, model; destinations are reported",
    responses={503: {"model": ReadyOut}},
)
def readyz(settings: SettingsDep, db: DbDep, services: ServicesDep) -> JSONResponse:
    checks: dict[str, dict[str, object]] = {}
    try:
        db.ping()
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    spool = Path(settings.spool_dir)
    folder = spool if spool.exists() else Path(settings.node.data_dir)
    try:
        free = shutil.disk_usage(folder).free
        checks["spool"] = {
            "ok": free >= settings.api.min_free_spool_bytes,
            "free_bytes": free,
            "min_free_bytes": settings.api.min_free_spool_bytes,
        }
    except OSError as exc:
        checks["spool"] = {"ok": False, "error": exc.strerror or type(exc).__name__}
    if services.model_loaded is None:
        checks["model"] = {"ok": True, "configured": False}
    else:
        checks["model"] = {"ok": bool(services.model_loaded())}
    # A PACS that is down delays exports (the outbox retries) but does not stop the node
    # from receiving: report it without failing readiness. The answers come from the
    # background probe's cache, with their age: this call never opens an association.
    if services.destinations_reachable is not None:
        reachable = dict(services.destinations_reachable())
        checks["destinations"] = {"ok": all(reachable.values()), "reachable": reachable}
        if services.destinations_probed_at is not None:
            now = datetime.now(UTC)
            probed = dict(services.destinations_probed_at())
            checks["destinations"]["probed_at"] = {
                name: at.isoformat() if at else None for name, at in probed.items()
            }
            checks["destinations"]["age_s"] = {
                name: round((now - at).total_seconds(), 3) if at else None
                for name, at in probed.items()
            }

    # The syslog copy's lag is reported, never gating: the database keeps what is unsent.
    try:
        checks["audit_forwarding"] = {"ok": True, **forwarding_status(settings, db)}
    except Exception as exc:
        checks["audit_forwarding"] = {"ok": True, "error": type(exc).__name__}
    ready = all(c["ok"] for name, c in checks.items() if name != "destinations")
    body = ReadyOut(ready=ready, checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(db: DbDep, settings: SettingsDep) -> Response:
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(DatabaseStateCollector(db))
    scrape.register(AuditForwardingCollector(settings, db))
    return Response(
        generate_latest(REGISTRY) + generate_latest(scrape), media_type=CONTENT_TYPE_LATEST
    )
