"""PyTorch backend: device/precision resolution, buckets, chunking; CUDA parity where a GPU
is present (graphs against eager, padded buckets against the unpadded model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triagenode.config.settings import ModelSettings
from triagenode.errors import ConfigError
from triagenode.inference.backends import create_encoder
from triagenode.inference.backends.base import ImageEncoder
from triagenode.inference.backends.torch import (
    TorchImageEncoder,
    batch_buckets,
    resolve_precision,
)
from triagenode.inference.model import LoadedModel, build_demo_model

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return build_demo_model()


def test_buckets_and_precisions() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="fp16' needs CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="int8 needs the onnxruntime or tensorrt"):
        resolve_precision("int8", "cpu")


def test_cpu_encoder_matches_the_model_and_chunks(demo: LoadedModel) -> None:
    encoder = create_encoder(
        demo, ModelSettings(source="demo", backend="torch", device="cpu", max_batch=3)
    )
    assert isinstance(encoder, ImageEncoder) and isinstance(encoder, TorchImageEncoder)
    images = np.random.default_rng(0).standard_normal((7, 3, 64, 64), np.float32)
    out = encoder.encode(images)  # chunks of 3, 3, 1
    with torch.inference_mode():
        expected = demo.clip.encode_image(torch.from_numpy(images), normalize=True).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert encoder.encode(images[:0]).shape == (0, demo.embed_dim)
    with pytest.raises(ValueError, match="shape"):
        encoder.encode(images[:, :, :32])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_graphs_match_eager(demo: LoadedModel, precision: str) -> None:
    images = np.random.default_rng(1).standard_normal((5, 3, 64, 64), np.float32)
    eager = TorchImageEncoder(demo, "cuda", precision, max_batch=8, cuda_graphs=False)
    graphs = TorchImageEncoder(demo, "cuda", precision, max_batch=8, cuda_graphs=True)
    with torch.inference_mode():
        reference = demo.clip.encode_image(torch.from_numpy(images), normalize=True).numpy()
    for encoder in (eager, graphs):
        for count in (1, 3, 5):  # buckets 1, 4, 8: padding must not leak into results
            np.testing.assert_allclose(encoder.encode(images[:count]), reference[:count], atol=3e-2)
    graphs.close()
    eager.close()
