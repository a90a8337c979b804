"""TensorRT engine cache: the key changes with every input, hits skip the build.

The key is a pure function, so it is tested here without TensorRT; the build itself is
replaced by a recorder in the last test because TensorRT cannot run on this machine (it
runs for real in ``test_tensorrt_backend.py`` where ``tensorrt`` imports).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from triagenode.inference.backends.engine_cache import (
    EngineKey,
    GpuInfo,
    engine_cache_key,
    engine_path,
)
from triagenode.optimization import tensorrt_build
from triagenode.optimization.tensorrt_build import ensure_engine

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "10.3.0")
KEY = EngineKey(H100, "ab" * 32, "fp16", 32, 224)


def test_same_inputs_give_the_same_readable_key():
    again = EngineKey(
        GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "10.3.0"), "ab" * 32, "fp16", 32, 224
    )
    assert engine_cache_key(KEY) == engine_cache_key(again)
    assert engine_cache_key(KEY).startswith("nvidia-h100-80gb-hbm3-sm90-trt10.3.0-fp16-b32-")
    assert engine_path(Path("/data/engines/trt"), KEY).parent == Path("/data/engines/trt")
    assert engine_path(Path("/x"), KEY).suffix == ".engine"


@pytest.mark.parametrize(
    "change",
    [
        {"gpu": GpuInfo("NVIDIA H200", (9, 0), "10.3.0")},
        {"gpu": GpuInfo("NVIDIA H100 80GB HBM3", (8, 9), "10.3.0")},
        {"gpu": GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), "10.4.0")},
        {"onnx_sha256": "cd" * 32},
        {"precision": "int8"},
        {"max_batch": 64},
        {"image_size": 256},
    ],
    ids=[
        "gpu-name",
        "compute-capability",
        "tensorrt-version",
        "onnx-hash",
        "precision",
        "max-batch",
        "image-size",
    ],
)
def test_any_changed_input_changes_the_key(change):
    assert engine_cache_key(dataclasses.replace(KEY, **change)) != engine_cache_key(KEY)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        engine_cache_key(dataclasses.replace(KEY, precision="bf8"))


def test_ensure_engine_hits_the_cache_and_rebuilds_when_onnx_changes(tmp_path, monkeypatch):
    onnx_file = tmp_path / "image.onnx"
    onnx_file.write_bytes(b"graph version 1")
    cache = tmp_path / "engines" / "trt"
    builds: list[tuple[Path, str]] = []

    def fake_build(onnx_path, out_path, **kwargs):
        builds.append((Path(onnx_path), kwargs["precision"]))
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_bytes(b"engine")
        assert kwargs["timing_cache"].parent == cache
        return Path(out_path)

    monkeypatch.setattr(tensorrt_build, "build_engine", fake_build)
    first = ensure_engine(onnx_file, cache, precision="fp16", gpu=H100)
    assert ensure_engine(onnx_file, cache, precision="fp16", gpu=H100) == first
    assert len(builds) == 1  # second call was a cache hit
    assert first.with_suffix(".json").is_file()

    onnx_file.write_bytes(b"graph version 2")  # re-exported with other weights
    second = ensure_engine(onnx_file, cache, precision="fp16", gpu=H100)
    third = ensure_engine(onnx_file, cache, precision="int8", gpu=H100)
    assert len({first, second, third}) == 3
    assert [p for _, p in builds] == ["fp16", "fp16", "int8"]


def test_ensure_engine_without_build_reports_the_missing_engine(tmp_path, monkeypatch):
    onnx_file = tmp_path / "image.onnx"
    onnx_file.write_bytes(b"graph")
    monkeypatch.setattr(tensorrt_build, "build_engine", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(FileNotFoundError, match="optimize build-trt"):
        ensure_engine(onnx_file, tmp_path / "trt", gpu=H100, build=False)
