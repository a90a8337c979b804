"""``triagenode triage``: show the triage rules and explain which one a DICOM file matches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from triagenode.cli.common import print_json, print_table, settings_from_args
from triagenode.dicom_attrs import RequestPriority


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser("triage", parents=[parent], help="triage rules")
    actions = parser.add_subparsers(dest="action", required=True)

    rules = actions.add_parser("rules", parents=[parent], help="print the rule table in order")
    rules.add_argument("--json", action="store_true", help="print JSON")
    rules.set_defaults(handler=_rules)

    explain = actions.add_parser(
        "explain",
        parents=[parent],
        help="which rule a DICOM file matches, and why",
        description="Reads each file's header (not its pixels), extracts the triage inputs "
        "the receiver would, and shows every rule tried up to the first match.",
    )
    explain.add_argument("files", nargs="+", type=Path, metavar="FILE")
    explain.add_argument(
        "--calling-aet", default=None, help="calling AE title to assume (as if sent by it)"
    )
    explain.add_argument(
        "--request-priority",
        choices=[p.name for p in RequestPriority],
        default=None,
        help="C-STORE request Priority to assume",
    )
    explain.add_argument(
        "--merge",
        action="store_true",
        help="treat the files as one study: merge their inputs as the receiver does",
    )
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.set_defaults(handler=_explain)

    queue = actions.add_parser(
        "queue", parents=[parent], help="jobs waiting, in the order workers will claim them"
    )
    queue.add_argument("--limit", type=int, default=50, help="jobs to list (default 50)")
    queue.add_argument("--json", action="store_true", help="print JSON")
    queue.set_defaults(handler=_queue)


def _rules(args: argparse.Namespace) -> int:
    from triagenode.pipeline.triage import TriageRules

    settings = settings_from_args(args)
    rules = TriageRules(settings.triage)
    rows = rules.describe()
    if args.json:
        print_json(
            {
                "rules": rows,
                "default_priority": settings.triage.default_priority.name,
                "aging_after_s": settings.triage.aging_after_s,
                "lease_s": settings.triage.lease_s,
            }
        )
        return 0
    print_table(rows, ["order", "name", "priority", "label_set", "conditions"])
    print(
        f"\nfirst match wins; aging: one level up per {settings.triage.aging_after_s:g} s "
        f"waited; lease {settings.triage.lease_s:g} s"
    )
    return 0


def _queue(args: argparse.Namespace) -> int:
    from triagenode.cli.common import open_database
    from triagenode.pipeline.queue import JobQueue

    settings = settings_from_args(args)
    db = open_database(settings)
    try:
        queue = JobQueue(db, settings)
        depth = {p.name: n for p, n in sorted(queue.depth().items(), reverse=True)}
        leased = queue.leased()
        jobs = [
            {
                "job": j.id,
                "study_uid": j.study_uid,
                "priority": j.priority.name,
                "effective": j.effective_priority.name,
                "attempts": j.attempts,
                "enqueued_at": j.enqueued_at.isoformat(timespec="seconds"),
                "available_at": j.available_at.isoformat(timespec="seconds"),
            }
            for j in queue.pending(limit=args.limit)
        ]
    finally:
        db.dispose()
    if args.json:
        print_json({"pending": depth, "leased": leased, "jobs": jobs})
        return 0
    counts = ", ".join(f"{name} {count}" for name, count in depth.items())
    print(f"pending: {counts}; held by workers: {leased}")
    print_table(jobs, ["job", "study_uid", "priority", "effective", "attempts", "enqueued_at"])
    return 0


def _read_inputs(path: Path, args: argparse.Namespace) -> dict[str, str]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from triagenode.dicom_attrs import triage_inputs
    from triagenode.errors import DicomInputError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DicomInputError(f"{path}: not a readable DICOM file ({exc})") from None
    priority = int(RequestPriority[args.request_priority]) if args.request_priority else None
    return triage_inputs(ds, priority, args.calling_aet)


def _explain(args: argparse.Namespace) -> int:
    from triagenode.dicom_attrs import merge_triage_inputs
    from triagenode.errors import DicomInputError
    from triagenode.pipeline.triage import TriageRules

    settings = settings_from_args(args)
    rules = TriageRules(settings.triage)
    subjects: list[tuple[str, dict[str, str]]] = []
    failures = 0
    for path in args.files:
        try:
            subjects.append((str(path), _read_inputs(path, args)))
        except DicomInputError as exc:
            print(f"triagenode: error: {exc}", file=sys.stderr)
            failures += 1
    if args.merge and subjects:
        merged: dict[str, str] = {}
        for _, inputs in subjects:
            merged = merge_triage_inputs(merged, inputs)
        subjects = [(f"{len(subjects)} files as one study", merged)]
    if args.json:
        print_json([_as_json(name, inputs, rules, settings) for name, inputs in subjects])
    else:
        for index, (name, inputs) in enumerate(subjects):
            if index:
                print()
            print(f"== {name}")
            print(f"request priority: {_request_priority(inputs)}")
            print(rules.explain(inputs))
            label_set, why = _label_set(inputs, rules, settings)
            print(f"label set: {label_set or 'none, not classified'} ({why})")
    return 1 if failures else 0


def _request_priority(inputs: dict[str, str]) -> str:
    name = inputs.get("RequestPriority") or ""
    if name in RequestPriority.__members__:
        return RequestPriority[name].describe()
    return "not known (not received over DICOM, or no C-STORE Priority given)"


def _label_set(inputs: dict[str, str], rules: Any, settings: Any) -> tuple[str | None, str]:
    """The label set the worker would use: a triage rule's, else the domain rules' choice."""
    decision = rules.evaluate(inputs)
    if decision.label_set:
        return decision.label_set, f"set by triage rule {decision.rule!r}"
    choice = settings.labels.explain_choice(inputs)
    return choice.label_set, choice.reason


def _as_json(name: str, inputs: dict[str, str], rules: Any, settings: Any) -> dict[str, Any]:
    decision = rules.evaluate(inputs)
    label_set, why = _label_set(inputs, rules, settings)
    request = inputs.get("RequestPriority") or ""
    return {
        "file": name,
        "inputs": inputs,
        "request_priority": (
            {"name": request, "value": int(RequestPriority[request])}
            if request in RequestPriority.__members__
            else None
        ),
        "priority": decision.priority.name,
        "rule": decision.rule,
        "label_set": label_set,
        "label_set_reason": why,
        "reasons": decision.reasons,
        "checks": [
            {
                "rule": check.rule.name,
                "priority": check.rule.priority.name,
                "matched": check.matched,
                "conditions": [
                    {"field": c.field, "matched": c.matched, "reason": c.reason}
                    for c in check.conditions
                ],
            }
            for check in rules.checks(inputs)
        ],
    }
