"""``triagenode monitor``: the last N days of scores against the validation-time reference.

Prints PSI and the KS statistic per label set and finding (and PSI of the Modality and Body
Part Examined mix); a value past ``--psi-limit`` logs a WARNING, writes an audit event
(``score-drift``) and makes the command exit with status 1, so a scheduler can alert on it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from triagenode.cli.common import open_database, print_json, print_table, settings_from_args

log = logging.getLogger("triagenode.monitor")


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "monitor",
        parents=[parent],
        help="compare recent scores with the validation-time distribution (drift)",
    )
    parser.add_argument("--days", type=float, default=7.0, help="window: the last N days")
    parser.add_argument(
        "--reference",
        type=Path,
        metavar="FILE",
        help="reference.json from evaluate, or a calibration file (default: model.calibration)",
    )
    parser.add_argument("--psi-limit", type=float, default=0.2, help="drift above this PSI")
    parser.add_argument("--min-studies", type=int, default=30, help="fewer: not compared")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_monitor)


def _monitor(args: argparse.Namespace) -> int:
    from triagenode.audit import load_or_create_secret
    from triagenode.audit.events import AuditEventId, AuditLog
    from triagenode.errors import TriageNodeError
    from triagenode.validation.drift import compare, stored_inputs, stored_logits

    settings = settings_from_args(args)
    path = args.reference or settings.model.calibration
    if path is None:
        raise TriageNodeError("no reference: give --reference FILE or set model.calibration")
    try:
        reference: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TriageNodeError(f"reference {path}: {exc}") from None
    if "reference" not in reference:
        raise TriageNodeError(f"reference {path}: no 'reference' section (evaluate writes one)")
    since = datetime.now(timezone.utc) - timedelta(days=args.days)
    db = open_database(settings)
    try:
        current = stored_logits(db, since)
        inputs, inputs_n = stored_inputs(db, since)
        rows = compare(
            reference,
            current,
            psi_limit=args.psi_limit,
            min_studies=args.min_studies,
            current_inputs=inputs,
            inputs_n=inputs_n,
        )
        drifted = [r for r in rows if r.drifted]
        if drifted:
            audit = AuditLog(db, load_or_create_secret(settings))
            for row in drifted:
                log.warning(
                    "drift: %s PSI %.3f > %.3f over the last %g days (%d studies)",
                    row.key,
                    row.psi,
                    args.psi_limit,
                    args.days,
                    row.n_current,
                )
                audit.record(
                    AuditEventId.application_activity,
                    event_type="score-drift",
                    actor=f"cli:{getpass.getuser()}",
                    details={
                        "key": row.key,
                        "psi": row.psi,
                        "ks": row.ks,
                        "limit": args.psi_limit,
                        "days": args.days,
                        "studies": row.n_current,
                        "reference": str(path),
                    },
                )
    finally:
        db.dispose()
    table = [
        {
            "key": r.key,
            "reference_n": r.n_reference,
            "current_n": r.n_current,
            "psi": "" if r.psi is None else f"{r.psi:.3f}",
            "ks": "" if r.ks is None else f"{r.ks:.3f}",
            "drift": "DRIFT" if r.drifted else (r.note or "ok"),
        }
        for r in rows
    ]
    if args.json:
        print_json(table)
    else:
        print_table(table, ["key", "reference_n", "current_n", "psi", "ks", "drift"])
    return 1 if drifted else 0
