"""``triagenode audit``: verify, export and list the audit trail."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from triagenode.cli.common import open_database, print_json, print_table, settings_from_args

__all__ = ["register"]


def _when(value: str) -> datetime:
    """ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 date or date-time (e.g. 2026-11-26T08:00:00Z)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _anchor(value: str) -> tuple[int, str]:
    seq, _, digest = value.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise argparse.ArgumentTypeError(f"{value!r}: expected SEQ:HASH as `audit verify` prints")
    return int(seq), digest.lower()


def register(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("audit", parents=[parent], help="the audit trail")
    actions = parser.add_subparsers(dest="action", required=True)

    verify = actions.add_parser(
        "verify", parents=[parent], help="walk the hash chain; exit 1 when it is broken"
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument(
        "--expect-head",
        type=_anchor,
        metavar="SEQ:HASH",
        help="head of an earlier report (kept elsewhere): also detects deleted newest rows",
    )
    verify.set_defaults(handler=_verify)

    export = actions.add_parser("export", parents=[parent], help="export events of a time range")
    export.add_argument(
        "--format", choices=["atna-xml", "syslog", "jsonl"], default="atna-xml", dest="fmt"
    )
    export.add_argument("--from", type=_when, dest="start", help="first time (inclusive)")
    export.add_argument("--to", type=_when, dest="end", help="last time (exclusive)")
    export.add_argument("--out", help="file to write (default: stdout)")
    export.set_defaults(handler=_export)

    listing = actions.add_parser("list", parents=[parent], help="show recent events")
    listing.add_argument("--from", type=_when, dest="start")
    listing.add_argument("--to", type=_when, dest="end")
    listing.add_argument("--event-id", help="DCM code, e.g. 110113")
    listing.add_argument("--actor")
    listing.add_argument("--study-uid")
    listing.add_argument(
        "--patient-id", help="searched by its HMAC; the ID is neither stored nor logged"
    )
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)


def _audit_log(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from triagenode.audit import AuditLog, load_or_create_secret

    settings = settings_from_args(args)
    db = open_database(settings)
    return settings, db, AuditLog(db, load_or_create_secret(settings))


def _verify(args: argparse.Namespace) -> int:
    from triagenode.audit import AuditEventId, Outcome

    _settings, db, audit = _audit_log(args)
    report = audit.verify(args.expect_head)
    if args.json:
        print_json(report.to_dict())
    elif report.ok:
        span = (
            f"from {report.first_at:%Y-%m-%d %H:%M:%S} to {report.last_at:%Y-%m-%d %H:%M:%S} UTC"
            if report.first_at
            else "(empty trail)"
        )
        print(f"audit chain intact: {report.count} events {span}")
        print(f"head: seq {report.head_seq} hash {report.head_hash}")
    else:
        assert report.problem is not None
        print(f"audit chain BROKEN: {report.problem.kind}: {report.problem.message}")
        print(f"intact before the break: {report.vouched} of {report.count} events")
    audit.record(
        AuditEventId.audit_log_used if report.ok else AuditEventId.security_alert,
        event_type="verify" if report.ok else "integrity_failure",
        action="R" if report.ok else "E",
        outcome=Outcome.success if report.ok else Outcome.serious_failure,
        actor="cli",
        details={"ok": report.ok, "count": report.count},
    )
    db.dispose()
    return 0 if report.ok else 1


def _export(args: argparse.Namespace) -> int:
    from triagenode.audit import AuditEventId
    from triagenode.audit.atna import AuditSource
    from triagenode.audit.export import export_chunks

    settings, db, audit = _audit_log(args)
    chunks = export_chunks(db, args.fmt, AuditSource.from_settings(settings), args.start, args.end)
    if args.out:
        with open(args.out, "wb") as handle:
            handle.writelines(chunks)
    else:
        sys.stdout.buffer.writelines(chunks)
        sys.stdout.flush()
    audit.record(
        AuditEventId.audit_log_used,
        event_type="export",
        action="R",
        actor="cli",
        details={"format": args.fmt},
    )
    db.dispose()
    return 0


def _list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from triagenode.audit import AuditEventId
    from triagenode.audit.export import event_dict
    from triagenode.store.models import AuditEvent

    _settings, db, audit = _audit_log(args)
    query = select(AuditEvent)
    if args.start:
        query = query.where(AuditEvent.at >= args.start)
    if args.end:
        query = query.where(AuditEvent.at < args.end)
    if args.event_id:
        query = query.where(AuditEvent.event_id == args.event_id)
    if args.actor:
        query = query.where(AuditEvent.actor == args.actor)
    if args.study_uid:
        query = query.where(AuditEvent.study_uid == args.study_uid)
    reference = audit.patient_ref(args.patient_id) if args.patient_id else None
    if reference:
        query = query.where(AuditEvent.patient_ref == reference)
    with db.session() as session:
        rows = [
            event_dict(r)
            for r in session.scalars(query.order_by(AuditEvent.seq.desc()).limit(args.limit))
        ]
    audit.record(
        AuditEventId.audit_log_used,
        event_type="list",
        action="R",
        actor="cli",
        study_uid=args.study_uid,
        patient_ref=reference,
        details={"count": len(rows)},
    )
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            row.update({k: "" for k, v in row.items() if v is None})
            row["at"] = row["at"][:19]
            row["patient_ref"] = row["patient_ref"][:12]
        print_table(
            rows,
            ["seq", "at", "event_id", "event_type", "outcome", "actor", "study_uid", "patient_ref"],
        )
    db.dispose()
    return 0
