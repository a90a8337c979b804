"""Validation benchmark: the bootstrap of ``triagenode evaluate`` at the issue's size.

Times :func:`finding_metrics` (point estimates from scikit-learn plus a stratified, seeded
bootstrap) for ``--findings`` findings of ``--studies`` studies with ``--resamples``
resamples each, and checks the goal (under 10 s for 2000 x 1000 x 10).

Usage::

    python benchmarks/validation.py [--studies 1000] [--findings 10] [--resamples 2000]
                                    [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from triagenode.validation.metrics import finding_metrics

GOAL_S = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--findings", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    columns = []
    for index in range(args.findings):
        prevalence = 0.05 + 0.4 * index / max(args.findings - 1, 1)
        y = (rng.random(args.studies) < prevalence).astype(int)
        columns.append((y, 1 / (1 + np.exp(-(rng.normal(size=args.studies) + 1.5 * y)))))
    started = time.perf_counter()
    aucs = []
    for index, (y, s) in enumerate(columns):
        m = finding_metrics(f"finding{index}", y, s, 0.5, resamples=args.resamples, seed=index)
        aucs.append(m.auc.text())
    elapsed = time.perf_counter() - started
    result = {
        "studies": args.studies,
        "findings": args.findings,
        "resamples": args.resamples,
        "seconds": round(elapsed, 3),
        "goal_s": GOAL_S,
        "met": elapsed < GOAL_S,
        "auc_with_ci": aucs,
    }
    print(
        f"bootstrap {args.resamples} resamples x {args.studies} studies x {args.findings} "
        f"findings: {elapsed:.2f} s (goal < {GOAL_S:g} s: {'met' if result['met'] else 'MISSED'})"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
