"""OpenVINO backend: parity with PyTorch through the classifier, its cache, bf16 fallback,
``auto`` order, and the error when OpenVINO is missing; PyTorch bf16 autocast on CPU."""

# Fixtures imported from tests.onnx_fixtures are redefined as test arguments.

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.factory import ct_slice, write
from tests.onnx_fixtures import demo_images
from triagenode.config.labels import LabelSettings
from triagenode.config.settings import ModelSettings
from triagenode.domain import ImageRef
from triagenode.errors import ModelLoadError
from triagenode.inference.backends.cpu import CpuCapabilities
from triagenode.inference.backends.engine_cache import OpenVinoKey, openvino_cache_key
from triagenode.inference.backends.openvino import (
    OpenVinoImageEncoder,
    import_openvino,
    resolve_openvino_precision,
)
from triagenode.inference.backends.select import Machine, plan_candidates, select_backend
from triagenode.inference.backends.torch import TorchImageEncoder
from triagenode.inference.classifier import ZeroShotClassifier
from triagenode.optimization.builder import OptimizationBuilder
from triagenode.optimization.openvino_build import ensure_openvino_model

AMX_XEON = CpuCapabilities(
    "Intel(R) Xeon(R) Platinum 8480+",
    frozenset({"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f"}),
)
NO_BF16 = CpuCapabilities("Intel(R) Xeon(R) CPU E5-2680 v4", frozenset({"avx2"}))


def _machine(cpu: CpuCapabilities, openvino: bool = True) -> Machine:
    return Machine(False, False, ("CPUExecutionProvider",), openvino=openvino, cpu=cpu)


def _settings(**values) -> ModelSettings:
    return ModelSettings(source="demo", threads=1, **values)


def _ct_study(folder: Path) -> tuple[str, list[tuple[ImageRef, Path]]]:
    study, series = generate_uid(), generate_uid()
    images = []
    for index in range(4):
        ds = ct_slice(study, series, index, size=64, seed=11)
        path = write(ds, folder / f"ct{index}.dcm")
        images.append((ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, series), path))
    return study, images


# CPU capabilities --------------------------------------------------------------------------


def test_cpuinfo_flags_decide_bf16_and_amx():
    text = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    cpu = CpuCapabilities.from_cpuinfo(text)
    assert cpu.name == "AMD EPYC"
    assert cpu.flags == {"avx2", "avx512f", "avx512_bf16"}  # "fpu" is not an inference flag
    assert cpu.bf16 and not cpu.amx and not cpu.int8
    assert AMX_XEON.amx and AMX_XEON.bf16 and AMX_XEON.int8
    assert not NO_BF16.bf16


def test_a_cpu_without_bf16_gets_fp32_with_an_info_line(caplog):
    caplog.set_level(logging.INFO, logger="triagenode.inference.backends.openvino")
    assert resolve_openvino_precision("auto", AMX_XEON) == "bf16"
    assert resolve_openvino_precision("bf16", NO_BF16) == "fp32"
    assert any(
        r.levelno == logging.INFO and "no native bf16" in r.getMessage() for r in caplog.records
    )
    # OpenVINO's own device capabilities must list BF16 too.
    assert resolve_openvino_precision("auto", AMX_XEON, ["FP32", "INT8"]) == "fp32"
    assert resolve_openvino_precision("int8", NO_BF16) == "int8"


def test_torch_bf16_on_a_cpu_without_it_runs_fp32(loaded_demo, caplog):
    caplog.set_level(logging.INFO, logger="triagenode.inference.backends.torch")
    encoder = TorchImageEncoder(loaded_demo, device="cpu", precision="bf16", cpu=NO_BF16)
    assert encoder.precision == "fp32"
    assert "no native bf16" in caplog.text


