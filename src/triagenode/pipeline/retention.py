"""Retention: delete what the policy allows, with one audit event per study purged.

:func:`purge` is what ``triagenode purge`` runs once; :class:`RetentionPurger` runs it every
``retention.interval_minutes`` inside ``serve``. What may be deleted, and the deleting itself,
is :mod:`triagenode.store.retention`'s.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from triagenode.audit import AuditEventId, AuditLog
from triagenode.config.settings import Settings
from triagenode.store.db import Database
from triagenode.store.retention import RetentionPolicy, execute_purge, plan_purge

__all__ = ["RetentionPurger", "purge"]

log = logging.getLogger(__name__)


def purge(
    settings: Settings,
    db: Database,
    audit: AuditLog,
    *,
    dry_run: bool = False,
    actor: str = "cli",
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Purge (or with ``dry_run`` only list) what the policy allows; one row per study."""
    policy = RetentionPolicy.from_settings(settings.retention)
    rows = []
    for item in plan_purge(db, policy, now or datetime.now(timezone.utc)):
        since = item.spool_since or item.results_since
        row: dict[str, Any] = {
            "study_uid": item.study_uid,
            "done_since": since.isoformat(timespec="seconds") if since else "",
            **item.summary(),
        }
        if not dry_run:

            def record(session: Any, purged: Any = item) -> None:
                audit.record(
                    AuditEventId.instances_accessed,
                    event_type="retention_purge",
                    action="D",
                    actor=actor,
                    study_uid=purged.study_uid,
                    patient_ref=purged.patient_ref,
                    details={**purged.summary(), "policy": policy.describe()},
                    session=session,
                )

            row.update(execute_purge(db, settings.node.data_dir, item, policy, record))
        rows.append(row)
    return rows


class RetentionPurger:
    """Runs :func:`purge` every ``retention.interval_minutes`` in a daemon thread (``serve``)."""

    def __init__(self, settings: Settings, db: Database, audit: AuditLog) -> None:
        self.settings = settings
        self.db = db
        self.audit = audit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        interval = self.settings.retention.interval_minutes * 60
        if interval <= 0:
            return
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="retention", daemon=True
        )
        self._thread.start()

    def _loop(self, interval: float) -> None:
        # the first pass after one interval: the node's start-up (migrations) comes first
        while not self._stop.wait(interval):
            try:
                rows = purge(self.settings, self.db, self.audit, actor="retention")
                if rows:
                    log.info("retention purge: %d studies", len(rows))
            except Exception:  # a failed pass is retried at the next interval
                log.exception("retention purge failed; retrying in %.0f s", interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
