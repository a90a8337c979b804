"""``triagenode studies``: list received studies, or mark one complete.

Shows only the study UID and the node's own bookkeeping, never patient data.
"""

from __future__ import annotations

import argparse
from typing import Any

from triagenode.cli.common import open_database, print_json, print_table, settings_from_args

COLUMNS = [
    "study_uid",
    "state",
    "priority",
    "instances",
    "bytes",
    "first_received_at",
    "last_received_at",
    "stable_at",
    "delivery",
]


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "studies", parents=[parent], help="list received studies; mark one complete"
    )
    parser.add_argument("--state", default=None, help="only studies in this state")
    parser.add_argument("--limit", type=int, default=200, help="newest N studies (default 200)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_list)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    complete = actions.add_parser(
        "complete", parents=[parent], help="mark a receiving study stable now"
    )
    complete.add_argument("study_uid")
    complete.set_defaults(handler=_complete)


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from triagenode.domain import Priority
    from triagenode.store.models import Study

    db = open_database(settings_from_args(args))
    try:
        query = select(Study).order_by(Study.last_received_at.desc()).limit(args.limit)
        if args.state:
            query = query.where(Study.state == args.state)
        with db.session() as session:
            studies = session.execute(query).scalars().all()
            delivery = _delivery(session, [s.id for s in studies])
            return [
                {
                    "study_uid": s.study_uid,
                    "state": s.state,
                    "priority": Priority(s.priority).name
                    if s.priority in Priority._value2member_map_
                    else s.priority,
                    "instances": s.instance_count,
                    "bytes": s.byte_count,
                    "first_received_at": s.first_received_at.isoformat(timespec="seconds"),
                    "last_received_at": s.last_received_at.isoformat(timespec="seconds"),
                    "stable_at": s.stable_at.isoformat(timespec="seconds") if s.stable_at else "",
                    "delivery": delivery.get(s.id, ""),
                }
                for s in studies
            ]
    finally:
        db.dispose()


def _delivery(session: Any, study_ids: list[int]) -> dict[int, str]:
    """What happened to each study's newest result: sent, or held in shadow mode."""
    from sqlalchemy import select

    from triagenode.store.models import Result

    if not study_ids:
        return {}
    rows = session.execute(
        select(Result.study_id, Result.findings)
        .where(Result.study_id.in_(study_ids))
        .order_by(Result.run, Result.id)
    ).all()
    out: dict[int, str] = {}
    for study_id, findings in rows:
        info = (findings or {}).get("delivery") or {}
        targets = ",".join(info.get("destinations") or []) or "(no destinations)"
        if info.get("mode") == "shadow":
            out[study_id] = f"shadow: would send to {targets}"
        elif info:
            out[study_id] = f"queued to {targets}"
    return out


def _list(args: argparse.Namespace) -> int:
    rows = _rows(args)
    if args.json:
        print_json(rows)
    else:
        print_table(rows, COLUMNS)
    return 0


def _complete(args: argparse.Namespace) -> int:
    import getpass

    from triagenode.audit.events import AuditLog
    from triagenode.pipeline.tracker import StudyTracker

    settings = settings_from_args(args)
    db = open_database(settings)
    try:
        tracker = StudyTracker(settings, db, AuditLog.from_settings(settings, db))
        if tracker.mark_complete(args.study_uid, actor=f"cli:{getpass.getuser()}"):
            print(f"study {args.study_uid} marked complete")
            return 0
        print(f"study {args.study_uid} is not receiving (unknown, or already complete)")
        return 1
    finally:
        db.dispose()