def test_torch_bf16_autocast_stays_close_to_fp32(loaded_demo):
    images = demo_images(6, seed=8)
    reference = TorchImageEncoder(loaded_demo, device="cpu", precision="fp32").encode(images)
    encoder = TorchImageEncoder(loaded_demo, device="cpu", precision="bf16", cpu=AMX_XEON)
    assert encoder.precision == "bf16"
    assert next(encoder.module.parameters()).dtype.is_floating_point
    assert str(next(encoder.module.parameters()).dtype) == "torch.float32"  # autocast, not cast
    got = encoder.encode(images)
    assert got.dtype == np.float32
    assert (got * reference).sum(axis=1).min() >= 0.999


# auto order and the missing package ------------------------------------------------------


def test_auto_prefers_openvino_bf16_on_a_bf16_cpu(tmp_path: Path):
    (tmp_path / "image.onnx").write_bytes(b"x")
    (tmp_path / "image.int8-dynamic.onnx").write_bytes(b"x")
    plan = plan_candidates(_settings(), tmp_path, _machine(AMX_XEON))
    assert [c.describe() for c in plan if not c.missing] == [
        "openvino/cpu/bf16 (image.onnx)",
        "onnxruntime/cpu/int8 (image.int8-dynamic.onnx)",
        "torch/cpu/fp32",
        "onnxruntime/cpu/fp32 (image.onnx)",
    ]
    # Without bf16 the CPU order is unchanged: OpenVINO fp32 is only used on request.
    old = plan_candidates(_settings(), tmp_path, _machine(NO_BF16))
    assert plan[1:] == old and all(c.backend != "openvino" for c in old)
    # No ONNX export: auto does not start a conversion from PyTorch, and says how to get one.
    (tmp_path / "image.onnx").unlink()
    first = plan_candidates(_settings(), tmp_path, _machine(AMX_XEON))[0]
    assert first.backend == "openvino" and "optimize export-onnx" in (first.missing or "")


def test_explicit_openvino_resolves_precision_for_the_cpu(tmp_path: Path):
    plan = plan_candidates(_settings(backend="openvino"), tmp_path, _machine(NO_BF16))
    assert [c.describe() for c in plan] == ["openvino/cpu/fp32"]
    plan = plan_candidates(
        _settings(backend="openvino", precision="fp16"), tmp_path, _machine(AMX_XEON)
    )
    assert plan[0].missing and "fp32, bf16 or int8" in plan[0].missing


def test_missing_openvino_is_named_with_its_pip_extra(loaded_demo, tmp_path, monkeypatch, caplog):
    plan = plan_candidates(_settings(), tmp_path, _machine(AMX_XEON, openvino=False))
    assert "pip install 'triagenode[openvino]'" in (plan[0].missing or "")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(ModelLoadError, match=r"pip install 'triagenode\[openvino\]'"):
        import_openvino()
    with pytest.raises(ModelLoadError, match=r"triagenode\[openvino\]"):
        OpenVinoImageEncoder(tmp_path / "model.xml", precision="fp32")
    caplog.set_level(logging.INFO)
    encoder = select_backend(
        _settings(backend="openvino"), tmp_path, loaded_demo, machine=_machine(AMX_XEON)
    )
    assert isinstance(encoder, TorchImageEncoder)  # explicit backend: warned fallback
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("triagenode[openvino]" in w and "falling back" in w for w in warnings)
    assert "native bf16 (AMX)" in caplog.text  # why OpenVINO bf16 was tried first


# With OpenVINO installed --------------------------------------------------------------------


