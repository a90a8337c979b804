"""The GPU benchmark script runs end to end on the CPU (``--smoke``), so a session that gets
a GPU for a few minutes does not spend them on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow
def test_gpu_suite_smoke_on_cpu(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--quick", "--budget-s", "300"],
        env={**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    sections = results["sections"]
    assert {"eager", "image_encoder", "onnxruntime"} <= set(sections)
    assert sections["image_encoder"]["torch-fp32@2"]["images_per_s"] > 0
    assert results["onnx_export"]["bytes"] > 0
    # Sections that need what this machine lacks are recorded as errors, not crashes.
    assert set(results.get("errors", {})) <= {"tensorrt"}
