"""Local validation: ``evaluate`` on a synthetic labelled set whose answers are known in
advance, metrics checked against scikit-learn from ``scores.csv``, degenerate inputs, and the
site calibration round trip (fit, load through settings, refuse other weights, named in SR)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from tests.factory import cr_image, ct_slice, write
from triagenode.cli import main
from triagenode.config.settings import load_settings
from triagenode.errors import ConfigError, TriageNodeError
from triagenode.validation.dataset import read_labels, scan_studies
from triagenode.validation.metrics import bootstrap_counts, finding_metrics

LABELS = {
    "sets": {
        "synthetic": {
            "aggregation": "max",
            "labels": [
                {
                    "name": "disc",
                    "code": {"scheme": "99TEST", "value": "1", "meaning": "disc"},
                    "prompts": ["a bright disc"],
                    "absent_prompts": ["no bright disc"],
                },
                {
                    "name": "texture",
                    "code": {"scheme": "99TEST", "value": "2", "meaning": "texture"},
                    "prompts": ["a coarse texture"],
                    "absent_prompts": ["a smooth texture"],
                },
            ],
        }
    },
    "domains": [{"label_set": "synthetic", "modalities": ["CR"]}],
}
# Ascending order of the texture score: positives at ranks 6 and 9..15 of 16, so 62 of
# the 64 (positive, negative) pairs are ranked right: AUC 0.96875, known before the run.
TEXTURE_PATTERN = [0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1]


def test_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y
    m = finding_metrics("x", y, s, 0.5, resamples=500, seed=1)
    tn, fp, fn, tp = confusion_matrix(y, s >= 0.5).ravel()
    assert m.auc.value == pytest.approx(roc_auc_score(y, s))
    assert m.sensitivity.value == pytest.approx(tp / (tp + fn))
    assert m.specificity.value == pytest.approx(tn / (tn + fp))
    assert m.ppv.value == pytest.approx(tp / (tp + fp))
    assert m.npv.value == pytest.approx(tn / (tn + fn))
    for interval in (m.auc, m.sensitivity, m.specificity, m.ppv, m.npv):
        assert interval.low is not None and interval.high is not None
        assert interval.low <= interval.value <= interval.high
    # same seed, same intervals
    assert finding_metrics("x", y, s, 0.5, resamples=500, seed=1) == m


def test_bootstrap_auc_of_a_resample_is_scikit_learns_weighted_auc() -> None:
    from triagenode.validation.metrics import _bootstrap_auc

    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1, 1, 40), 1)  # rounded: ties count half
    neg = np.round(rng.normal(0, 1, 60), 1)
    cp = bootstrap_counts(40, 5, rng)
    cn = bootstrap_counts(60, 5, rng)
    assert (cp.sum(axis=1) == 40).all() and (cn.sum(axis=1) == 60).all()
    aucs = _bootstrap_auc(pos, neg, cp, cn)
    for row in range(5):
        y = np.r_[np.ones(40), np.zeros(60)]
        weights = np.r_[cp[row], cn[row]]
        expected = roc_auc_score(y, np.r_[pos, neg], sample_weight=weights)
        assert aucs[row] == pytest.approx(expected)


def test_a_finding_without_positives_has_no_auc_and_says_so() -> None:
    m = finding_metrics("x", np.zeros(20), np.linspace(0, 1, 20), 0.5, resamples=100)
    assert m.auc.value is None and m.sensitivity.value is None
    assert any("no positive" in note for note in m.notes)
    assert m.specificity.value == pytest.approx(0.5)


def test_labels_csv_with_unknown_finding_columns_names_them(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("StudyInstanceUID,disc,tumour,edema\n1.2.3,1,0,\n")
    with pytest.raises(TriageNodeError, match="'tumour', 'edema'"):
        read_labels(path, ["disc", "texture"])
    path.write_text("study,disc\n1.2.3,yes\n")
    with pytest.raises(TriageNodeError, match="line 2, column 'disc'"):
        read_labels(path, ["disc"])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """16 CR studies scored once by the demo model; labels designed from their order."""
    from triagenode.node import build_classifier
    from triagenode.validation.evaluate import classify_studies

    root = tmp_path_factory.mktemp("synthetic")
    data = root / "data"
    for index in range(16):
        write(cr_image(size=64, seed=index), data / f"case{index:02d}" / "image.dcm")
    settings = load_settings(
        None, node={"data_dir": str(root / "node")}, model={"source": "demo"}, labels=LABELS
    )
    classifier = build_classifier(settings)
    studies, _ = scan_studies([data])
    scored = {s.folder: s for s in classify_studies(classifier, studies, settings.model)}
    classifier.batcher.close()
    scores = {
        name: sorted(scored, key=lambda f, i=i: scored[f].findings[i].score)
        for i, name in enumerate(("disc", "texture"))
    }

    def score(folder: str, finding: int) -> float:
        return scored[folder].findings[finding].score

    disc_order, texture_order = scores["disc"], scores["texture"]
    labels = {f: {"disc": int(rank >= 8)} for rank, f in enumerate(disc_order)}
    for rank, folder in enumerate(texture_order):
        labels[folder]["texture"] = TEXTURE_PATTERN[rank]
    thresholds = {
        "disc": (score(disc_order[7], 0) + score(disc_order[8], 0)) / 2,
        "texture": (score(texture_order[8], 1) + score(texture_order[9], 1)) / 2,
    }
    # degenerate cases: an undecodable study, one no rule fits, a missing study, blanks
    broken = cr_image(size=64, seed=99)
    broken.PixelData = b"\x00" * 10
    write(broken, data / "broken" / "image.dcm")
    write(ct_slice("1.2.826.0.1.3680043.8.498.777", "1.2.3.4.5", 0), data / "head" / "ct.dcm")
    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["folder", "disc", "texture"])
        for folder, values in sorted(labels.items()):
            writer.writerow([folder, values["disc"], values["texture"]])
        writer.writerow(["missing-study", 1, 0])
        writer.writerow(["broken", "", 1])
    config = root / "triagenode.toml"
    sets = json.loads(json.dumps(LABELS))
    for label in sets["sets"]["synthetic"]["labels"]:
        label["threshold"] = thresholds[label["name"]]
    config.write_text(_toml(settings_dir=root / "node", labels=sets))
    return {
        "root": root,
        "data": data,
        "labels_csv": labels_csv,
        "config": config,
        "thresholds": thresholds,
        "weights": classifier.model.identity.weights_sha256,
        "scored": scored,
    }


def _toml(settings_dir: Path, labels: dict[str, Any]) -> str:
    lines = [f'[node]\ndata_dir = "{settings_dir}"', '[model]\nsource = "demo"']
    for name, s in labels["sets"].items():
        lines.append(f'[labels.sets.{name}]\naggregation = "{s["aggregation"]}"')
        for label in s["labels"]:
            lines.append(f"[[labels.sets.{name}.labels]]")
            lines.append(f'name = "{label["name"]}"')
            lines.append(f"prompts = {json.dumps(label['prompts'])}")
            lines.append(f"absent_prompts = {json.dumps(label['absent_prompts'])}")
            lines.append(f"threshold = {label.get('threshold', 0.5)!r}")
            code = label["code"]
            lines.append(
                f'code = {{scheme = "{code["scheme"]}", value = "{code["value"]}", '
                f'meaning = "{code["meaning"]}"}}'
            )
    for rule in labels["domains"]:
        lines.append("[[labels.domains]]")
        lines.append(f'label_set = "{rule["label_set"]}"')
        lines.append(f"modalities = {json.dumps(rule['modalities'])}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def evaluated(synthetic: dict[str, Any]) -> dict[str, Any]:
    out = synthetic["root"] / "eval"
    code = main(
        [
            "evaluate",
            str(synthetic["data"]),
            "--labels",
            str(synthetic["labels_csv"]),
            "--out",
            str(out),
            "--config",
            str(synthetic["config"]),
            "--resamples",
            "500",
        ]
    )
    assert code == 0
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text())}


def test_evaluate_reproduces_the_designed_auc_and_operating_point(
    evaluated: dict[str, Any],
) -> None:
    findings = {f["finding"]: f for f in evaluated["metrics"]["findings"]}
    disc, texture = findings["disc"], findings["texture"]
    assert disc["n"] == 16 and disc["positives"] == 8
    assert disc["auc"]["value"] == pytest.approx(1.0)
    assert disc["sensitivity"]["value"] == 1.0 and disc["specificity"]["value"] == 1.0
    assert texture["auc"]["value"] == pytest.approx(62 / 64)
    assert texture["confusion"] == {"tp": 7, "fp": 0, "tn": 8, "fn": 1}
    assert texture["sensitivity"]["value"] == pytest.approx(7 / 8)
    assert texture["npv"]["value"] == pytest.approx(8 / 9)
    assert texture["ppv"]["value"] == 1.0
    low, high = texture["sensitivity"]["low"], texture["sensitivity"]["high"]
    assert low < 7 / 8 <= high


def test_metrics_json_recomputed_from_scores_csv_with_scikit_learn(
    evaluated: dict[str, Any],
) -> None:
    with (evaluated["out"] / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["finding"] for r in rows} == {"disc", "texture"}
    assert all(int(r["images_used"]) == 1 and r["images"] for r in rows)
    for entry in evaluated["metrics"]["findings"]:
        mine = [r for r in rows if r["finding"] == entry["finding"] and r["label"] != ""]
        y = np.array([int(r["label"]) for r in mine])
        s = np.array([float(r["score"]) for r in mine])
        assert entry["n"] == len(mine)
        assert entry["auc"]["value"] == pytest.approx(roc_auc_score(y, s))
        tn, fp, fn, tp = confusion_matrix(y, s >= entry["threshold"]).ravel()
        assert entry["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
        assert entry["prevalence"] == pytest.approx(y.mean())


def test_evaluate_lists_failed_missing_and_not_applicable_studies(
    evaluated: dict[str, Any],
) -> None:
    metrics = evaluated["metrics"]
    assert metrics["studies"]["ok"] == 16
    assert [f["folder"] for f in metrics["failed"]] == ["broken"]
    assert [f["folder"] for f in metrics["not_applicable"]] == ["head"]
    assert "no domain rule fits" in metrics["not_applicable"][0]["reason"]
    assert metrics["labels_without_study"] == ["missing-study"]
    page = (evaluated["out"] / "report.html").read_text()
    assert "missing-study" in page and "broken" in page
    pngs = sorted(p.name for p in evaluated["out"].glob("*.png"))
    assert pngs == ["synthetic_disc.png", "synthetic_texture.png"]
    assert all(src in page for src in pngs)
    reference = json.loads((evaluated["out"] / "reference.json").read_text())
    assert set(reference["reference"]) == {"synthetic/disc", "synthetic/texture"}
    assert reference["reference"]["synthetic/disc"]["n"] == 16
    assert reference["inputs"]["Modality"] == {"CR": 1.0}


def test_calibration_fit_load_refuse_and_name_in_sr(
    synthetic: dict[str, Any], evaluated: dict[str, Any], tmp_path: Path
) -> None:
    from triagenode.node import build_classifier
    from triagenode.reports.sr import build_sr

    scores_csv = evaluated["out"] / "scores.csv"
    calibration = tmp_path / "site.json"
    assert (
        main(
            [
                "calibrate",
                str(scores_csv),
                "--out",
                str(calibration),
                "--target-sensitivity",
                "0.9",
                "--config",
                str(synthetic["config"]),
                "--resamples",
                "200",
            ]
        )
        == 0
    )
    document = json.loads(calibration.read_text())
    assert document["model"]["weights_sha256"] == synthetic["weights"]
    assert document["label_set"] == "synthetic"
    assert set(document["findings"]) == {"disc", "texture"}
    assert all(f["method"] == "platt" and f["n"] == 8 for f in document["findings"].values())
    assert len(document["data_sha256"]) == 64
    assert set(document["reference"]) == {"synthetic/disc", "synthetic/texture"}

    settings = load_settings(
        synthetic["config"], model={"source": "demo", "calibration": str(calibration)}
    )
    classifier = build_classifier(settings)
    try:
        disc = classifier.labels.sets["synthetic"].labels[0]
        assert disc.calibration.method == "platt" and disc.threshold_calibrated
        assert disc.threshold == pytest.approx(document["findings"]["disc"]["threshold"])
        image = next(synthetic["data"].glob("case00/*.dcm"))
        studies, _ = scan_studies([image.parent])
        from triagenode.inference.select import choose_images

        selection = choose_images(studies[0].records, slices_per_series=1, max_images=1)
        result = classifier.classify_study(
            studies[0].study_uid,
            [(i.ref, i.path) for i in selection.images],
            label_set="synthetic",
        )
    finally:
        classifier.batcher.close()
    assert all(f.calibrated for f in result.findings)
    assert "sha256:" in result.calibration and "site.json" in result.calibration
    from triagenode.reports.result_json import result_to_json

    assert result_to_json(result)["calibration"] == result.calibration  # the API shows it
    import pydicom

    sr = build_sr(result, pydicom.dcmread(image, stop_before_pixels=True), settings, run=1)
    values = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any("calibration=" in v and "site.json sha256:" in v for v in values), values

    wrong = dict(document, model={"weights_sha256": "0" * 64})
    other = tmp_path / "other.json"
    other.write_text(json.dumps(wrong))
    bad = load_settings(synthetic["config"], model={"source": "demo", "calibration": str(other)})
    with pytest.raises(ConfigError) as caught:
        build_classifier(bad)
    assert "0" * 64 in str(caught.value) and synthetic["weights"] in str(caught.value)


def test_evaluate_fit_calibration_reports_on_studies_it_did_not_fit(
    synthetic: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "fitted"
    args = ["evaluate", str(synthetic["data"]), "--labels", str(synthetic["labels_csv"])]
    args += ["--out", str(out), "--config", str(synthetic["config"]), "--resamples", "100"]
    assert main([*args, "--fit-calibration", "--youden", "--method", "temperature"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for entry in metrics["findings"]:
        assert entry["n"] == 8  # the other 8 of 16 fitted the calibration
        assert entry["evaluated_on"].startswith("held-out")
        assert entry["calibration"]["method"] == "temperature"
    document = json.loads((out / "calibration-synthetic.json").read_text())
    assert metrics["calibration_files"]["synthetic"]["path"] == "calibration-synthetic.json"
    assert document["operating_rule"].startswith("Youden")
    assert all(f["temperature"] > 0 for f in document["findings"].values())


def test_isotonic_calibration_fits_round_trips_and_needs_enough_studies() -> None:
    from triagenode.config.labels import Calibration
    from triagenode.validation.calibration import OperatingRule, fit_finding

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    z = rng.normal(size=400) + 2 * y
    fitted = fit_finding("x", z, y, method="isotonic", rule=OperatingRule(), name="iso")
    calibration = fitted.calibration
    assert calibration.method == "isotonic" and calibration.is_calibrated
    again = Calibration.model_validate(json.loads(calibration.model_dump_json()))
    grid = np.linspace(-4, 6, 50)
    assert np.array_equal(again.apply(grid), calibration.apply(grid))
    assert (np.diff(calibration.apply(grid)) >= 0).all()  # monotone in the logit
    # calibrated: in each half of the scores, the mean score is the observed frequency
    scores = calibration.apply(z).astype(float)
    for mask in (scores < 0.5, scores >= 0.5):
        assert abs(scores[mask].mean() - y[mask].mean()) < 0.02
    with pytest.raises(TriageNodeError, match="at least 200 studies"):
        fit_finding("x", z[:100], y[:100], method="isotonic", rule=OperatingRule(), name="")
    with pytest.raises(ValueError, match="ascending"):
        Calibration(method="isotonic", breakpoints=[(0.0, 0.9), (1.0, 0.1)])
