"""``evaluate``: run the node's pipeline over labelled studies and measure it.

Studies are classified exactly as ``serve`` classifies them (:func:`plan_study` for the label
set and the images, :meth:`ZeroShotClassifier.classify_study` for preprocessing, the backend,
calibration and aggregation), minus the quiet periods, the database and the SRs. A few
studies are in flight at a time so the batcher fills its batches across studies; each
study's rows go to ``scores.csv`` as soon as it is done, so memory does not grow with the
number of images. Only the per-study numbers are kept for the metrics.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.errors import TriageNodeError
from triagenode.validation.calibration import (
    FittedFinding,
    OperatingRule,
    fit_finding,
    stratified_split,
)
from triagenode.validation.dataset import LabelTable
from triagenode.validation.metrics import DEFAULT_RESAMPLES, DEFAULT_SEED, finding_metrics
from triagenode.validation.scoring import (
    FindingScore,
    ScoredStudy,
    classify_studies,
    stored_results,
)

__all__ = [
    "SCORE_COLUMNS",
    "Evaluation",
    "FindingScore",
    "ScoredStudy",
    "classify_studies",
    "stored_results",
]

SCORE_COLUMNS = (
    "study_uid",
    "folder",
    "label_set",
    "finding",
    "score",
    "logit",
    "threshold",
    "label",
    "images_used",
    "images",
    "weights_sha256",
)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass
class _Column:
    """What is kept per (label set, finding): labelled studies only."""

    studies: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    logits: list[float] = field(default_factory=list)
    thresholds: set[float] = field(default_factory=set)


class Evaluation:
    """Collects scored studies against a label table and writes the outputs.

    Parameters
    ----------
    out_dir
        Where ``scores.csv``, ``metrics.json``, figures and ``report.html`` go.
    labels
        The reference labels.
    resamples, seed
        The bootstrap.
    """

    def __init__(
        self,
        out_dir: Path,
        labels: LabelTable,
        *,
        resamples: int = DEFAULT_RESAMPLES,
        seed: int = DEFAULT_SEED,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.labels = labels
        self.resamples = resamples
        self.seed = seed
        self.counts: dict[str, int] = {"ok": 0, "failed": 0, "not_applicable": 0, "ignored": 0}
        self.problems: dict[str, list[dict[str, str]]] = {
            "failed": [],
            "not_applicable": [],
            "ignored": [],
        }
        self.columns: dict[tuple[str, str], _Column] = {}
        # every classified study's raw logit (labelled or not): the drift reference
        self.all_logits: dict[tuple[str, str], list[float]] = {}
        self.inputs: list[dict[str, str]] = []
        self.matched_keys: set[str] = set()
        self.weights: set[str] = set()
        self._handle = (self.out_dir / "scores.csv").open("w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._handle, SCORE_COLUMNS)
        self._csv.writeheader()

    def add(self, study: ScoredStudy) -> None:
        """Record one study's outcome and write its rows to ``scores.csv``."""
        self.counts[study.status] = self.counts.get(study.status, 0) + 1
        key, truth = self.labels.for_study(study.study_uid, study.folder)
        if key is not None:
            self.matched_keys.add(key)
        if study.status != "ok":
            self.problems.setdefault(study.status, []).append(
                {"study_uid": study.study_uid, "folder": study.folder, "reason": study.reason}
            )
            return
        assert study.label_set is not None
        self.weights.add(study.weights_sha256)
        if study.inputs:
            self.inputs.append(study.inputs)
        images = " ".join(study.images)
        for finding in study.findings:
            label = truth.get(finding.name)
            if finding.logit is not None:
                self.all_logits.setdefault((study.label_set, finding.name), []).append(
                    finding.logit
                )
            self._csv.writerow(
                {
                    "study_uid": study.study_uid,
                    "folder": study.folder,
                    "label_set": study.label_set,
                    "finding": finding.name,
                    "score": f"{finding.score:.6f}",
                    "logit": "" if finding.logit is None else f"{finding.logit:.6f}",
                    "threshold": f"{finding.threshold:g}",
                    "label": "" if label is None else label,
                    "images_used": len(study.images),
                    "images": images,
                    "weights_sha256": study.weights_sha256,
                }
            )
            if label is None:
                continue
            column = self.columns.setdefault((study.label_set, finding.name), _Column())
            column.studies.append(study.study_uid)
            column.labels.append(int(label))
            column.scores.append(finding.score)
            column.logits.append(math.nan if finding.logit is None else finding.logit)
            column.thresholds.add(finding.threshold)
        self._handle.flush()

    # Results ----------------------------------------------------------------------------

    def _data_sha256(self, label_set: str) -> str:
        digest = hashlib.sha256()
        for (name, finding), column in sorted(self.columns.items()):
            if name != label_set:
                continue
            for uid, label, logit in sorted(
                zip(column.studies, column.labels, column.logits, strict=True)
            ):
                digest.update(f"{uid},{finding},{label},{logit:.6f}\n".encode())
        return digest.hexdigest()

    def finish(
        self,
        *,
        fit: bool = False,
        method: str = "platt",
        rule: OperatingRule | None = None,
        fit_fraction: float = 0.5,
        model: dict[str, str] | None = None,
        calibration_name: str = "",
    ) -> dict[str, Any]:
        """Compute the metrics (and fit the calibration), write every output, return metrics.

        With ``fit``, each finding's labelled studies are split (stratified, seeded): the
        calibration and the threshold are fitted on ``fit_fraction`` of them and the metrics
        reported on the rest, with the fitted calibration and threshold.
        """
        from triagenode.validation.calibration_file import write_calibration
        from triagenode.validation.report import write_report

        self._handle.close()
        rule = rule or OperatingRule()
        findings: list[dict[str, Any]] = []
        figures: list[dict[str, Any]] = []
        fitted_by_set: dict[str, dict[str, FittedFinding]] = {}
        for (label_set, finding), column in sorted(self.columns.items()):
            y = np.asarray(column.labels, dtype=np.int64)
            scores = np.asarray(column.scores, dtype=np.float64)
            logits = np.asarray(column.logits, dtype=np.float64)
            threshold = max(column.thresholds) if column.thresholds else 0.5
            entry: dict[str, Any] = {"label_set": label_set, "operating_point": "label threshold"}
            report_mask = np.ones(y.size, dtype=bool)
            after: np.ndarray | None = None
            if fit:
                problem = None
                if np.isnan(logits).any():
                    problem = "no raw logits stored (results from before logits were recorded)"
                elif y.sum() < 2 or (y.size - y.sum()) < 2:
                    problem = "fewer than 2 positives or 2 negatives: nothing to fit"
                if problem is None:
                    fit_mask, report_mask = stratified_split(y, fit_fraction, self.seed)
                    try:
                        fitted = fit_finding(
                            finding,
                            logits[fit_mask],
                            y[fit_mask],
                            method=method,
                            rule=rule,
                            name=calibration_name,
                        )
                    except TriageNodeError as exc:
                        problem = str(exc)
                        report_mask = np.ones(y.size, dtype=bool)
                    else:
                        fitted_by_set.setdefault(label_set, {})[finding] = fitted
                        after = fitted.calibration.apply(logits.astype(np.float32)).astype(float)
                        scores, threshold = after, fitted.threshold
                        entry["operating_point"] = (
                            f"fitted on {int(fit_mask.sum())} studies ({rule.describe()})"
                        )
                        entry["calibration"] = {
                            "method": fitted.calibration.method,
                            "describe": fitted.calibration.describe(),
                            "platt": [fitted.platt_slope, fitted.platt_intercept],
                            "temperature": fitted.temperature,
                        }
                if problem is not None:
                    entry["calibration_not_fitted"] = problem
            metrics = finding_metrics(
                finding,
                y[report_mask],
                scores[report_mask],
                threshold,
                resamples=self.resamples,
                seed=self.seed,
            )
            entry.update(metrics.to_json())
            entry["evaluated_on"] = (
                "all labelled studies" if report_mask.all() else "held-out studies (not fitted on)"
            )
            findings.append(entry)
            raw = _sigmoid(logits[report_mask]) if not np.isnan(logits).any() else None
            figures.append(
                {
                    "label_set": label_set,
                    "finding": finding,
                    "labels": y[report_mask],
                    "scores": scores[report_mask],
                    "raw_scores": raw,
                    "threshold": threshold,
                    "calibrated_label": "site calibration (fitted)"
                    if after is not None
                    else "node scores",
                }
            )
        from triagenode.validation.drift import input_shares, reference_distribution

        reference = {
            f"{label_set}/{finding}": reference_distribution(np.asarray(values))
            for (label_set, finding), values in sorted(self.all_logits.items())
            if len(values) >= 2
        }
        (self.out_dir / "reference.json").write_text(
            json.dumps(
                {
                    "reference": reference,
                    "inputs": input_shares(self.inputs) if self.inputs else {},
                    "inputs_n": len(self.inputs),
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        calibration_files = {}
        for label_set, fitted_set in fitted_by_set.items():
            path = self.out_dir / f"calibration-{label_set}.json"
            sha = write_calibration(
                path,
                {
                    "name": calibration_name or path.name,
                    "label_set": label_set,
                    "model": model or {"weights_sha256": next(iter(self.weights), "")},
                    "data_sha256": self._data_sha256(label_set),
                    "method": method,
                    "operating_rule": rule.describe(),
                    "fit_fraction": fit_fraction,
                    "seed": self.seed,
                    "fitted_on": "study-level raw logit (aggregation rule over image logits)",
                    "reference": {
                        key: value
                        for key, value in reference.items()
                        if key.startswith(f"{label_set}/")
                    },
                    "inputs": input_shares(self.inputs) if self.inputs else {},
                    "inputs_n": len(self.inputs),
                    "findings": {
                        name: {
                            "method": f.calibration.method,
                            "slope": f.calibration.slope,
                            "intercept": f.calibration.intercept,
                            "temperature": f.calibration.temperature,
                            "breakpoints": [list(b) for b in f.calibration.breakpoints],
                            "threshold": f.threshold,
                            "rule": f.rule,
                            "n": f.n,
                            "positives": f.positives,
                        }
                        for name, f in fitted_set.items()
                    },
                },
            )
            calibration_files[label_set] = {"path": path.name, "sha256": sha}
        unmatched = sorted(set(self.labels.labels) - self.matched_keys)
        summary: dict[str, Any] = {
            "studies": dict(self.counts),
            "labels_file": str(self.labels.path),
            "labels_without_study": unmatched,
            "failed": self.problems.get("failed", []),
            "not_applicable": self.problems.get("not_applicable", []),
            "ignored": self.problems.get("ignored", []),
            "model": model or {"weights_sha256": sorted(self.weights)},
            "bootstrap": {"resamples": self.resamples, "seed": self.seed, "stratified": True},
            "calibration_files": calibration_files,
            "findings": findings,
        }
        (self.out_dir / "metrics.json").write_text(
            json.dumps(summary, indent=2, default=float) + "\n", encoding="utf-8"
        )
        write_report(self.out_dir, summary, figures)
        return summary


def summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per finding for the terminal table."""

    def text(item: dict[str, Any]) -> str:
        if item.get("value") is None:
            return "undefined"
        return f"{item['value']:.3f}"

    return [
        {
            "label_set": f["label_set"],
            "finding": f["finding"],
            "n": f["n"],
            "pos": f["positives"],
            "auc": text(f["auc"]),
            "threshold": f"{f['threshold']:.3f}",
            "sens": text(f["sensitivity"]),
            "spec": text(f["specificity"]),
            "ppv": text(f["ppv"]),
            "npv": text(f["npv"]),
        }
        for f in summary["findings"]
    ]
