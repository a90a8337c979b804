"""``triagenode calibrate SCORES.csv --out FILE``: fit a site calibration from ``evaluate``.

It reads the ``scores.csv`` that ``evaluate`` wrote (study-level raw logits and labels), so
fitting again with another operating rule needs no reprocessing. The calibration and the
thresholds are fitted on ``--fit-fraction`` of each finding's labelled studies; the metrics
printed are those of the other studies.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

from triagenode.cli.common import print_table
from triagenode.cli.evaluate import add_fit_arguments, operating_rule


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        parents=[parent],
        help="fit a site calibration file from evaluate's scores.csv",
        description="Fit per-finding calibration (Platt or temperature) and thresholds on "
        "labelled scores; write the calibration file that model.calibration loads.",
    )
    parser.add_argument("scores", type=Path, metavar="SCORES.csv")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.json")
    parser.add_argument("--label-set", metavar="NAME", help="only this label set")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=20261128, help="bootstrap and split seed")
    add_fit_arguments(parser)
    parser.set_defaults(handler=_calibrate)


def _calibrate(args: argparse.Namespace) -> int:
    from triagenode.errors import TriageNodeError
    from triagenode.validation.dataset import LabelTable
    from triagenode.validation.evaluate import (
        Evaluation,
        FindingScore,
        ScoredStudy,
        summary_rows,
    )

    studies: dict[str, ScoredStudy] = {}
    truth: dict[str, dict[str, int]] = {}
    try:
        handle = args.scores.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise TriageNodeError(f"{args.scores}: {exc.strerror or exc}") from None
    with handle:
        for row in csv.DictReader(handle):
            if args.label_set and row["label_set"] != args.label_set:
                continue
            study = studies.setdefault(
                row["study_uid"],
                ScoredStudy(
                    row["study_uid"],
                    row["folder"],
                    "ok",
                    label_set=row["label_set"],
                    images=row["images"].split(),
                    weights_sha256=row["weights_sha256"],
                ),
            )
            logit = float(row["logit"]) if row["logit"] else None
            study.findings.append(
                FindingScore(row["finding"], float(row["score"]), logit, float(row["threshold"]))
            )
            if row["label"] != "":
                truth.setdefault(row["study_uid"], {})[row["finding"]] = int(row["label"])
    sets = {s.label_set for s in studies.values()}
    weights = {s.weights_sha256 for s in studies.values()}
    if len(sets) != 1 or len(weights) != 1:
        raise TriageNodeError(
            f"{args.scores}: a calibration is for one label set and one model; found sets "
            f"{sorted(str(s) for s in sets)} and {len(weights)} weights (use --label-set)"
        )
    findings = sorted({f.name for s in studies.values() for f in s.findings})
    table = LabelTable(args.scores, findings, truth)
    with tempfile.TemporaryDirectory() as work:
        evaluation = Evaluation(Path(work), table, resamples=args.resamples, seed=args.seed)
        for study in studies.values():
            evaluation.add(study)
        summary = evaluation.finish(
            fit=True,
            method=args.method,
            rule=operating_rule(args),
            fit_fraction=args.fit_fraction,
            model={"weights_sha256": weights.pop()},
            calibration_name=args.name or args.out.name,
        )
        files = summary["calibration_files"]
        if not files:
            raise TriageNodeError(f"{args.scores}: no finding had labels enough to fit")
        ((label_set, info),) = files.items()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(work) / info["path"], args.out)
    print_table(
        summary_rows(summary),
        ["label_set", "finding", "n", "pos", "auc", "threshold", "sens", "spec", "ppv", "npv"],
    )
    print(f"calibration for {label_set}: {args.out} (sha256 {info['sha256']})")
    return 0
