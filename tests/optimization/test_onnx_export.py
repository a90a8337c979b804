"""ONNX export: checked models, dynamic batch, metadata, parity with PyTorch, refusal."""

# Fixtures imported from tests.onnx_fixtures are redefined as test arguments.

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.onnx_fixtures import demo_images
from triagenode.inference.backends.artifacts import read_onnx_metadata
from triagenode.optimization.onnx_export import (
    ImageTower,
    TextTower,
    export_onnx,
    label_prompts,
    make_fp16_variant,
    run_onnx,
)
from triagenode.optimization.parity import ParityError, ParityThresholds, compare_embeddings


def _batch_dim(model: onnx.ModelProto) -> str:
    return model.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_demo_export_is_checked_dynamic_and_carries_identity(loaded_demo, tmp_path: Path):
    result = export_onnx(loaded_demo, tmp_path / "out", n_images=6)

    for path, tower in ((result.image_path, "image"), (result.text_path, "text")):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version >= 17
        assert _batch_dim(model) == "batch"
        meta = read_onnx_metadata(path)
        assert meta["tower"] == tower
        assert meta["weights_sha256"] == loaded_demo.identity.weights_sha256
        assert meta["model_name"] == loaded_demo.identity.name
        assert meta["is_demo"] is True
        assert meta["preprocess"]["image_size"] == loaded_demo.preprocess.image_size
        assert meta["preprocess"]["mean"] == list(loaded_demo.preprocess.mean)
    assert result.image_parity.passed and result.text_parity.passed
    assert result.image_parity.cosine_min > 0.9999
    assert result.image_parity.top1_agreement == 1.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["image.onnx", "text.onnx"]


def test_onnx_towers_match_pytorch_at_other_batch_sizes(loaded_demo, demo_onnx_dir: Path):
    images = demo_images(5, seed=11)
    with torch.no_grad():
        reference = ImageTower(loaded_demo.clip)(torch.from_numpy(images)).numpy()
        tokens = loaded_demo.tokenizer(label_prompts()[:3])
        text_ref = TextTower(loaded_demo.clip)(tokens).numpy()
    got = run_onnx(demo_onnx_dir / "image.onnx", images, batch=5)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    np.testing.assert_allclose(
        got[:1], run_onnx(demo_onnx_dir / "image.onnx", images[:1]), atol=1e-6
    )
    text = run_onnx(demo_onnx_dir / "text.onnx", tokens.numpy())
    np.testing.assert_allclose(text, text_ref, atol=1e-5)
    np.testing.assert_allclose(text, loaded_demo.encode_text(label_prompts()[:3]), atol=1e-5)


def test_export_below_threshold_is_refused_and_writes_nothing(loaded_demo, tmp_path: Path):
    impossible = ParityThresholds(min_cosine=1.5, min_top1_agreement=1.0)
    with pytest.raises(ParityError, match="parity below threshold") as caught:
        export_onnx(loaded_demo, tmp_path / "out", n_images=4, thresholds=impossible)
    assert caught.value.report.cosine_min > 0.9999  # the model is fine; the bar is not
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_an_old_opset(loaded_demo, tmp_path: Path):
    with pytest.raises(ValueError, match="opset must be 17"):
        export_onnx(loaded_demo, tmp_path, opset=13)


def test_parity_report_counts_label_flips():
    text = np.eye(3, dtype=np.float32)
    ref = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    cand = np.array([[1, 0, 0], [0.6, 0.8, 0]], dtype=np.float32)
    flipped = np.array([[1, 0, 0], [0.8, 0.6, 0]], dtype=np.float32)
    assert compare_embeddings(ref, cand, text, 10.0).top1_agreement == 1.0
    report = compare_embeddings(ref, flipped, text, 10.0)
    assert report.top1_agreement == 0.5
    assert not report.passed
    assert report.to_dict()["passed"] is False
    assert report.max_prob_diff > 0.5


@pytest.mark.slow
def test_biomedclip_architecture_exports_with_parity(tmp_path: Path):
    """The real ViT-B/16 + BERT-base towers (random weights): export, check, parity."""
    from triagenode.inference.model import build_biomedclip

    loaded = build_biomedclip(random_weights=True, cache_dir=tmp_path / "cache")
    started = time.perf_counter()
    result = export_onnx(loaded, tmp_path / "out", n_images=4)
    elapsed = time.perf_counter() - started
    assert result.image_parity.passed, result.image_parity.summary()
    assert result.text_parity is not None and result.text_parity.passed
    assert result.image_parity.max_abs_diff < 1e-3
    meta = read_onnx_metadata(result.image_path)
    assert meta["embed_dim"] == 512 and meta["preprocess"]["image_size"] == 224
    assert elapsed < 240


def test_centred_agreement_sees_what_a_shared_component_hides():
    rng = np.random.default_rng(0)
    shared = np.zeros(16)
    shared[0] = 10.0  # every image mostly points the same way, as with random weights
    detail = rng.normal(size=(50, 16))
    ref = shared + detail
    noisy = ref + rng.normal(scale=2.0, size=ref.shape)
    text = rng.normal(size=(8, 16))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    report = compare_embeddings(ref, noisy, text, 1.0)
    assert report.centred_top1_agreement < 0.8
    assert compare_embeddings(ref, ref, text, 1.0).centred_top1_agreement == 1.0


def test_fp16_variant_is_checked_half_precision_with_float_io(demo_onnx_dir: Path):
    fp16, report = make_fp16_variant(
        demo_onnx_dir / "image.onnx", images=demo_images(6), text_embeds=np.eye(32)
    )
    assert report is not None and report.passed and report.cosine_min > 0.999
    model = onnx.load(str(fp16))
    onnx.checker.check_model(model, full_check=True)
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_onnx_metadata(fp16)["precision"] == "fp16"
    images = demo_images(4)
    full, half = run_onnx(demo_onnx_dir / "image.onnx", images), run_onnx(fp16, images)
    assert compare_embeddings(full, half, np.eye(full.shape[1]), 1.0).cosine_min > 0.999


def test_fp16_variant_below_threshold_is_refused(demo_onnx_dir: Path):
    impossible = ParityThresholds(min_cosine=1.5, min_top1_agreement=1.0)
    with pytest.raises(ParityError):
        make_fp16_variant(
            demo_onnx_dir / "image.onnx", images=demo_images(2), thresholds=impossible
        )
    assert not (demo_onnx_dir / "image.fp16.onnx").exists()
    assert not list(demo_onnx_dir.glob(".*.tmp"))
