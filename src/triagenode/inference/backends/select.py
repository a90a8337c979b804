"""``model.backend = auto``: the fastest backend this machine has, with artefacts that fit.

Order (README, "Backends"):

- GPU: TensorRT engine > ONNX Runtime (TensorRT EP, then CUDA EP) > PyTorch CUDA (bf16,
  then fp16). Not measured by this project: it follows the usual ranking of these runtimes
  and is to be confirmed with ``benchmarks/gpu_suite.py``.
- CPU with native bf16 (AMX or AVX-512 BF16, :mod:`~triagenode.inference.backends.cpu`):
  OpenVINO bf16 first when ``image.onnx`` is exported (built from it, parity-checked and
  cached on first start in seconds; figures in ``docs/performance.md``), then:
- CPU, as measured on the BiomedCLIP architecture (``docs/performance.md``): ONNX Runtime
  dynamic INT8 (several times PyTorch fp32, same top-1 on the parity phantoms) > PyTorch
  fp32 > ONNX Runtime fp32 (faster than PyTorch at batch 1, equal at batch 8, but only a
  copy of the reference numerics that needs an artefact). PyTorch bf16 (autocast) only on request.
- ``backend = "openvino"``: bf16 where the CPU has it, else fp32 (an INFO line says so), from
  ``image.onnx`` or, without it, converted from PyTorch; ``precision = "int8"`` quantises
  with NNCF on first start.

A candidate whose artefact is missing is skipped (logged at INFO: that is the normal state of
a fresh node); an artefact exported from other weights is refused as stale; a candidate that
exists but fails to load logs a WARNING with the reason and the next one is tried. An
explicit backend that cannot load falls back to PyTorch with a WARNING, never silently.

The builds "on first start" above are done by the :class:`EngineBuilder` the caller passes
(the node passes :class:`triagenode.optimization.builder.OptimizationBuilder`); this module
only looks compiled models up (:mod:`~triagenode.inference.backends.engine_cache`), and
without a builder a model missing from the cache is skipped like a missing artefact.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from triagenode.errors import ConfigError, ModelLoadError
from triagenode.inference.backends.artifacts import (
    IMAGE_FP16,
    IMAGE_FP32,
    IMAGE_INT8_DYNAMIC,
    IMAGE_INT8_STATIC,
    engines_dir,
    openvino_dir,
    read_onnx_metadata,
)
from triagenode.inference.backends.base import ImageEncoder
from triagenode.inference.backends.cpu import CpuCapabilities, detect_cpu
from triagenode.inference.backends.engine_cache import (
    EngineBuilder,
    find_openvino_model,
    find_tensorrt_engine,
    openvino_key,
    tensorrt_key,
)

__all__ = ["Candidate", "Machine", "plan_candidates", "select_backend"]

log = logging.getLogger(__name__)

_UNKNOWN_CPU = CpuCapabilities("unknown", frozenset())


@dataclass(frozen=True)
class Machine:
    """What the selection depends on besides settings and files; detected or given in tests."""

    cuda: bool
    tensorrt: bool
    ort_providers: tuple[str, ...]
    openvino: bool = False
    cpu: CpuCapabilities = _UNKNOWN_CPU

    @classmethod
    def detect(cls) -> Machine:
        cuda = False
        if importlib.util.find_spec("torch") is not None:
            import torch

            cuda = bool(torch.cuda.is_available())
        providers: tuple[str, ...] = ()
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime as ort

            providers = tuple(ort.get_available_providers())
        return cls(
            cuda,
            importlib.util.find_spec("tensorrt") is not None,
            providers,
            openvino=importlib.util.find_spec("openvino") is not None,
            cpu=detect_cpu(),
        )


@dataclass(frozen=True)
class Candidate:
    """One way to run the image tower, in order of preference."""

    backend: str  # torch, onnxruntime, openvino, tensorrt
    device: str  # cpu or cuda
    precision: str  # fp32, fp16, bf16, int8
    artifact: Path | None = None  # ONNX file for onnxruntime/tensorrt (openvino: if any)
    missing: str | None = field(default=None, compare=False)  # why it cannot be used

    def describe(self) -> str:
        where = f" ({self.artifact.name})" if self.artifact else ""
        return f"{self.backend}/{self.device}/{self.precision}{where}"


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def plan_candidates(settings: Any, artifacts_dir: Path | None, machine: Machine) -> list[Candidate]:
    """Candidates for ``settings`` (a ``ModelSettings``), best first, each marked usable or not.

    Pure apart from checking which files exist: no model is loaded, so it is cheap to test.
    """
    folder = Path(artifacts_dir) if artifacts_dir is not None else Path("(no artifacts_dir)")
    gpu = machine.cuda and settings.device != "cpu"
    precision = settings.precision
    wanted = settings.backend
    out: list[Candidate] = []

    def add(
        backend: str,
        device: str,
        prec: str,
        names: tuple[str, ...] | None = None,
        need: str | None = None,
        *,
        on_request: bool = False,
    ) -> None:
        if wanted not in ("auto", backend) or precision not in ("auto", prec):
            return
        if on_request and precision != prec:
            return
        artifact = _first_existing(folder, names) if names else None
        missing = need
        if names and artifact is None and missing is None:
            missing = f"no {' or '.join(names)} in {folder} (run `triagenode optimize`)"
        out.append(
            Candidate(
                backend, device, prec, artifact or (folder / names[0] if names else None), missing
            )
        )

    if gpu:
        no_trt = None if machine.tensorrt else "tensorrt is not installed"
        add("tensorrt", "cuda", "int8", (IMAGE_INT8_STATIC,), no_trt)
        add("tensorrt", "cuda", "fp16", (IMAGE_FP32,), no_trt)
        ort_gpu = {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(
            machine.ort_providers
        )
        no_ep = (
            None if ort_gpu else "onnxruntime has no CUDA or TensorRT provider (onnxruntime-gpu)"
        )
        add("onnxruntime", "cuda", "fp16", (IMAGE_FP16,), no_ep)
        add("torch", "cuda", "bf16")  # as fast as fp16 (docs/performance.md), wider range
        add("torch", "cuda", "fp16")
        add("onnxruntime", "cuda", "fp32", (IMAGE_FP32,), no_ep)
        add("torch", "cuda", "fp32")
    _add_openvino(out, settings, artifacts_dir, machine)
    add("onnxruntime", "cpu", "int8", (IMAGE_INT8_DYNAMIC, IMAGE_INT8_STATIC))
    add("torch", "cpu", "fp32")
    add("onnxruntime", "cpu", "fp32", (IMAGE_FP32,))
    add("torch", "cpu", "bf16", on_request=True)  # autocast; a measured option, not a default
    return out


def _add_openvino(
    out: list[Candidate], settings: Any, artifacts_dir: Path | None, machine: Machine
) -> None:
    """OpenVINO candidates: bf16 first under ``auto`` on a bf16 CPU, any precision on request."""
    from triagenode.inference.backends.openvino import INSTALL_HINT, resolve_openvino_precision

    wanted, precision = settings.backend, settings.precision
    if wanted == "auto":
        if not (machine.cpu.bf16 and precision in ("auto", "bf16")):
            return
        resolved = "bf16"
    elif wanted == "openvino":
        try:
            resolved = resolve_openvino_precision(precision, machine.cpu)
        except ConfigError as exc:
            out.append(Candidate("openvino", "cpu", precision, None, str(exc)))
            return
    else:
        return
    missing = None if machine.openvino else f"openvino is not installed ({INSTALL_HINT})"
    if artifacts_dir is None and missing is None:
        missing = "no model.artifacts_dir to cache the OpenVINO model in"
    onnx = Path(artifacts_dir) / IMAGE_FP32 if artifacts_dir is not None else None
    source = onnx if onnx is not None and onnx.is_file() else None
    if wanted == "auto" and source is None and missing is None:
        # Converting from PyTorch traces the model (minutes for ViT-B on a small CPU); auto,
        # like for TensorRT, does not start that at every fresh start.
        missing = (
            f"no {IMAGE_FP32} in {artifacts_dir} (run `triagenode optimize export-onnx`, "
            'or set model.backend = "openvino" to convert from PyTorch)'
        )
    artifact = source if source is not None or missing is None else onnx
    out.append(Candidate("openvino", "cpu", resolved, artifact, missing))


def _check_weights(candidate: Candidate, loaded_model: Any) -> None:
    if candidate.artifact is None or candidate.backend == "torch":
        return
    meta = read_onnx_metadata(candidate.artifact)
    expected = loaded_model.identity.weights_sha256
    if meta.get("weights_sha256") != expected:
        raise ModelLoadError(
            f"{candidate.artifact.name} was exported from other weights "
            f"({str(meta.get('weights_sha256'))[:12]} != {expected[:12]}); re-run "
            "`triagenode optimize export-onnx`"
        )


def _build(
    candidate: Candidate,
    settings: Any,
    artifacts_dir: Path,
    loaded_model: Any,
    *,
    builder: EngineBuilder | None = None,
) -> ImageEncoder:
    _check_weights(candidate, loaded_model)
    if candidate.backend == "onnxruntime":
        from triagenode.inference.backends.onnxruntime import OnnxRuntimeImageEncoder

        return OnnxRuntimeImageEncoder(
            candidate.artifact,  # type: ignore[arg-type]
            device=candidate.device,
            threads=settings.threads,
            graph_optimization=getattr(settings, "graph_optimization", "all"),
            max_batch=settings.max_batch,
        )
    if candidate.backend == "openvino":
        from triagenode.inference.backends.openvino import OpenVinoImageEncoder, import_openvino

        ov_key = openvino_key(
            loaded_model,
            precision=candidate.precision,
            openvino_version=import_openvino().get_version(),
            source_onnx=candidate.artifact,
        )
        try:
            path = find_openvino_model(openvino_dir(artifacts_dir), ov_key)
            log.info("OpenVINO model cache hit: %s", path.name)
        except FileNotFoundError:
            if builder is None:
                raise
            path = builder.openvino_model(
                loaded_model,
                openvino_dir(artifacts_dir),
                precision=candidate.precision,
                source_onnx=candidate.artifact,
                threads=settings.threads,
            )
        return OpenVinoImageEncoder(
            path,
            precision=candidate.precision,
            threads=settings.threads,
            performance_hint=getattr(settings, "performance_hint", "latency"),
        )
    if candidate.backend == "tensorrt":
        from triagenode.inference.backends.tensorrt import TensorRTImageEncoder

        size = loaded_model.preprocess.image_size
        assert candidate.artifact is not None  # tensorrt candidates always name their ONNX
        trt_key = tensorrt_key(
            candidate.artifact,
            precision=candidate.precision,
            max_batch=settings.max_batch,
            image_size=size,
        )
        try:
            engine = find_tensorrt_engine(engines_dir(artifacts_dir), trt_key)
            log.info("TensorRT engine cache hit: %s", engine.name)
        except FileNotFoundError:
            # auto never starts a minutes-long build at start-up; an explicit choice does.
            if builder is None or settings.backend != "tensorrt":
                raise
            engine = builder.tensorrt_engine(
                candidate.artifact,
                engines_dir(artifacts_dir),
                precision=candidate.precision,
                max_batch=settings.max_batch,
                image_size=size,
            )
        return TensorRTImageEncoder(
            engine, precision=candidate.precision, max_batch=settings.max_batch, image_size=size
        )
    return _torch_encoder(loaded_model, settings, candidate.device, candidate.precision)


def _torch_encoder(loaded_model: Any, settings: Any, device: str, precision: str) -> ImageEncoder:
    import torch

    from triagenode.inference.backends.torch import TorchImageEncoder

    if settings.threads:
        torch.set_num_threads(settings.threads)
    return TorchImageEncoder(
        loaded_model, device=device, precision=precision, max_batch=settings.max_batch
    )


def _triton_encoder(model_settings: Any, loaded_model: Any) -> ImageEncoder:
    """``backend = "triton"``: the image tower on a Triton server, no local candidates.

    No fallback to PyTorch: a node set up for a shared GPU pool that quietly ran ViT on its
    own CPU would fall hours behind; an unreachable or mismatching server stops the start.
    """
    from triagenode.inference.backends.triton import TritonImageEncoder

    return TritonImageEncoder(
        model_settings.triton,
        image_size=loaded_model.preprocess.image_size,
        embed_dim=loaded_model.embed_dim,
        weights_sha256=loaded_model.identity.weights_sha256,
    )


def select_backend(
    model_settings: Any,
    artifacts_dir: Path | None,
    loaded_model: Any,
    *,
    machine: Machine | None = None,
    builder: EngineBuilder | None = None,
    build: Callable[[Candidate, Any, Path, Any], ImageEncoder] | None = None,
) -> ImageEncoder:
    """Open the best usable image encoder for these settings on this machine.

    Parameters
    ----------
    model_settings : triagenode.config.settings.ModelSettings
        ``backend``, ``device``, ``precision``, ``threads``, ``max_batch`` are used.
    artifacts_dir : pathlib.Path or None
        Where ``triagenode optimize`` wrote ONNX models and engines; None: there are none.
    loaded_model : triagenode.inference.model.LoadedModel
        The model (PyTorch fallback, and the weights hash the artefacts must match).
    machine : Machine, optional
        Detected when None.
    builder : EngineBuilder, optional
        Builds a TensorRT engine or OpenVINO model missing from the cache
        (:class:`triagenode.optimization.builder.OptimizationBuilder`); without one, a
        candidate whose compiled model is not cached is skipped like a missing artefact.
    build : callable, optional
        Opens one candidate (tests substitute it); by default :func:`_build` with ``builder``.

    Returns
    -------
    ImageEncoder

    Raises
    ------
    ModelLoadError
        When no candidate, not even PyTorch on CPU, can be opened.
    """
    if model_settings.backend == "triton":
        return _triton_encoder(model_settings, loaded_model)
    machine = machine or Machine.detect()
    if build is None:
        build = functools.partial(_build, builder=builder)
    candidates = plan_candidates(model_settings, artifacts_dir, machine)
    log.info(
        "CPU %s: %s; openvino %s",
        machine.cpu.describe(),
        "native bf16 (" + ("AMX" if machine.cpu.amx else "AVX-512 BF16") + ")"
        if machine.cpu.bf16
        else "no native bf16",
        "installed" if machine.openvino else "not installed",
    )
    folder = Path(artifacts_dir) if artifacts_dir is not None else Path(".")
    explicit = model_settings.backend != "auto"
    failures: list[str] = []
    for candidate in candidates:
        if candidate.missing:
            failures.append(f"{candidate.describe()}: {candidate.missing}")
            log.log(
                logging.WARNING if explicit else logging.INFO,
                "backend %s skipped: %s",
                candidate.describe(),
                candidate.missing,
            )
            continue
        try:
            encoder = build(candidate, model_settings, folder, loaded_model)
        except Exception as exc:  # any load failure means: try the next candidate
            failures.append(f"{candidate.describe()}: {exc}")
            log.warning(
                "backend %s cannot load, trying the next one: %s", candidate.describe(), exc
            )
            continue
        log.info(
            "backend selected: %s (setting backend=%s device=%s precision=%s)",
            candidate.describe(),
            model_settings.backend,
            model_settings.device,
            model_settings.precision,
        )
        return encoder
    fallback = Candidate("torch", "cpu", "fp32")
    if explicit or model_settings.precision != "auto":
        log.warning(
            "backend=%s precision=%s is not usable here (%s); falling back to %s",
            model_settings.backend,
            model_settings.precision,
            "; ".join(failures),
            fallback.describe(),
        )
        try:
            return build(fallback, model_settings, folder, loaded_model)
        except Exception as exc:
            failures.append(f"{fallback.describe()}: {exc}")
    raise ModelLoadError("no inference backend could be opened: " + "; ".join(failures))
