"""The synthetic labelled CR set behind ``docs/validation-report.png``.

200 one-image CR studies; each finding's label is a noisy function of the demo model's own
study logit (positives: the top 20 % of logit + noise), so AUCs are middling, as on real data,
rather than perfect. Writes ``OUT/data`` and ``OUT/labels.csv``; then::

    triagenode evaluate OUT/data --labels OUT/labels.csv --out OUT/report --demo-model \\
        --fit-calibration --target-sensitivity 0.9

Usage: ``PYTHONPATH=src:. python benchmarks/validation_demo.py [OUT]`` (default
/tmp/demo_report).
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
from tests.factory import cr_image, write

from triagenode.config.settings import load_settings
from triagenode.node import build_classifier
from triagenode.validation.dataset import scan_studies
from triagenode.validation.evaluate import classify_studies


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/demo_report")
    data = root / "data"
    shutil.rmtree(data, ignore_errors=True)
    for index in range(200):
        write(cr_image(size=128, seed=index), data / f"case{index:03d}" / "image.dcm")
    settings = load_settings(None, node={"data_dir": str(root / "node")}, model={"source": "demo"})
    classifier = build_classifier(settings)
    studies, _ = scan_studies([data])
    scored = list(classify_studies(classifier, studies, settings.model))
    classifier.batcher.close()
    rng = np.random.default_rng(5)
    names = [f.name for f in scored[0].findings]
    labels: dict[str, dict[str, int]] = {s.folder: {} for s in scored}
    for column, name in enumerate(names):
        z = np.array([s.findings[column].logit for s in scored], dtype=float)
        z = (z - z.mean()) / z.std()
        noisy = z + rng.normal(0, 0.8 if column < 3 else 3.0, z.size)
        cut = np.quantile(noisy, 0.8)
        for study, value in zip(scored, noisy, strict=True):
            labels[study.folder][name] = int(value > cut)
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["folder", *names])
        for folder, values in sorted(labels.items()):
            writer.writerow([folder, *(values[n] for n in names)])


if __name__ == "__main__":
    main()
