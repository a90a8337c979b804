"""``triagenode classify``: folders streamed, JSON lines and CSV, skips and failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from tests.factory import cr_image, ct_slice, write
from triagenode.cli import main
from triagenode.cli.classify import iter_files
from triagenode.domain import DEMO_WARNING


@pytest.fixture
def dataset_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the node's data folder lands in the temp folder
    root = tmp_path / "data"
    (root / "ct" / "series").mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for index in range(3):
        write(ct_slice(study, series, index, size=64), root / "ct" / "series" / f"{index}.dcm")
    write(cr_image(size=64), root / "chest.dcm")
    (root / "notes.txt").write_text("not an image")
    broken = write(ct_slice(study, series, 9, size=64), root / "broken.dcm")
    broken.write_bytes(broken.read_bytes()[:-2000])  # truncated pixel data
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(root / "photo.png")
    return root


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_iter_files_walks_sorted_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("b/c/z", "b/y", "a", ".hidden"):
        (tmp_path / name).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_files([tmp_path])]
    assert found == ["a", "b/y", "b/c/z"]


def test_classify_folder_json_lines(dataset_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", str(dataset_dir), "--demo-model", "--json"]) == 0
    captured = capsys.readouterr()
    lines = _lines(captured.out)
    images = [line for line in lines if line["type"] == "image"]
    studies = [line for line in lines if line["type"] == "study"]
    by_status = {}
    for line in images:
        by_status.setdefault(line["status"], []).append(Path(line["path"]).name)
    assert sorted(by_status["ok"]) == ["0.dcm", "1.dcm", "2.dcm", "chest.dcm"]
    assert by_status["skipped"] == ["notes.txt"]
    assert by_status["failed"] == ["broken.dcm"]
    # a PNG says nothing of its modality or anatomy: no label set is guessed for it
    assert by_status["not_applicable"] == ["photo.png"]
    assert {s["label_set"] for s in studies} == {"ct_head", "chest_xray"}
    ct = next(s for s in studies if s["label_set"] == "ct_head")
    assert ct["images"] == 3 and ct["top_score"] == max(ct["scores"].values())
    assert ct["aggregation"] == "mean of the top 3 image scores per finding"
    assert all(line["warning"] == DEMO_WARNING for line in lines)
    assert "files" in captured.err and DEMO_WARNING in captured.err  # progress + warning


def test_classify_is_deterministic_and_writes_csv(
    dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.csv"
    target = str(dataset_dir / "ct")
    assert main(["classify", target, "--demo-model", "--out", str(first)]) == 0
    assert (
        main(["classify", target, "--demo-model", "--label-set", "ct_head", "--out", str(second)])
        == 0
    )
    json_rows = [r for r in _lines(first.read_text()) if r["status"] == "ok"]
    with second.open(newline="") as handle:
        csv_rows = [r for r in csv.DictReader(handle) if r["status"] == "ok"]
    assert len(json_rows) == len(csv_rows) == 4  # three images and their study
    for a, b in zip(json_rows, csv_rows, strict=True):
        assert a["type"] == b["type"] and a["top_label"] == b["top_label"]
        assert a["scores"] == json.loads(b["scores"])


def test_unknown_label_set_is_refused(
    dataset_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["classify", str(dataset_dir), "--demo-model", "--label-set", "nope"]) == 2
    assert "label set 'nope' is not configured" in capsys.readouterr().err


def test_pydicoms_test_files_get_a_fitting_label_set_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every bundled pydicom file, as a new user would try them: each image gets the label
    set of its modality and anatomy, or is recorded not applicable; no ultrasound, nuclear
    medicine or secondary capture is read as a chest radiograph."""
    import pydicom

    from tests.factory import PYDICOM_TEST_FILES

    monkeypatch.chdir(tmp_path)
    assert main(["classify", str(PYDICOM_TEST_FILES), "--demo-model", "--json"]) == 0
    images = [r for r in _lines(capsys.readouterr().out) if r["type"] == "image"]
    assert len(images) > 100
    statuses = {r["status"] for r in images}
    assert statuses <= {"ok", "skipped", "failed", "not_applicable"}
    family = {"CR": "chest_xray", "DX": "chest_xray", "CT": "ct_", "MR": "mr_"}
    seen = {"ok": 0, "not_applicable": 0}
    for record in images:
        if record["status"] not in seen:
            continue
        seen[record["status"]] += 1
        modality = str(pydicom.dcmread(record["path"], stop_before_pixels=True).get("Modality"))
        if record["status"] == "ok":
            assert record["label_set"].startswith(family[modality]), (record["path"], modality)
        else:
            assert record["label_set"] is None and record["reason"], record["path"]
    assert seen["ok"] > 0 and seen["not_applicable"] > 10
