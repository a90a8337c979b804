"""``triagenode purge``: delete what the retention policy allows (``--dry-run`` lists it).

The policy is ``[retention]`` (see :mod:`triagenode.store.retention` for what is deleted
when); each study purged gets one audit event (DICOM Instances Accessed, action D) in the
same transaction as its rows. ``serve`` runs the same purge every
``retention.interval_minutes`` through :class:`RetentionPurger`.
"""

from __future__ import annotations

import argparse
import logging
import threading
from datetime import datetime, timezone
from typing import Any

from triagenode.cli.common import open_database, print_json, print_table, settings_from_args
from triagenode.config.settings import Settings

__all__ = ["RetentionPurger", "purge", "register"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "purge",
        parents=[parent],
        help="delete received images and SR files the retention policy no longer keeps",
        description="Delete what [retention] allows: received images spool_days after the "
        "study's SR reached every destination, SR files results_days after. Each study "
        "purged is recorded in the audit trail.",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted; delete nothing"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_run)


def purge(
    settings: Settings,
    db: Any,
    audit: Any,
    *,
    dry_run: bool = False,
    actor: str = "cli",
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Purge (or with ``dry_run`` only list) what the policy allows; one row per study."""
    from triagenode.audit import AuditEventId
    from triagenode.store.retention import RetentionPolicy, execute_purge, plan_purge

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


def _run(args: argparse.Namespace) -> int:
    from triagenode.audit import AuditLog, load_or_create_secret

    settings = settings_from_args(args)
    db = open_database(settings)
    try:
        audit = AuditLog(db, load_or_create_secret(settings))
        rows = purge(settings, db, audit, dry_run=args.dry_run)
    finally:
        db.dispose()
    if args.json:
        print_json({"dry_run": args.dry_run, "studies": rows})
        return 0
    print_table(rows, ["study_uid", "done_since", "spool_files", "spool_bytes", "sr_files"])
    verb = "would be purged (dry run)" if args.dry_run else "purged"
    print(f"{len(rows)} studies {verb}; policy: {_policy(settings)}")
    return 0


def _policy(settings: Settings) -> str:
    from triagenode.store.retention import RetentionPolicy

    return RetentionPolicy.from_settings(settings.retention).describe()


class RetentionPurger:
    """Runs :func:`purge` every ``retention.interval_minutes`` in a daemon thread (``serve``)."""

    def __init__(self, settings: Settings, db: Any, audit: Any) -> None:
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
