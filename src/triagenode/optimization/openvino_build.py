"""OpenVINO models of the image tower, checked against PyTorch fp32 and cached per CPU.

Built like the TensorRT engines (:mod:`triagenode.optimization.tensorrt_build`): a model is
only trusted on the CPU, OpenVINO version, source model and precision that were checked, so
:func:`~triagenode.inference.backends.engine_cache.openvino_cache_key` turns those into a file
name (beside the backend that reads the models) and
:func:`ensure_openvino_model` returns the cached IR when its key matches and builds one
otherwise. A build reads the parity-checked ONNX export when there is one, else converts the
PyTorch image tower directly; bf16 models store fp16 weights (half the file and the resident
memory; the CPU computes in bf16 either way), INT8 models come from NNCF post-training
quantisation calibrated on DICOM-like phantoms. The IR is written only when its embeddings
pass parity with PyTorch fp32 on the same images (:data:`~triagenode.optimization.parity.BF16`
for bf16: cosine >= 0.999 and 99 % top-1 agreement); the report is kept beside it as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.inference.backends.cpu import CpuCapabilities, detect_cpu
from triagenode.inference.backends.engine_cache import (
    OPENVINO_PRECISIONS,
    find_openvino_model,
    openvino_key,
    openvino_model_path,
)
from triagenode.inference.backends.openvino import OpenVinoImageEncoder, import_openvino
from triagenode.optimization import parity
from triagenode.optimization.parity import ParityError, ParityReport, ParityThresholds
from triagenode.optional import require

__all__ = ["build_openvino_model", "ensure_openvino_model"]

log = logging.getLogger(__name__)

THRESHOLDS = {"fp32": parity.FP32, "bf16": parity.BF16, "int8": parity.INT8}


def _source_model(ov: Any, loaded: Any, source_onnx: Path | None) -> Any:
    if source_onnx is not None:
        return ov.Core().read_model(str(source_onnx))
    import torch

    from triagenode.optimization.onnx_export import ImageTower

    size = int(loaded.preprocess.image_size)
    example = torch.zeros((1, 3, size, size), dtype=torch.float32)
    # Tracing warns about Python-side constants in timm/open_clip; the parity check that
    # follows every build is what decides whether the converted graph is right.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = ov.convert_model(ImageTower(loaded.clip.eval()).eval(), example_input=example)
    model.reshape({model.inputs[0]: ov.PartialShape([-1, 3, size, size])})
    return model


def _quantize_int8(model: Any, images: np.ndarray) -> Any:
    nncf = require("nncf", "openvino", "OpenVINO INT8")
    dataset = nncf.Dataset([images[i : i + 1] for i in range(len(images))])
    return nncf.quantize(
        model,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(images),
        fast_bias_correction=True,
    )


def _reference(loaded: Any, images: np.ndarray) -> np.ndarray:
    import torch

    from triagenode.optimization.onnx_export import ImageTower

    tower = ImageTower(loaded.clip.eval()).eval()
    with torch.inference_mode():
        parts = [tower(torch.from_numpy(images[i : i + 8])) for i in range(0, len(images), 8)]
    return torch.cat(parts).float().numpy()


def build_openvino_model(
    loaded: Any,
    out_path: Path,
    *,
    precision: str,
    source_onnx: Path | None = None,
    images: np.ndarray | None = None,
    text_embeds: np.ndarray | None = None,
    n_images: int = 16,
    threads: int = 0,
    cpu: CpuCapabilities | None = None,
    thresholds: ParityThresholds | None = None,
) -> ParityReport:
    """Convert, optionally quantise, check and write one OpenVINO IR of the image tower.

    Parameters
    ----------
    loaded : triagenode.inference.model.LoadedModel
        The PyTorch model: the parity reference, and the source when ``source_onnx`` is None.
    out_path : pathlib.Path
        The ``.xml`` to write (with its ``.bin``); both appear only after parity passed.
    precision : {"fp32", "bf16", "int8"}
        Already resolved for this CPU.
    source_onnx : pathlib.Path, optional
        The parity-checked fp32 ``image.onnx``; None converts the PyTorch tower.
    images : numpy.ndarray, optional
        Parity (and INT8 calibration) images; default ``n_images`` synthetic phantoms.
    text_embeds : numpy.ndarray, optional
        Label embeddings for the top-1 agreement; default the shipped label prompts.
    threads : int
        Threads for the parity run.
    cpu : CpuCapabilities, optional
        Detected when None.
    thresholds : ParityThresholds, optional
        Default per precision: FP32, BF16, INT8 of :mod:`~triagenode.optimization.parity`.

    Returns
    -------
    ParityReport

    Raises
    ------
    ParityError
        When parity is below the thresholds; nothing is written.
    """
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {OPENVINO_PRECISIONS} (got {precision!r})")
    ov = import_openvino()
    pre = loaded.preprocess
    if images is None:
        images = parity.synthetic_images(n_images, pre.image_size, pre.mean, pre.std, seed=5)
    if text_embeds is None:
        from triagenode.optimization.onnx_export import label_prompts

        text_embeds = np.asarray(loaded.encode_text(label_prompts()))
    started = time.perf_counter()
    model = _source_model(ov, loaded, source_onnx)
    if precision == "int8":
        model = _quantize_int8(model, images)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.tmp.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=precision == "bf16")
    del model
    tmp_bin = tmp.with_suffix(".bin")
    try:
        encoder = OpenVinoImageEncoder(tmp, precision=precision, threads=threads, cpu=cpu)
        try:
            candidate = np.concatenate(
                [encoder.encode(images[i : i + 8]) for i in range(0, len(images), 8)]
            )
        finally:
            encoder.close()
        report = parity.compare_embeddings(
            _reference(loaded, images),
            candidate,
            text_embeds,
            float(loaded.logit_scale),
            thresholds or THRESHOLDS[precision],
        )
        if not report.passed:
            raise ParityError(report, f"OpenVINO {precision} model {out_path.name}")
        os.replace(tmp_bin, out_path.with_suffix(".bin"))
        os.replace(tmp, out_path)  # the .xml last: its presence means a complete model
    finally:
        tmp.unlink(missing_ok=True)
        tmp_bin.unlink(missing_ok=True)
    log.info(
        "built OpenVINO %s model %s in %.0f s (%s)",
        precision,
        out_path.name,
        time.perf_counter() - started,
        report.summary(),
    )
    return report


def ensure_openvino_model(
    loaded: Any,
    cache_dir: Path,
    *,
    precision: str,
    source_onnx: Path | None = None,
    cpu: CpuCapabilities | None = None,
    build: bool = True,
    threads: int = 0,
    images: np.ndarray | None = None,
) -> Path:
    """The cached IR for this CPU, OpenVINO version, source and precision; built when missing.

    Parameters
    ----------
    loaded : triagenode.inference.model.LoadedModel
        Reference and (without ``source_onnx``) source of the model.
    cache_dir : pathlib.Path
        ``<artifacts_dir>/openvino``.
    precision : {"fp32", "bf16", "int8"}
        Already resolved for this CPU.
    source_onnx : pathlib.Path, optional
        ``image.onnx`` (hashed into the key); None converts from PyTorch (keyed by the
        weights' hash).
    cpu : CpuCapabilities, optional
        Detected when None.
    build : bool
        When False, a missing model raises instead of being built.
    threads : int
        Threads for the parity run of a build.
    images : numpy.ndarray, optional
        Parity/calibration images for a build.

    Returns
    -------
    pathlib.Path
        The model's ``.xml``.

    Raises
    ------
    FileNotFoundError
        When ``build`` is False and no model matches.
    ParityError
        When a build fails parity (nothing is cached).
    """
    ov = import_openvino()
    cpu = cpu or detect_cpu()
    key = openvino_key(
        loaded,
        precision=precision,
        openvino_version=ov.get_version(),
        source_onnx=source_onnx,
        cpu=cpu,
    )
    path = openvino_model_path(cache_dir, key)
    if path.is_file() and path.with_suffix(".bin").is_file():
        log.info("OpenVINO model cache hit: %s", path.name)
        return path
    if not build:
        return find_openvino_model(cache_dir, key)  # raises: names the model and the setting
    log.info("OpenVINO model cache miss: building %s", path.name)
    report = build_openvino_model(
        loaded,
        path,
        precision=precision,
        source_onnx=source_onnx,
        images=images,
        threads=threads,
        cpu=cpu,
    )
    sidecar = {"key": key.to_dict(), "parity": report.to_dict()}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    return path
