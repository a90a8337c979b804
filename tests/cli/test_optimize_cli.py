"""``triagenode optimize`` and ``triagenode benchmark backends`` end to end (demo model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import factory
from triagenode.cli import main
from triagenode.inference.backends.artifacts import read_onnx_metadata


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # settings default data_dir is ./triagenode-data
    return tmp_path


def test_export_then_static_quantize_on_dicom_then_build_trt_needs_tensorrt(workdir, capsys):
    out = workdir / "artifacts"
    assert (
        main(
            [
                "optimize",
                "export-onnx",
                "--out",
                str(out),
                "--demo-model",
                "--parity-images",
                "4",
                "--fp16",
            ]
        )
        == 0
    )
    exported = json.loads(capsys.readouterr().out)
    assert exported["image_parity"]["passed"] and Path(exported["text_path"]).is_file()
    assert exported["fp16_parity"]["passed"] and Path(exported["fp16_path"]).is_file()

    assert (
        main(["optimize", "quantize", "--mode", "static", "--out", str(out), "--demo-model"]) == 2
    )  # no --calibration: a clear error, exit status 2
    assert "--calibration" in capsys.readouterr().err

    calibration = workdir / "dicom"
    factory.ct_study(calibration, slices=4, size=64)
    status = main(
        [
            "optimize",
            "quantize",
            "--mode",
            "static",
            "--calibration",
            str(calibration),
            "--out",
            str(out),
            "--demo-model",
            "--parity-images",
            "8",
        ]
    )
    captured = capsys.readouterr()
    if status == 0:  # written: the report says it passed
        assert json.loads(captured.out)["parity"]["passed"] is True
        assert read_onnx_metadata(out / "image.int8-static.onnx")["quantization"] == "static"
    else:  # refused: the message carries the report and nothing is written
        assert "parity below threshold" in captured.err
        assert not (out / "image.int8-static.onnx").exists()

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["optimize", "build-trt", "--out", str(out)]) == 2
        assert "tensorrt" in capsys.readouterr().err


def test_quantize_without_export_says_what_to_run(workdir, capsys):
    assert main(["optimize", "quantize", "--out", str(workdir), "--demo-model"]) == 2
    assert "optimize export-onnx" in capsys.readouterr().err


def test_benchmark_backends_table_and_json(workdir, capsys):
    json_out = workdir / "bench.json"
    assert (
        main(
            [
                "benchmark",
                "backends",
                "--demo-model",
                "--images",
                "6",
                "--latency-runs",
                "3",
                "--batch-sizes",
                "1",
                "2",
                "--throughput-images",
                "4",
                "--threads",
                "1",
                "--json-out",
                str(json_out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "torch-cpu-fp32" in table and "onnxruntime-cpu-fp32" in table
    report = json.loads(json_out.read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert rows["torch-cpu-fp32"]["speedup_vs_torch_fp32"] == 1.0
    onnx_row = rows["onnxruntime-cpu-fp32"]
    assert onnx_row["top1_agreement"] == 1.0 and onnx_row["cosine_min"] > 0.9999
    assert onnx_row["latency_p50_ms"] > 0 and onnx_row["peak_host_mib"] > 0
    assert set(onnx_row["throughput_by_batch"]) == {"1", "2"}
    assert report["n_agreement_images"] == 6 and report["machine"]["cpu_count"] >= 1
    # INT8 on the demo model is either measured or refused with its parity report: never
    # silently missing.
    assert "onnxruntime-cpu-int8-dynamic" in rows or (
        "parity below threshold" in report["skipped"]["onnxruntime-cpu-int8-dynamic"]
    )
    # OpenVINO fp32/bf16/INT8 and PyTorch bf16 sit beside them, agreement measured the same way.
    pytest.importorskip("openvino")
    from triagenode.inference.backends.cpu import detect_cpu

    ov = rows["openvino-cpu-fp32"]
    assert ov["backend"] == "openvino" and ov["cosine_min"] > 0.9999
    assert "centred_top1_agreement" in ov
    if detect_cpu().bf16:
        for name in ("openvino-cpu-bf16", "torch-cpu-bf16"):
            assert rows[name]["precision"] == "bf16" and rows[name]["cosine_min"] > 0.999
    assert "openvino-cpu-int8" in rows or "parity" in report["skipped"]["openvino-cpu-int8"]
