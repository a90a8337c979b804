"""``triagenode optimize export-triton``: the model repository and its ``config.pbtxt``,
read back with Triton's own ``ModelConfig`` schema (``tritonclient``'s compiled proto)."""

# ruff: noqa: F811

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.onnx_fixtures import demo_onnx_dir  # noqa: F401
from triagenode.cli import main
from triagenode.inference.backends.artifacts import engines_dir, read_onnx_metadata
from triagenode.inference.backends.engine_cache import file_sha256
from triagenode.optimization.triton_repo import render_config

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # settings default data_dir is ./triagenode-data
    return tmp_path


def _parse(path: Path) -> Any:
    return text_format.Parse(path.read_text(encoding="ascii"), model_config_pb2.ModelConfig())


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["optimize", "export-triton", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_export_triton_writes_a_repository_triton_can_read(workdir, demo_onnx_dir, capsys):
    repo = workdir / "models"
    out = _export(
        capsys,
        str(repo),
        "--artifacts",
        str(demo_onnx_dir),
        "--kind",
        "gpu",
        "--instances",
        "2",
        "--max-batch",
        "16",
        "--preferred-batch",
        "16",
        "--preferred-batch",
        "4",
    )
    meta = read_onnx_metadata(demo_onnx_dir / "image.onnx")
    model_dir = repo / "triagenode_image"
    assert out["model_dir"] == str(model_dir) and out["platform"] == "onnxruntime_onnx"
    onnx = model_dir / "1" / "model.onnx"
    assert onnx.read_bytes() == (demo_onnx_dir / "image.onnx").read_bytes()
    config = _parse(model_dir / "config.pbtxt")
    size, dim = meta["preprocess"]["image_size"], meta["embed_dim"]
    assert config.name == "triagenode_image" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    [pixels], [embeds] = config.input, config.output
    assert (pixels.name, list(pixels.dims)) == ("pixel_values", [3, size, size])
    assert (embeds.name, list(embeds.dims)) == ("image_embeds", [dim])
    assert pixels.data_type == embeds.data_type == model_config_pb2.TYPE_FP32
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4, 16]
    assert batching.max_queue_delay_microseconds == 10_000  # model.max_wait_ms default 10
    assert (batching.priority_levels, batching.default_priority_level) == (4, 3)
    [group] = config.instance_group
    assert (group.kind, group.count) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["triagenode.weights_sha256"] == meta["weights_sha256"]
    assert params["triagenode.demo"] == "DEMO, NOT FOR CLINICAL USE"


def _fake_engine(artifacts: Path, *, onnx_sha256: str, max_batch: int) -> Path:
    """An engine file with build-trt's sidecar key (building a real one needs a GPU)."""
    folder = engines_dir(artifacts)
    folder.mkdir(parents=True, exist_ok=True)
    engine = folder / "nvidia-h100-sm90-trt10.3.0-fp16-b8-0123456789abcdef01234567.engine"
    engine.write_bytes(b"not a real plan")
    key = {
        "gpu": {"name": "NVIDIA H100", "compute_capability": [9, 0], "tensorrt_version": "10.3"},
        "onnx_sha256": onnx_sha256,
        "precision": "fp16",
        "max_batch": max_batch,
        "image_size": 224,
    }
    engine.with_suffix(".json").write_text(json.dumps(key))
    return engine


def test_a_tensorrt_plan_of_this_onnx_is_used_for_gpus_only(workdir, demo_onnx_dir, capsys):
    engine = _fake_engine(
        demo_onnx_dir, onnx_sha256=file_sha256(demo_onnx_dir / "image.onnx"), max_batch=8
    )
    repo = workdir / "models"
    gpu = _export(capsys, str(repo), "--artifacts", str(demo_onnx_dir), "--kind", "gpu")
    model_dir = repo / "triagenode_image"
    assert gpu["platform"] == "tensorrt_plan" and gpu["max_batch"] == 8  # the engine's limit
    assert (model_dir / "1" / "model.plan").read_bytes() == engine.read_bytes()
    config = _parse(model_dir / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 8
    assert config.parameters["triagenode.tensorrt_gpu"].string_value == "NVIDIA H100"

    cpu = _export(capsys, str(repo), "--artifacts", str(demo_onnx_dir), "--name", "cpu_tower")
    assert cpu["platform"] == "onnxruntime_onnx" and cpu["kind"] == "KIND_CPU"
    only = _export(
        capsys, str(repo), "--artifacts", str(demo_onnx_dir), "--kind", "gpu", "--onnx-only"
    )
    assert only["platform"] == "onnxruntime_onnx"
    assert not (model_dir / "1" / "model.plan").exists()  # a re-export leaves one model file
    assert (model_dir / "1" / "model.onnx").is_file()


def test_an_engine_of_other_weights_is_not_used(workdir, demo_onnx_dir, capsys):
    _fake_engine(demo_onnx_dir, onnx_sha256="0" * 64, max_batch=8)
    out = _export(capsys, str(workdir / "m"), "--artifacts", str(demo_onnx_dir), "--kind", "gpu")
    assert out["platform"] == "onnxruntime_onnx" and out["max_batch"] == 32


def test_export_triton_without_an_onnx_export_says_what_to_run(workdir, capsys):
    assert main(["optimize", "export-triton", str(workdir / "m"), "--artifacts", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "image.onnx: not found; run `triagenode optimize export-onnx` first" in err


def test_preferred_batch_sizes_above_the_max_are_refused(workdir, demo_onnx_dir, capsys):
    args = ["optimize", "export-triton", str(workdir / "m"), "--artifacts", str(demo_onnx_dir)]
    assert main([*args, "--max-batch", "4", "--preferred-batch", "8"]) == 2
    assert "preferred batch sizes [8]: each must be 1..4" in capsys.readouterr().err


def test_the_model_name_from_settings_names_the_folder(workdir, demo_onnx_dir, capsys):
    shutil.rmtree(workdir / "models", ignore_errors=True)
    (workdir / "triagenode.toml").write_text('[model.triton]\nmodel_name = "pool_vit"\n')
    out = _export(
        capsys,
        "--config",
        str(workdir / "triagenode.toml"),
        str(workdir / "models"),
        "--artifacts",
        str(demo_onnx_dir),
    )
    assert _parse(Path(out["config_path"])).name == "pool_vit"
    assert Path(out["model_file"]) == workdir / "models" / "pool_vit" / "1" / "model.onnx"


def test_parameter_values_are_escaped_for_the_text_format() -> None:
    hostile = 'a "quoted" \\ value\nwith a newline, \x00 and ünïcode'
    text = render_config(
        model_name="m",
        platform="onnxruntime_onnx",
        max_batch=2,
        image_size=8,
        embed_dim=4,
        preferred_batch_sizes=[2],
        max_queue_delay_us=0,
        kind="KIND_CPU",
        instances=1,
        parameters={"triagenode.model": hostile},
    )
    assert text.isascii()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.parameters["triagenode.model"].string_value == hostile
