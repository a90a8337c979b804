"""``triagenode evaluate``: measure the node on labelled studies (or its stored results).

``triagenode evaluate DATA... --labels LABELS.csv --out DIR`` runs the node's own pipeline
over folders of DICOM studies and writes ``scores.csv``, ``metrics.json``, ``report.html``
and figures. ``--from-node`` reads the node's stored results instead (shadow mode), without
reprocessing. ``--fit-calibration`` also fits a site calibration file (see ``calibrate``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, get_args

from triagenode.cli.common import print_table, settings_from_args
from triagenode.config.settings import Backend


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the calibration fit, shared with ``triagenode calibrate``."""
    parser.add_argument(
        "--method",
        choices=["platt", "temperature", "isotonic"],
        default="platt",
        help="isotonic needs >= 200 labelled studies per finding in the fitting split",
    )
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--target-sensitivity", type=float, metavar="X", help="e.g. 0.95")
    rule.add_argument("--target-ppv", type=float, metavar="X", help="e.g. 0.5")
    rule.add_argument("--youden", action="store_true", help="maximise Youden's J (default)")
    parser.add_argument(
        "--fit-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="share of each finding's labelled studies the fit uses; metrics use the rest",
    )
    parser.add_argument("--name", default="", help="name of the calibration (in every SR)")


def operating_rule(args: argparse.Namespace) -> Any:
    from triagenode.validation.calibration import OperatingRule

    if args.target_sensitivity is not None:
        return OperatingRule("target_sensitivity", args.target_sensitivity)
    if args.target_ppv is not None:
        return OperatingRule("target_ppv", args.target_ppv)
    return OperatingRule("youden")


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        parents=[parent],
        help="measure sensitivity, specificity, PPV, NPV, AUC on labelled studies",
        description="Run the node's pipeline over labelled DICOM studies (or read its stored "
        "results with --from-node) and write scores.csv, metrics.json and report.html.",
    )
    parser.add_argument("data", nargs="*", type=Path, metavar="DATA", help="study folders")
    parser.add_argument("--labels", type=Path, required=True, metavar="LABELS.csv")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--from-node", action="store_true", help="use the node's stored results")
    parser.add_argument("--label-set", metavar="NAME", help="label set for every study")
    parser.add_argument("--demo-model", action="store_true", help="use the built-in demo model")
    parser.add_argument("--backend", choices=get_args(Backend))
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=20261128, help="bootstrap and split seed")
    parser.add_argument("--fit-calibration", action="store_true", help="fit a site calibration")
    add_fit_arguments(parser)
    parser.set_defaults(handler=_evaluate)


def _known_findings(settings: Any, label_set: str | None) -> list[str]:
    sets = settings.labels.sets
    if label_set is not None:
        if label_set not in sets:
            from triagenode.errors import TriageNodeError

            known = ", ".join(sorted(sets))
            raise TriageNodeError(f"label set {label_set!r} is not configured (known: {known})")
        return [label.name for label in sets[label_set].labels]
    return sorted({label.name for s in sets.values() for label in s.labels})


class _Progress:
    """A one-line progress report on stderr: studies done, studies/s and ETA."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = self.last = time.monotonic()
        self.done = 0

    def step(self, force: bool = False) -> None:
        self.done += 0 if force else 1
        now = time.monotonic()
        if not force and now - self.last < 0.5 and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        print(
            f"\r[{bar}] {self.done}/{self.total} studies  {rate:.2f} studies/s  ETA {eta:.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.done / max(elapsed, 1e-9)
        print(
            f"\r{self.done} studies in {elapsed:.1f} s ({rate:.2f} studies/s)" + " " * 30,
            file=sys.stderr,
        )


def _evaluate(args: argparse.Namespace) -> int:
    from triagenode.errors import TriageNodeError
    from triagenode.validation.dataset import read_labels, scan_studies
    from triagenode.validation.evaluate import Evaluation, classify_studies, summary_rows

    overrides: dict[str, Any] = {}
    if args.demo_model:
        overrides["source"] = "demo"
    if args.backend:
        overrides["backend"] = args.backend
    settings = settings_from_args(args, model=overrides)
    labels = read_labels(args.labels, _known_findings(settings, args.label_set))
    model_info: dict[str, str] | None = None
    if args.from_node:
        if args.data:
            raise TriageNodeError("--from-node reads the node's results: give no DATA folders")
        from triagenode.cli.common import open_database
        from triagenode.validation.evaluate import stored_results

        db = open_database(settings)
        try:
            scored = list(stored_results(db))
        finally:
            db.dispose()
        evaluation = Evaluation(args.out, labels, resamples=args.resamples, seed=args.seed)
        for study in scored:
            evaluation.add(study)
    else:
        if not args.data:
            raise TriageNodeError("give DATA folders of DICOM studies (or --from-node)")
        from triagenode.node import build_classifier

        studies, skipped = scan_studies(list(args.data))
        print(
            f"{len(studies)} studies found ({len(skipped)} files not DICOM images)",
            file=sys.stderr,
        )
        classifier = build_classifier(settings)
        identity = classifier.model.identity
        model_info = {
            "name": identity.display_name,
            "weights_sha256": identity.weights_sha256,
            "backend": classifier.backend,
        }
        if classifier.model.warning:
            print(f"triagenode: {classifier.model.warning}", file=sys.stderr)
        evaluation = Evaluation(args.out, labels, resamples=args.resamples, seed=args.seed)
        progress = _Progress(len(studies))
        in_flight = max(2, settings.model.max_batch)
        try:
            for study in classify_studies(
                classifier, studies, settings.model, label_set=args.label_set, in_flight=in_flight
            ):
                evaluation.add(study)
                progress.step()
        finally:
            progress.close()
            if classifier.batcher is not None:
                classifier.batcher.close()
            classifier.encoder.close()
    summary = evaluation.finish(
        fit=args.fit_calibration,
        method=args.method,
        rule=operating_rule(args),
        fit_fraction=args.fit_fraction,
        model=model_info,
        calibration_name=args.name,
    )
    print_table(
        summary_rows(summary),
        ["label_set", "finding", "n", "pos", "auc", "threshold", "sens", "spec", "ppv", "npv"],
    )
    counts = summary["studies"]
    print(
        f"studies: {counts.get('ok', 0)} classified, {counts.get('failed', 0)} failed, "
        f"{counts.get('not_applicable', 0)} not applicable, {counts.get('ignored', 0)} ignored; "
        f"{len(summary['labels_without_study'])} labelled studies not found; "
        f"report: {args.out / 'report.html'}"
    )
    for label_set, info in summary["calibration_files"].items():
        print(f"calibration for {label_set}: {args.out / info['path']} (sha256 {info['sha256']})")
    return 0
