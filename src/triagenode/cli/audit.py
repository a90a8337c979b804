"""``triagenode audit``: verify, export and list the audit trail."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from triagenode.cli.common import open_database, print_json, print_table, settings_from_args
from triagenode.errors import ConfigError

if TYPE_CHECKING:
    from triagenode.config.settings import Settings

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


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
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
    verify.add_argument(
        "--checkpoints",
        action="append",
        default=[],
        metavar="FILE",
        help="also check this copy of the checkpoint file (repeatable); the configured "
        "checkpoint file is always checked unless --no-checkpoints",
    )
    verify.add_argument(
        "--syslog-copy",
        action="append",
        default=[],
        metavar="FILE",
        help="a collector's file of forwarded messages: its checkpoints are checked too",
    )
    verify.add_argument(
        "--public-key",
        metavar="FILE",
        help="Ed25519 public key (PEM) to check checkpoint signatures with; default "
        "audit.checkpoint_public_key",
    )
    verify.add_argument(
        "--no-checkpoints",
        action="store_true",
        help="skip the checkpoint file and --checkpoints copies (deleted newest rows then go "
        "unnoticed unless a --syslog-copy holds checkpoints)",
    )
    verify.set_defaults(handler=_verify)

    checkpoint = actions.add_parser(
        "checkpoint", parents=[parent], help="write a signed checkpoint of the chain head now"
    )
    checkpoint.set_defaults(handler=_checkpoint)

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
    from triagenode.audit import AuditLog

    settings = settings_from_args(args)
    db = open_database(settings)
    return settings, db, AuditLog.from_settings(settings, db)


def _checkpoint_sources(
    args: argparse.Namespace, settings: Settings
) -> tuple[list[Path], list[str]]:
    """The checkpoint files to check, and warnings to print."""
    from triagenode.audit.checkpoint import checkpoint_paths

    files = [Path(p) for p in [*args.checkpoints, *args.syslog_copy]]
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path}: no such checkpoint file or syslog copy")
    if args.no_checkpoints:
        return [], []
    configured, _key, _public = checkpoint_paths(settings)
    files = [Path(p) for p in args.checkpoints]
    notes: list[str] = []
    if configured.exists():
        files.insert(0, configured)
    else:
        notes.append(f"no checkpoint file at {configured}: deleted newest rows cannot be detected")
    return files, notes


def _verify(args: argparse.Namespace) -> int:
    from itertools import chain

    from triagenode.audit import AuditEventId, Outcome
    from triagenode.audit.checkpoint import checkpoint_paths, load_public_key, read_checkpoints
    from triagenode.audit.syslog import read_syslog_checkpoints

    settings, db, audit = _audit_log(args)
    files, notes = _checkpoint_sources(args, settings)
    copies = [Path(p) for p in args.syslog_copy]
    checkpoints = None
    public_key = None
    if files or copies:
        public_key = load_public_key(
            Path(args.public_key) if args.public_key else checkpoint_paths(settings)[2]
        )
        checkpoints = chain(
            *(read_checkpoints(f) for f in files), *(read_syslog_checkpoints(c) for c in copies)
        )
    report = audit.verify(args.expect_head, checkpoints, public_key)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
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
        if report.checkpoints is not None:
            print(f"signed checkpoints checked: {report.checkpoints}")
    else:
        assert report.problem is not None
        print(f"audit chain BROKEN: {report.problem.kind}: {report.problem.message}")
        print(f"intact before the break: {report.vouched} of {report.count} events")
    audit.record(
        AuditEventId.audit_log_used if report.ok else AuditEventId.security_alert,
        event_type="verify" if report.ok else "integrity_failure",
        action="R" if report.ok else "E",
        outcome=Outcome.success if report.ok else Outcome.serious_failure,
        **_cli_event({"ok": report.ok, "count": report.count}),
    )
    db.dispose()
    return 0 if report.ok else 1


def _cli_event(details: dict[str, object]) -> dict[str, object]:
    """``actor`` (``cli:<OS user>``), ``actor_address`` (host) and ``details`` of an event
    recorded by this command."""
    from triagenode.audit.events import local_actor

    return local_actor().fields(details)


def _checkpoint(args: argparse.Namespace) -> int:
    _settings, db, audit = _audit_log(args)
    written = audit.checkpoint()
    db.dispose()
    if written is None:
        print("the audit trail is empty: nothing to checkpoint")
        return 0
    print(f"checkpoint: seq {written.seq} hash {written.row_hash} at {written.at}")
    return 0


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
        **_cli_event({"format": args.fmt}),
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
        study_uid=args.study_uid,
        patient_ref=reference,
        **_cli_event({"count": len(rows)}),
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