def test_cache_key_is_pure_and_every_field_changes_it():
    key = OpenVinoKey.for_cpu(AMX_XEON, "2026.4.1-22982-e213a14", "ab" * 32, "bf16", 224)
    name = openvino_cache_key(key)
    assert name == openvino_cache_key(
        OpenVinoKey.for_cpu(AMX_XEON, "2026.4.1-22982-e213a14", "ab" * 32, "bf16", 224)
    )
    assert name.startswith("intel-r-xeon-r-platinum-8480-ov2026.4.1-bf16-s224-")
    others = [
        OpenVinoKey.for_cpu(NO_BF16, key.openvino_version, key.source_sha256, "bf16", 224),
        OpenVinoKey.for_cpu(AMX_XEON, "2026.3.0", key.source_sha256, "bf16", 224),
        OpenVinoKey.for_cpu(AMX_XEON, key.openvino_version, "cd" * 32, "bf16", 224),
        OpenVinoKey.for_cpu(AMX_XEON, key.openvino_version, key.source_sha256, "fp32", 224),
        OpenVinoKey.for_cpu(AMX_XEON, key.openvino_version, key.source_sha256, "bf16", 256),
        OpenVinoKey(AMX_XEON.name, ("avx2",), key.openvino_version, key.source_sha256, "bf16", 224),
    ]
    assert len({openvino_cache_key(k) for k in others} | {name}) == len(others) + 1
    with pytest.raises(ValueError, match="precision"):
        openvino_cache_key(OpenVinoKey("cpu", (), "1", "x", "fp16", 224))


def test_cache_misses_then_hits_and_a_new_export_misses_again(loaded_demo, demo_onnx_dir, caplog):
    pytest.importorskip("openvino")
    caplog.set_level(logging.INFO, logger="triagenode.optimization.openvino_build")
    cache = demo_onnx_dir / "openvino"
    source = demo_onnx_dir / "image.onnx"
    first = ensure_openvino_model(loaded_demo, cache, precision="fp32", source_onnx=source)
    assert "cache miss" in caplog.text and first.is_file() and first.with_suffix(".bin").is_file()
    report = first.with_suffix(".json").read_text()
    assert '"passed": true' in report and '"source_sha256"' in report
    stamp = first.stat().st_mtime_ns
    caplog.clear()
    assert ensure_openvino_model(loaded_demo, cache, precision="fp32", source_onnx=source) == first
    assert "cache hit" in caplog.text and first.stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match="OpenVINO model"):
        ensure_openvino_model(loaded_demo, cache, precision="bf16", source_onnx=source, build=False)
    # Another export (other bytes: here one more metadata entry) is another source.
    import onnx

    model = onnx.load(str(source))
    model.metadata_props.add(key="note", value="re-exported")
    onnx.save(model, str(source))
    caplog.clear()
    second = ensure_openvino_model(loaded_demo, cache, precision="fp32", source_onnx=source)
    assert "cache miss" in caplog.text and second != first and first.is_file()
    assert not list(cache.glob(".*")), "no temporary files are left behind"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_through_the_classifier_matches_pytorch(
    loaded_demo, demo_onnx_dir, tmp_path, precision, caplog
):
    pytest.importorskip("openvino")
    caplog.set_level(logging.INFO)
    encoder = select_backend(
        _settings(backend="openvino", precision=precision),
        demo_onnx_dir,
        loaded_demo,
        machine=Machine.detect(),
        builder=OptimizationBuilder(),
    )
    if precision == "bf16" and not Machine.detect().cpu.bf16:
        assert encoder.precision == "fp32"  # this CPU has no native bf16
    else:
        assert (encoder.backend, encoder.precision) == ("openvino", precision)
    assert isinstance(encoder, OpenVinoImageEncoder)
    assert "backend selected: openvino/cpu/" in caplog.text
    torch_encoder = TorchImageEncoder(loaded_demo, device="cpu", precision="fp32")
    labels = LabelSettings()
    study, images = _ct_study(tmp_path)
    ours = ZeroShotClassifier(loaded_demo, encoder, labels).classify_study(study, images, "ct_head")
    ref = ZeroShotClassifier(loaded_demo, torch_encoder, labels).classify_study(
        study, images, "ct_head"
    )
    assert ours.backend == "openvino" and len(ours.images_used) == 4
    assert [f.name for f in ours.findings] == [f.name for f in ref.findings]
    for got, want in zip(ours.findings, ref.findings, strict=True):
        assert got.present == want.present
        assert abs(got.score - want.score) < (1e-4 if precision == "fp32" else 5e-3)
    x = demo_images(5, seed=13)
    cosine = (encoder.encode(x) * torch_encoder.encode(x)).sum(axis=1)
    assert cosine.min() >= (0.99999 if encoder.precision == "fp32" else 0.999)
    assert encoder.encode(x[:0]).shape == (0, loaded_demo.embed_dim)
    with pytest.raises(ValueError, match="shape"):
        encoder.encode(x[:, :, :8])


