"""``model.backend = auto``: fastest usable backend, logged; fallbacks warn, never silent."""

# Fixtures imported from tests.onnx_fixtures are redefined as test arguments.

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.onnx_fixtures import demo_images
from triagenode.config.settings import ModelSettings
from triagenode.errors import ModelLoadError
from triagenode.inference.backends import create_encoder
from triagenode.inference.backends.onnxruntime import OnnxRuntimeImageEncoder
from triagenode.inference.backends.select import Machine, plan_candidates, select_backend
from triagenode.inference.backends.torch import TorchImageEncoder
from triagenode.optimization.onnx_export import label_prompts
from triagenode.optimization.parity import ParityThresholds
from triagenode.optimization.quantize import quantize_image_tower

CPU_ONLY = Machine(cuda=False, tensorrt=False, ort_providers=("CPUExecutionProvider",))
GPU_BOX = Machine(
    cuda=True,
    tensorrt=True,
    ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
)


def _settings(**values) -> ModelSettings:
    return ModelSettings(source="demo", threads=1, **values)


def _int8(folder: Path, loaded) -> Path:
    return quantize_image_tower(
        folder / "image.onnx",
        "dynamic",
        images=demo_images(8),
        text_embeds=loaded.encode_text(label_prompts()),
        logit_scale=loaded.logit_scale,
        thresholds=ParityThresholds(min_cosine=0.99, min_top1_agreement=0.5),
        keep_fp32="none",
    ).path


def test_cpu_prefers_int8_then_torch_then_onnx_fp32(tmp_path: Path):
    for name in ("image.onnx", "image.int8-dynamic.onnx"):
        (tmp_path / name).write_bytes(b"x")
    plan = plan_candidates(_settings(), tmp_path, CPU_ONLY)
    assert [c.describe() for c in plan if not c.missing] == [
        "onnxruntime/cpu/int8 (image.int8-dynamic.onnx)",
        "torch/cpu/fp32",
        "onnxruntime/cpu/fp32 (image.onnx)",
    ]
    only_ort = plan_candidates(
        _settings(backend="onnxruntime", precision="fp32"), tmp_path, CPU_ONLY
    )
    assert [c.describe() for c in only_ort] == ["onnxruntime/cpu/fp32 (image.onnx)"]


def test_gpu_order_and_reasons_for_missing_pieces(tmp_path: Path):
    (tmp_path / "image.onnx").write_bytes(b"x")
    plan = plan_candidates(_settings(), tmp_path, GPU_BOX)
    usable = [c.describe() for c in plan if not c.missing]
    assert usable[:2] == ["tensorrt/cuda/fp16 (image.onnx)", "torch/cuda/bf16"]
    missing = {c.describe(): c.missing for c in plan if c.missing}
    assert "image.int8-static.onnx" in missing["tensorrt/cuda/int8 (image.int8-static.onnx)"]
    no_trt = plan_candidates(_settings(), tmp_path, Machine(True, False, ("CPUExecutionProvider",)))
    reasons = {(c.backend, c.device): c.missing for c in no_trt if c.missing}
    assert reasons["tensorrt", "cuda"] == "tensorrt is not installed"
    assert "onnxruntime-gpu" in reasons["onnxruntime", "cuda"]
    cpu_forced = plan_candidates(_settings(device="cpu"), tmp_path, GPU_BOX)
    assert {c.device for c in cpu_forced} == {"cpu"}


def test_auto_picks_int8_onnxruntime_when_exported(loaded_demo, demo_onnx_dir, caplog):
    _int8(demo_onnx_dir, loaded_demo)
    caplog.set_level(logging.INFO, logger="triagenode.inference.backends.select")
    encoder = select_backend(_settings(), demo_onnx_dir, loaded_demo, machine=CPU_ONLY)
    assert isinstance(encoder, OnnxRuntimeImageEncoder)
    assert encoder.precision == "int8"
    assert "backend selected: onnxruntime/cpu/int8" in caplog.text
    assert encoder.encode(demo_images(2)).shape == (2, loaded_demo.embed_dim)


def test_auto_without_artifacts_is_torch_and_says_why(loaded_demo, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="triagenode.inference.backends.select")
    # A CPU without bf16: on one with it, auto builds OpenVINO bf16 from PyTorch instead
    # (tests/inference/test_openvino_backend.py).
    monkeypatch.setattr(Machine, "detect", classmethod(lambda cls: CPU_ONLY))
    encoder = create_encoder(loaded_demo, _settings(), artifacts_dir=tmp_path)
    assert isinstance(encoder, TorchImageEncoder)
    assert "skipped" in caplog.text and "run `triagenode optimize`" in caplog.text
    assert "backend selected: torch/cpu/fp32" in caplog.text


def test_explicit_onnxruntime_without_artifacts_falls_back_with_warning(
    loaded_demo, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    encoder = select_backend(
        _settings(backend="onnxruntime"), tmp_path, loaded_demo, machine=CPU_ONLY
    )
    assert isinstance(encoder, TorchImageEncoder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("falling back to torch/cpu/fp32" in w and "image.onnx" in w for w in warnings)


def test_stale_artifact_from_other_weights_is_refused(loaded_demo, demo_onnx_dir, caplog):
    import onnx

    path = demo_onnx_dir / "image.onnx"
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "triagenode.weights_sha256":
            prop.value = '"0123456789abcdef"'  # as if exported from other weights
    onnx.save(model, str(path))
    caplog.set_level(logging.INFO)
    encoder = select_backend(
        _settings(backend="onnxruntime", precision="fp32"),
        demo_onnx_dir,
        loaded_demo,
        machine=CPU_ONLY,
    )
    assert isinstance(encoder, TorchImageEncoder)
    assert "exported from other weights" in caplog.text
    assert "falling back to torch/cpu/fp32" in caplog.text


def test_a_candidate_that_fails_to_load_warns_and_the_next_is_used(
    loaded_demo, demo_onnx_dir, caplog
):
    (demo_onnx_dir / "image.int8-dynamic.onnx").write_bytes(b"truncated download")
    caplog.set_level(logging.INFO)
    encoder = select_backend(_settings(), demo_onnx_dir, loaded_demo, machine=CPU_ONLY)
    assert isinstance(encoder, TorchImageEncoder)
    assert any(
        r.levelno == logging.WARNING
        and "onnxruntime/cpu/int8" in r.getMessage()
        and "cannot load" in r.getMessage()
        for r in caplog.records
    )


def test_nothing_usable_is_an_error_naming_every_reason(loaded_demo, tmp_path):
    def refuse(candidate, *args):
        raise RuntimeError(f"{candidate.backend} refused")

    with pytest.raises(ModelLoadError, match="torch refused"):
        select_backend(
            _settings(backend="onnxruntime"), tmp_path, loaded_demo, machine=CPU_ONLY, build=refuse
        )


def test_session_options_come_from_model_settings(loaded_demo, demo_onnx_dir):
    import onnxruntime as ort

    settings = _settings(backend="onnxruntime", precision="fp32", graph_optimization="basic")
    encoder = select_backend(settings, demo_onnx_dir, loaded_demo, machine=CPU_ONLY)
    options = encoder.session.get_session_options()
    assert options.intra_op_num_threads == 1  # model.threads
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
