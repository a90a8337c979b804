"""Drift monitoring: the node's recent scores against the validation-time distribution.

The reference is what ``evaluate`` saw: per label set and finding, the study-level raw logits
(not the calibrated scores, so a new calibration does not read as drift), kept as decile bin
edges with the share of studies in each bin and a sample of 1000 quantiles; and the share of
studies by Modality and Body Part Examined. ``reference.json`` in the evaluation folder and
the calibration file both carry it.

Per finding the report gives the population stability index (PSI, over the reference's
decile bins: ``sum((cur - ref) * ln(cur / ref))``; 0.1 is commonly read as a moderate shift,
0.25 as a large one) and the two-sample Kolmogorov-Smirnov statistic against the reference
sample. The input mix is compared the same way (PSI over categories).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

__all__ = [
    "DriftRow",
    "category_psi",
    "compare",
    "input_shares",
    "psi",
    "reference_distribution",
    "stored_inputs",
    "stored_logits",
]

log = logging.getLogger(__name__)

_EPS = 1e-4  # floor for an empty bin's share, so PSI stays finite
INPUT_KEYS = ("Modality", "BodyPartExamined")


def reference_distribution(logits: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Decile edges, bin shares and a 1000-quantile sample of ``logits``."""
    values = np.asarray(logits, dtype=np.float64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    sample = np.quantile(values, np.linspace(0, 1, min(1000, values.size)))
    return {
        "n": int(values.size),
        "edges": [float(e) for e in edges],
        "shares": [float(c) for c in counts / values.size],
        "sample": [round(float(v), 6) for v in sample],
    }


def psi(reference: dict[str, Any], current: np.ndarray) -> float:
    """Population stability index of ``current`` logits over the reference's bins."""
    edges = np.asarray(reference["edges"], dtype=np.float64)
    expected = np.maximum(np.asarray(reference["shares"], dtype=np.float64), _EPS)
    values = np.asarray(current, dtype=np.float64)
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    actual = np.maximum(counts / max(values.size, 1), _EPS)
    return float(((actual - expected) * np.log(actual / expected)).sum())


def category_psi(reference: dict[str, float], current: dict[str, float]) -> float:
    """PSI over categories (shares that each sum to 1)."""
    keys = set(reference) | set(current)
    total = 0.0
    for key in keys:
        e, a = max(reference.get(key, 0.0), _EPS), max(current.get(key, 0.0), _EPS)
        total += (a - e) * np.log(a / e)
    return float(total)


@dataclass(frozen=True)
class DriftRow:
    """One finding (``label_set/finding``) or input attribute compared with the reference."""

    key: str
    n_reference: int
    n_current: int
    psi: float | None
    ks: float | None
    drifted: bool
    note: str = ""


def compare(
    reference: dict[str, Any],
    current: dict[str, list[float]],
    *,
    psi_limit: float,
    min_studies: int = 30,
    current_inputs: dict[str, dict[str, float]] | None = None,
    inputs_n: int = 0,
) -> list[DriftRow]:
    """Compare current logits (and input mix) with ``reference`` (``reference.json``'s body)."""
    from scipy.stats import ks_2samp

    rows: list[DriftRow] = []
    for key, ref in sorted(reference.get("reference", {}).items()):
        values = np.asarray(current.get(key, []), dtype=np.float64)
        if values.size < min_studies:
            rows.append(
                DriftRow(
                    key,
                    ref["n"],
                    int(values.size),
                    None,
                    None,
                    False,
                    f"fewer than {min_studies} studies in the window",
                )
            )
            continue
        value = psi(ref, values)
        ks = float(ks_2samp(values, np.asarray(ref["sample"])).statistic)
        rows.append(DriftRow(key, ref["n"], int(values.size), value, ks, value > psi_limit))
    for attribute, shares in sorted((reference.get("inputs") or {}).items()):
        now = (current_inputs or {}).get(attribute, {})
        if inputs_n < min_studies:
            continue
        value = category_psi(shares, now)
        rows.append(
            DriftRow(
                f"input:{attribute}",
                reference.get("inputs_n", 0),
                inputs_n,
                value,
                None,
                value > psi_limit,
            )
        )
    return rows


def stored_logits(db: Any, since: datetime) -> dict[str, list[float]]:
    """Raw study logits of the node's results created since ``since``, by ``set/finding``."""
    from sqlalchemy import select

    from triagenode.store.models import Result

    out: dict[str, list[float]] = {}
    with db.session() as session:
        rows = session.execute(
            select(Result.label_set, Result.findings).where(Result.created_at >= since)
        ).all()
    for label_set, data in rows:
        for finding in (data or {}).get("findings", []):
            if finding.get("logit") is not None:
                out.setdefault(f"{label_set}/{finding['name']}", []).append(float(finding["logit"]))
    return out


def stored_inputs(db: Any, since: datetime) -> tuple[dict[str, dict[str, float]], int]:
    """Shares of Modality and Body Part Examined among studies received since ``since``."""
    from sqlalchemy import select

    from triagenode.store.models import Study

    with db.session() as session:
        rows = (
            session.execute(select(Study.triage_inputs).where(Study.last_received_at >= since))
            .scalars()
            .all()
        )
    return input_shares(rows), len(rows)


def input_shares(inputs: Sequence[dict[str, str] | None]) -> dict[str, dict[str, float]]:
    """Share of each value of :data:`INPUT_KEYS` among ``inputs`` (missing: '(none)')."""
    shares: dict[str, dict[str, float]] = {}
    for key in INPUT_KEYS:
        counts = Counter(((i or {}).get(key) or "(none)").upper() for i in inputs)
        total = sum(counts.values()) or 1
        shares[key] = {value: n / total for value, n in counts.items()}
    return shares
