"""Shared, cached models and ONNX exports for the acceleration tests.

The demo model takes seconds to build, so it is built once per test process
(:func:`functools.lru_cache`) whichever test file asks first.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from triagenode.optimization import parity


@functools.lru_cache(maxsize=1)
def demo_model() -> Any:
    from triagenode.inference.model import build_demo_model

    return build_demo_model()


@functools.lru_cache(maxsize=1)
def _demo_export_dir() -> Path:
    import tempfile

    from triagenode.optimization.onnx_export import export_onnx

    folder = Path(tempfile.mkdtemp(prefix="triagenode-test-onnx-"))
    export_onnx(demo_model(), folder, n_images=8)
    return folder


def demo_images(n: int, seed: int = 3) -> np.ndarray:
    pre = demo_model().preprocess
    return parity.synthetic_images(n, pre.image_size, pre.mean, pre.std, seed=seed)


@pytest.fixture
def loaded_demo() -> Any:
    return demo_model()


@pytest.fixture
def demo_onnx_dir(tmp_path: Path) -> Path:
    """A private copy of the demo export (image.onnx, text.onnx) a test may add files to."""
    import shutil

    target = tmp_path / "artifacts"
    shutil.copytree(_demo_export_dir(), target)
    return target