def test_auto_on_a_bf16_cpu_opens_openvino_from_the_export(loaded_demo, demo_onnx_dir, caplog):
    pytest.importorskip("openvino")
    caplog.set_level(logging.INFO)
    cpu = Machine.detect().cpu
    if not cpu.bf16:
        pytest.skip(f"{cpu.name} has no native bf16; auto keeps its old order there")
    encoder = select_backend(
        _settings(),
        demo_onnx_dir,
        loaded_demo,
        machine=Machine.detect(),
        builder=OptimizationBuilder(),
    )
    assert isinstance(encoder, OpenVinoImageEncoder) and encoder.precision == "bf16"
    assert "backend selected: openvino/cpu/bf16 (image.onnx)" in caplog.text
    assert list((demo_onnx_dir / "openvino").glob("*-bf16-*.xml")), "built once, cached"


def test_explicit_openvino_without_an_export_converts_pytorch(loaded_demo, tmp_path):
    pytest.importorskip("openvino")
    encoder = select_backend(
        _settings(backend="openvino", precision="fp32"),
        tmp_path,
        loaded_demo,
        machine=Machine.detect(),
        builder=OptimizationBuilder(),
    )
    assert isinstance(encoder, OpenVinoImageEncoder) and encoder.precision == "fp32"
    sidecar = next((tmp_path / "openvino").glob("*-fp32-*.json")).read_text()
    assert '"source_sha256": "torch:' in sidecar
    x = demo_images(3, seed=4)
    reference = TorchImageEncoder(loaded_demo, device="cpu", precision="fp32").encode(x)
    np.testing.assert_allclose(encoder.encode(x), reference, atol=1e-4)


def test_a_model_failing_parity_is_skipped_with_a_warning(loaded_demo, demo_onnx_dir, caplog):
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    caplog.set_level(logging.INFO)
    # INT8 on the demo's random weights moves the top-1 label of some phantoms (< 99 %).
    encoder = select_backend(
        _settings(backend="openvino", precision="int8"),
        demo_onnx_dir,
        loaded_demo,
        machine=Machine.detect(),
        builder=OptimizationBuilder(),
    )
    assert isinstance(encoder, TorchImageEncoder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("openvino/cpu/int8" in w and "parity below threshold" in w for w in warnings)
    assert not list((demo_onnx_dir / "openvino").glob("*int8*.xml"))


def test_without_a_builder_a_cached_model_is_found_and_a_missing_one_is_not_built(
    loaded_demo, demo_onnx_dir, caplog
):
    # inference only looks compiled models up; building is optimization's (EngineBuilder).
    pytest.importorskip("openvino")
    caplog.set_level(logging.INFO)
    settings = _settings(backend="openvino", precision="fp32")
    encoder = select_backend(settings, demo_onnx_dir, loaded_demo, machine=_machine(NO_BF16))
    assert isinstance(encoder, TorchImageEncoder)
    assert not list(demo_onnx_dir.glob("openvino/*.xml")), "nothing was built"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("openvino/cpu/fp32" in w and "no OpenVINO model" in w for w in warnings)

    built = ensure_openvino_model(
        loaded_demo,
        demo_onnx_dir / "openvino",
        precision="fp32",
        source_onnx=demo_onnx_dir / "image.onnx",
    )
    caplog.clear()
    encoder = select_backend(settings, demo_onnx_dir, loaded_demo, machine=_machine(NO_BF16))
    assert isinstance(encoder, OpenVinoImageEncoder) and encoder.precision == "fp32"
    assert f"OpenVINO model cache hit: {built.name}" in caplog.text
