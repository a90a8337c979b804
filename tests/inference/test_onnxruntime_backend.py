"""ONNX Runtime backend: same embeddings as PyTorch, providers, session options."""

# Fixtures imported from tests.onnx_fixtures are redefined as test arguments.

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.onnx_fixtures import demo_images
from triagenode.errors import ModelLoadError
from triagenode.inference.backends.base import ImageEncoder
from triagenode.inference.backends.onnxruntime import (
    PROVIDER_ORDER,
    OnnxRuntimeImageEncoder,
    available_providers,
    choose_providers,
)
from triagenode.inference.backends.torch import TorchImageEncoder


def test_onnxruntime_embeddings_equal_pytorch(loaded_demo, demo_onnx_dir: Path):
    encoder = OnnxRuntimeImageEncoder(demo_onnx_dir / "image.onnx", device="cpu", threads=1)
    torch_encoder = TorchImageEncoder(loaded_demo, device="cpu", precision="fp32")
    images = demo_images(6, seed=21)
    try:
        assert isinstance(encoder, ImageEncoder)
        got = encoder.encode(images)
        expected = torch_encoder.encode(images)
        assert got.shape == (6, loaded_demo.embed_dim) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(encoder.encode(images[2:3]), expected[2:3], atol=1e-5)
        assert (encoder.backend, encoder.device, encoder.precision) == (
            "onnxruntime",
            "cpu",
            "fp32",
        )
        assert encoder.embed_dim == loaded_demo.embed_dim
        assert encoder.image_size == loaded_demo.preprocess.image_size
        assert encoder.providers == ["CPUExecutionProvider"]
    finally:
        encoder.close()
        torch_encoder.close()


def test_session_options_come_from_the_arguments(demo_onnx_dir: Path):
    encoder = OnnxRuntimeImageEncoder(
        demo_onnx_dir / "image.onnx", threads=1, graph_optimization="basic"
    )
    options = encoder.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def test_providers_follow_the_preferred_order_and_end_with_cpu():
    chosen = choose_providers()
    assert chosen == available_providers()
    assert chosen[-1] == "CPUExecutionProvider"
    assert chosen == sorted(chosen, key=PROVIDER_ORDER.index)
    assert choose_providers(device="cpu") == ["CPUExecutionProvider"]
    assert choose_providers(["cpu"]) == ["CPUExecutionProvider"]


def test_an_unavailable_provider_is_refused_by_name():
    absent = "MIGraphXExecutionProvider"  # AMD's: in no build this project installs
    with pytest.raises(ModelLoadError, match=absent):
        choose_providers([absent])


def test_missing_or_broken_model_is_a_load_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxRuntimeImageEncoder(tmp_path / "image.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError):
        OnnxRuntimeImageEncoder(broken)
