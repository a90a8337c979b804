"""Validation benchmark: the bootstrap of ``triagenode evaluate`` at the issue's size.

Times :func:`finding_metrics` (point estimates from scikit-learn plus a stratified, seeded
bootstrap) for ``--findings`` findings of ``--studies`` studies with ``--resamples``
resamples each, and checks the goal (under 10 s for 2000 x 1000 x 10).

With ``--evaluate N`` it also writes N one-image CR studies (512 x 512, 12-bit) and times
``evaluate``'s classification of them (header scan, selection, preprocessing, the backend
of ``--backend``, aggregation: no quiet periods, no database, no SRs) with the demo model,
printing studies/s.

Usage::

    python benchmarks/validation.py [--studies 1000] [--findings 10] [--resamples 2000]
                                    [--evaluate 100 --backend torch|onnxruntime]
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
    parser.add_argument("--evaluate", type=int, default=0, metavar="N")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
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
    if args.evaluate:
        result["evaluate"] = _evaluate(args.evaluate, args.backend)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["met"] else 1


def _evaluate(count: int, backend: str) -> dict[str, object]:
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.factory import cr_image, write

    from triagenode.config.settings import load_settings
    from triagenode.node import build_classifier
    from triagenode.validation.dataset import scan_studies
    from triagenode.validation.evaluate import classify_studies

    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        for index in range(count):
            write(cr_image(size=512, seed=index), root / "data" / f"{index:04d}" / "cr.dcm")
        settings = load_settings(
            None,
            node={"data_dir": str(root / "node")},
            model={"source": "demo", "backend": backend, "device": "cpu"},
        )
        if backend == "onnxruntime":
            from triagenode.cli import main as cli

            config = root / "triagenode.toml"
            config.write_text(f'[node]\ndata_dir = "{root / "node"}"\n[model]\nsource = "demo"\n')
            cli(["optimize", "export-onnx", "--config", str(config)])
        classifier = build_classifier(settings)
        started = time.perf_counter()
        studies, _ = scan_studies([root / "data"])
        scanned = time.perf_counter() - started
        done = sum(
            1
            for s in classify_studies(
                classifier, studies, settings.model, in_flight=settings.model.max_batch
            )
            if s.status == "ok"
        )
        elapsed = time.perf_counter() - started
        if classifier.batcher is not None:
            classifier.batcher.close()
    rate = done / elapsed
    print(
        f"evaluate: {done}/{count} CR studies in {elapsed:.2f} s ({rate:.1f} studies/s, "
        f"header scan {scanned:.2f} s), backend {classifier.backend}, demo model"
    )
    return {
        "studies": done,
        "seconds": round(elapsed, 3),
        "studies_per_s": round(rate, 2),
        "backend": classifier.backend,
    }


if __name__ == "__main__":
    raise SystemExit(main())
