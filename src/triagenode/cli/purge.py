"""``triagenode purge``: delete what the retention policy allows (``--dry-run`` lists it).

The policy is ``[retention]`` (see :mod:`triagenode.store.retention` for what is deleted
when); each study purged gets one audit event (DICOM Instances Accessed, action D) in the
same transaction as its rows. ``serve`` runs the same purge every
``retention.interval_minutes`` through :class:`triagenode.pipeline.retention.RetentionPurger`.
"""

from __future__ import annotations

import argparse

from triagenode.cli.common import open_database, print_json, print_table, settings_from_args
from triagenode.config.settings import Settings
from triagenode.pipeline.retention import purge
from triagenode.store.retention import RetentionPolicy

__all__ = ["register"]


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
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
    return RetentionPolicy.from_settings(settings.retention).describe()
