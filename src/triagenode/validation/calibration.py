"""Site calibration: fit per-finding calibration and an operating point on site data.

What is fitted on: the study-level **raw logit** of each finding, i.e. the label set's
aggregation rule (max, or mean of the top k) applied to the images' uncalibrated logits
(``LabelFinding.logit``). For ``max`` aggregation this is exact: the node calibrates each
image's logit and then aggregates, and a monotone calibration commutes with the maximum, so
the node's study score equals the fitted calibration of the study logit. For ``mean_top_k``
it is close but not identical (the mean of calibrated image scores is not the calibration of
the mean logit); the report says so.

Methods: Platt scaling (logistic regression of the label on the logit: two parameters),
temperature scaling (one parameter, keeps the raw decision boundary at logit 0), and
isotonic regression (monotone steps, interpolated; needs many studies: the CLI asks for at
least ``ISOTONIC_MIN_STUDIES`` labelled studies in the fitting split). The operating
point is chosen on the calibrated scores of the same fitting split, by one rule: a target
sensitivity, Youden's J, or a target PPV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from triagenode.config.labels import Calibration
from triagenode.errors import TriageNodeError

ISOTONIC_MIN_STUDIES = 200

__all__ = [
    "ISOTONIC_MIN_STUDIES",
    "FittedFinding",
    "OperatingRule",
    "choose_threshold",
    "fit_finding",
    "fit_isotonic",
    "fit_platt",
    "fit_temperature",
    "stratified_split",
]


@dataclass(frozen=True)
class OperatingRule:
    """How to choose a finding's threshold: ``target_sensitivity``, ``youden`` or ``target_ppv``."""

    kind: str = "youden"
    target: float | None = None

    def describe(self) -> str:
        if self.kind == "target_sensitivity":
            return f"sensitivity >= {self.target:g}"
        if self.kind == "target_ppv":
            return f"PPV >= {self.target:g}"
        return "Youden's J (sensitivity + specificity - 1) maximal"


@dataclass(frozen=True)
class FittedFinding:
    """A finding's fitted calibration and threshold, with what they were fitted on."""

    finding: str
    calibration: Calibration
    threshold: float
    rule: str
    n: int
    positives: int
    temperature: float
    platt_slope: float
    platt_intercept: float


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of a logistic regression of ``labels`` on ``logits``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1e6, max_iter=1000)
    model.fit(np.asarray(logits, dtype=np.float64).reshape(-1, 1), np.asarray(labels))
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` minimising the log loss of ``sigmoid(logit / T)``."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)

    def loss(log_t: float) -> float:
        p = np.clip(_sigmoid(z / math.exp(log_t)), 1e-12, 1 - 1e-12)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    found = minimize_scalar(loss, bounds=(-7.0, 7.0), method="bounded")
    return float(math.exp(found.x))


def fit_isotonic(logits: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    """Breakpoints (logit, score) of an isotonic regression of ``labels`` on ``logits``."""
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    model.fit(np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64))
    pairs = zip(model.X_thresholds_, model.y_thresholds_, strict=True)
    return [(float(x), float(y)) for x, y in pairs]


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: OperatingRule) -> float:
    """The score threshold (present at or above it) that ``rule`` picks on these data."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if rule.kind == "target_ppv":
        precision, _recall, thresholds = precision_recall_curve(y, s)
        # the lowest threshold (most sensitive) whose PPV reaches the target
        good = np.flatnonzero(precision[:-1] >= float(rule.target or 0))
        if good.size == 0:
            return float(min(1.0, s.max() + 1e-6))
        return float(thresholds[good[0]])
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule.kind == "target_sensitivity":
        reach = np.flatnonzero(tpr >= float(rule.target or 0))
        return float(thresholds[reach[0]]) if reach.size else float(thresholds[-1])
    return float(thresholds[int(np.argmax(tpr - fpr))])


def fit_finding(
    finding: str,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    method: str,
    rule: OperatingRule,
    name: str,
) -> FittedFinding:
    """Fit Platt and temperature scaling on one finding and keep ``method``'s calibration.

    Raises
    ------
    TriageNodeError
        When the data hold only one class (nothing to fit).
    """
    y = np.asarray(labels, dtype=np.int64)
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        raise TriageNodeError(
            f"{finding}: cannot fit a calibration on {y.size} studies of one class "
            f"({positives} positive)"
        )
    if method == "isotonic" and y.size < ISOTONIC_MIN_STUDIES:
        raise TriageNodeError(
            f"{finding}: isotonic calibration needs at least {ISOTONIC_MIN_STUDIES} studies "
            f"in the fitting split ({y.size} given); use platt or temperature"
        )
    slope, intercept = fit_platt(logits, y)
    temperature = fit_temperature(logits, y)
    if method == "isotonic":
        calibration = Calibration(method="isotonic", breakpoints=fit_isotonic(logits, y), name=name)
    elif method == "platt":
        calibration = Calibration(method="platt", slope=slope, intercept=intercept, name=name)
    else:
        calibration = Calibration(method="temperature", temperature=temperature, name=name)
    scores = calibration.apply(np.asarray(logits, dtype=np.float32)).astype(np.float64)
    threshold = min(1.0, max(0.0, choose_threshold(y, scores, rule)))
    return FittedFinding(
        finding=finding,
        calibration=calibration,
        threshold=threshold,
        rule=rule.describe(),
        n=int(y.size),
        positives=positives,
        temperature=temperature,
        platt_slope=slope,
        platt_intercept=intercept,
    )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (fit, report) splitting each class at ``fraction``, seeded."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fit = np.zeros(y.size, dtype=bool)
    for value in (0, 1):
        members = np.flatnonzero(y == value)
        rng.shuffle(members)
        fit[members[: round(len(members) * fraction)]] = True
    return fit, ~fit
