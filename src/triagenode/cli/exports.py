"""``triagenode exports``: list the SR outbox; requeue dead (or waiting) rows.

Shows UIDs, destinations and the node's bookkeeping only, never patient data.
"""

from __future__ import annotations

import argparse
from typing import Any

from triagenode.cli.common import open_database, print_json, print_table, settings_from_args
from triagenode.domain import ExportState

COLUMNS = [
    "id",
    "state",
    "destination",
    "priority",
    "attempts",
    "next_attempt_at",
    "sent_at",
    "study_uid",
    "sop_instance_uid",
    "last_error",
]
STATES = tuple(state.value for state in ExportState)  # pending, sending, sent, dead


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "exports", parents=[parent], help="list SR exports to destinations; requeue dead ones"
    )
    parser.add_argument("--state", choices=STATES, default=None, help="only rows in this state")
    parser.add_argument("--limit", type=int, default=200, help="newest N rows (default 200)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_list)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    retry = actions.add_parser(
        "retry", parents=[parent], help="requeue one export (ID) or every dead one (--all-dead)"
    )
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", type=int, help="export row id")
    target.add_argument("--all-dead", action="store_true", help="requeue every dead export")
    retry.set_defaults(handler=_retry)


def _outbox(args: argparse.Namespace) -> Any:
    from triagenode.audit.events import AuditLog
    from triagenode.delivery.outbox import ExportOutbox

    settings = settings_from_args(args)
    db = open_database(settings)
    return ExportOutbox(db, AuditLog.from_settings(settings, db), settings)


def _priority_name(value: int) -> str | int:
    from triagenode.domain import Priority

    return Priority(value).name if value in Priority._value2member_map_ else value


def _list(args: argparse.Namespace) -> int:
    outbox = _outbox(args)
    try:
        rows = outbox.list(state=args.state, limit=args.limit)
    finally:
        outbox.db.dispose()
    data = [
        {
            **row.to_dict(),
            "priority": _priority_name(row.priority),
            "next_attempt_at": row.next_attempt_at.isoformat(timespec="seconds")
            if row.state in (ExportState.pending, ExportState.sending)
            else "",
            "sent_at": row.sent_at.isoformat(timespec="seconds") if row.sent_at else "",
            "created_at": row.created_at.isoformat(timespec="seconds"),
            "last_error": row.last_error or "",
        }
        for row in rows
    ]
    if args.json:
        print_json(data)
    else:
        print_table(data, COLUMNS)
    return 0


def _retry(args: argparse.Namespace) -> int:
    outbox = _outbox(args)
    try:
        if args.all_dead:
            count = outbox.retry_all_dead()
            print(f"requeued {count} dead export(s)")
            return 0
        if outbox.retry(args.id):
            print(f"export {args.id} requeued")
            return 0
        row = outbox.get(args.id)
        reason = "no such export" if row is None else f"it is {row.state}"
        print(f"export {args.id} not requeued: {reason}")
        return 1
    finally:
        outbox.db.dispose()
