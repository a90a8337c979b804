"""TensorRT backend: engine build, cache, CUDA graphs, parity with PyTorch.

Runs only where the ``tensorrt`` package imports (a GPU machine with TensorRT 10); this
workplace's machines cannot install it, so here the whole module is skipped with that reason.
"""

# Fixtures imported from tests.onnx_fixtures are redefined as test arguments.

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed on this machine")

from tests.onnx_fixtures import demo_images  # noqa: E402
from triagenode.inference.backends.artifacts import engines_dir  # noqa: E402
from triagenode.inference.backends.engine_cache import current_gpu  # noqa: E402
from triagenode.inference.backends.tensorrt import TensorRTImageEncoder  # noqa: E402
from triagenode.inference.backends.torch import TorchImageEncoder  # noqa: E402
from triagenode.optimization.tensorrt_build import ensure_engine  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture
def fp16_engine(demo_onnx_dir: Path, loaded_demo) -> Path:
    return ensure_engine(
        demo_onnx_dir / "image.onnx",
        engines_dir(demo_onnx_dir),
        precision="fp16",
        max_batch=8,
        image_size=loaded_demo.preprocess.image_size,
    )


def test_engine_is_cached_per_gpu_and_precision(
    fp16_engine: Path, demo_onnx_dir: Path, loaded_demo
):
    major, minor = current_gpu().compute_capability
    assert f"-sm{major}{minor}-trt{trt.__version__}-fp16-b8-" in fp16_engine.name
    stamp = fp16_engine.stat().st_mtime_ns
    again = ensure_engine(
        demo_onnx_dir / "image.onnx",
        engines_dir(demo_onnx_dir),
        precision="fp16",
        max_batch=8,
        image_size=loaded_demo.preprocess.image_size,
    )
    assert again == fp16_engine and again.stat().st_mtime_ns == stamp
    assert list(engines_dir(demo_onnx_dir).glob("timing-*.cache"))


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_tensorrt_matches_pytorch(fp16_engine: Path, loaded_demo, cuda_graphs: bool):
    encoder = TensorRTImageEncoder(
        fp16_engine,
        precision="fp16",
        max_batch=8,
        image_size=loaded_demo.preprocess.image_size,
        cuda_graphs=cuda_graphs,
    )
    reference = TorchImageEncoder(loaded_demo, device="cpu", precision="fp32")
    images = demo_images(11, seed=5)  # 8 + 3: two chunks, the second padded to bucket 4
    try:
        got = encoder.encode(images)
        expected = reference.encode(images)
        assert got.shape == expected.shape
        cosine = (got * expected).sum(axis=1)
        assert cosine.min() > 0.999
        # Same batch again and at batch 1: replays give the same answer.
        np.testing.assert_allclose(encoder.encode(images), got, atol=1e-3)
        np.testing.assert_allclose(encoder.encode(images[:1]), got[:1], atol=2e-3)
    finally:
        encoder.close()
        reference.close()
