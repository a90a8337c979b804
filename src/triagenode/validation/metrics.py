"""Per-finding diagnostic accuracy with stratified bootstrap confidence intervals.

Point estimates come from scikit-learn (``roc_auc_score``, ``confusion_matrix``). The
bootstrap resamples positives and negatives separately (stratified: every resample keeps the
study set's prevalence, so PPV and NPV stay defined), with a seeded generator, and is
vectorised: the resampled indices are drawn once as a ``(resamples, n)`` matrix per class,
turned into per-study counts, and every metric of every resample is then a matrix product.
The AUC of a resample is the weighted share of (positive, negative) pairs ranked correctly,
ties counting half, computed from cumulative negative counts at each positive's rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["FindingMetrics", "Interval", "bootstrap_counts", "finding_metrics"]

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 20261128
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval; None where undefined."""

    value: float | None
    low: float | None = None
    high: float | None = None

    def text(self, digits: int = 3) -> str:
        if self.value is None:
            return "undefined"
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


@dataclass(frozen=True)
class FindingMetrics:
    """What ``metrics.json`` says about one finding."""

    finding: str
    n: int
    positives: int
    negatives: int
    prevalence: float | None
    threshold: float
    auc: Interval
    sensitivity: Interval
    specificity: Interval
    ppv: Interval
    npv: Interval
    confusion: dict[str, int]  # tp, fp, tn, fn at the threshold
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` items is drawn in each resample: ``(resamples, n)`` ints.

    The indices are drawn once as one matrix; a single ``bincount`` over row-offset indices
    turns them into counts.
    """
    if n == 0:
        return np.zeros((resamples, 0), dtype=np.int64)
    draws = rng.integers(0, n, size=(resamples, n))
    offsets = np.arange(resamples, dtype=np.int64)[:, None] * n
    return np.bincount((draws + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _interval(value: float | None, samples: np.ndarray | None) -> Interval:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Interval(None)
    if samples is None:
        return Interval(float(value))
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return Interval(float(value))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(value), float(low), float(high))


def _bootstrap_auc(
    pos: np.ndarray, neg: np.ndarray, count_pos: np.ndarray, count_neg: np.ndarray
) -> np.ndarray:
    """AUC of every resample from per-item counts, ties counting half."""
    order = np.argsort(neg, kind="stable")
    sorted_neg = neg[order]
    cumulative = np.concatenate(
        [np.zeros((count_neg.shape[0], 1)), np.cumsum(count_neg[:, order], axis=1)], axis=1
    )
    below = np.searchsorted(sorted_neg, pos, side="left")
    at_or_below = np.searchsorted(sorted_neg, pos, side="right")
    wins = cumulative[:, below] + 0.5 * (cumulative[:, at_or_below] - cumulative[:, below])
    return np.asarray((wins * count_pos).sum(axis=1) / (len(pos) * len(neg)))


def finding_metrics(
    finding: str,
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> FindingMetrics:
    """Accuracy of one finding's scores against 0/1 labels at ``threshold`` (score >= it).

    A finding without positives or without negatives has no AUC (and no sensitivity or
    no specificity): those are reported as undefined with a note, never as a number.
    """
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n = int(y.size)
    positives = int(y.sum())
    negatives = n - positives
    notes: list[str] = []
    predicted = (s >= threshold).astype(np.int64)
    if n:
        tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    else:
        tn = fp = fn = tp = 0
    if positives == 0:
        notes.append("no positive studies: AUC and sensitivity are undefined")
    if negatives == 0:
        notes.append("no negative studies: AUC and specificity are undefined")
    auc = float(roc_auc_score(y, s)) if positives and negatives else None

    def point(num: int, den: int) -> float | None:
        return num / den if den else None

    sens, spec = point(tp, tp + fn), point(tn, tn + fp)
    ppv, npv = point(tp, tp + fp), point(tn, tn + fn)
    if tp + fp == 0 and n:
        notes.append("no study at or above the threshold: PPV is undefined")
    samples: dict[str, np.ndarray | None] = dict.fromkeys(("auc", "sens", "spec", "ppv", "npv"))
    if n and resamples > 0:
        rng = np.random.default_rng(seed)
        pos, neg = s[y == 1], s[y == 0]
        count_pos = bootstrap_counts(len(pos), resamples, rng)
        count_neg = bootstrap_counts(len(neg), resamples, rng)
        tp_b = count_pos @ (pos >= threshold).astype(np.int64)
        fn_b = len(pos) - tp_b
        fp_b = count_neg @ (neg >= threshold).astype(np.int64)
        tn_b = len(neg) - fp_b
        samples["sens"] = _ratio(tp_b, tp_b + fn_b)
        samples["spec"] = _ratio(tn_b, tn_b + fp_b)
        samples["ppv"] = _ratio(tp_b, tp_b + fp_b)
        samples["npv"] = _ratio(tn_b, tn_b + fn_b)
        if positives and negatives:
            samples["auc"] = _bootstrap_auc(pos, neg, count_pos, count_neg)
    return FindingMetrics(
        finding=finding,
        n=n,
        positives=positives,
        negatives=negatives,
        prevalence=positives / n if n else None,
        threshold=float(threshold),
        auc=_interval(auc, samples["auc"]),
        sensitivity=_interval(sens, samples["sens"]),
        specificity=_interval(spec, samples["spec"]),
        ppv=_interval(ppv, samples["ppv"]),
        npv=_interval(npv, samples["npv"]),
        confusion={"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        notes=notes,
    )
