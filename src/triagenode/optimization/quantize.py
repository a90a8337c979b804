"""INT8 image towers for CPUs: dynamic, and static calibrated on a folder of DICOM images.

Dynamic quantisation stores MatMul/Gemm weights as int8 and quantises activations on the
fly; on a CPU with AVX-512 VNNI it runs the ViT-B/16 image tower several times faster than
fp32 ONNX Runtime. Per-channel weight scales are the default: they kept top-1 agreement with
fp32 where per-tensor scales lost some (figures in ``docs/performance.md``). Static
quantisation (QDQ format, the form TensorRT and the CUDA EP consume) calibrates activation
ranges on real preprocessed DICOM images.

Both write the model only when its parity with the fp32 reference reaches
:data:`triagenode.optimization.parity.INT8` (top-1 agreement >= 99 %).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triagenode.inference.backends.artifacts import (
    IMAGE_INT8_DYNAMIC,
    IMAGE_INT8_STATIC,
    METADATA_PREFIX,
)
from triagenode.optimization import parity
from triagenode.optimization.onnx_export import run_onnx
from triagenode.optimization.parity import ParityError, ParityReport, ParityThresholds
from triagenode.optional import require

__all__ = [
    "DicomCalibrationReader",
    "QuantizeResult",
    "dicom_files",
    "quantize_image_tower",
    "sensitive_nodes",
]

log = logging.getLogger(__name__)

_PURPOSE = "INT8 quantisation"

_CALIBRATION: dict[str, Callable[[Any], Any]] = {
    "minmax": lambda m: m.MinMax,
    "percentile": lambda m: m.Percentile,
    "entropy": lambda m: m.Entropy,
}
_BLOCK = re.compile(r"blocks\.(\d+)/")
# Only the GEMMs carry the cost; LayerNorm, Softmax, GELU and the residual adds stay fp32,
# where int8 would cost accuracy for no speed.
QUANTIZED_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_image_tower` wrote and how it compares with fp32."""

    path: Path
    mode: str
    report: ParityReport
    seconds: float
    fp32_nodes: int = 0  # GEMMs left unquantised

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "mode": self.mode,
            "seconds": round(self.seconds, 2),
            "fp32_nodes": self.fp32_nodes,
            "parity": self.report.to_dict(),
        }


def dicom_files(folder: Path) -> list[Path]:
    """DICOM files under ``folder`` (recursive), by the ``DICM`` preamble, sorted by path."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    found.append(path)
    return found


class DicomCalibrationReader:
    """Feeds preprocessed DICOM images to ONNX Runtime's calibrator, one batch per call.

    Implements ``onnxruntime.quantization.CalibrationDataReader`` (``get_next``,
    ``rewind``). Files that cannot be preprocessed are skipped with a warning naming the
    file (never its patient data), as the node does with an undecodable image.

    Parameters
    ----------
    folder : pathlib.Path
        Searched recursively for DICOM files.
    to_tensor : callable
        ``path -> float32 (3, H, W)`` array, the node's preprocessing for the model.
    input_name : str
        The ONNX model's image input.
    limit : int
        Use at most this many files (evenly spaced over the sorted list).
    batch_size : int
        Images per calibration batch.
    """

    def __init__(
        self,
        folder: Path,
        to_tensor: Callable[[Path], np.ndarray],
        input_name: str = "pixel_values",
        limit: int = 128,
        batch_size: int = 8,
    ) -> None:
        files = dicom_files(folder)
        if not files:
            raise ValueError(f"calibration folder {folder}: no DICOM files found")
        if len(files) > limit:
            files = [files[i] for i in np.linspace(0, len(files) - 1, limit).astype(int)]
        self.files = files
        self.to_tensor = to_tensor
        self.input_name = input_name
        self.batch_size = batch_size
        self._batches: Iterator[dict[str, np.ndarray]] | None = None
        self._images: np.ndarray | None = None

    def images(self) -> np.ndarray:
        """All calibration images ``(N, 3, H, W)``, preprocessed once and kept."""
        if self._images is None:
            arrays = []
            for path in self.files:
                try:
                    arrays.append(np.asarray(self.to_tensor(path), dtype=np.float32))
                except Exception as exc:  # one bad file must not stop calibration
                    log.warning("calibration: skipped %s (%s)", path.name, type(exc).__name__)
            if not arrays:
                raise ValueError("calibration: none of the DICOM files could be preprocessed")
            self._images = np.stack(arrays)
        return self._images

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            images = self.images()
            self._batches = iter(
                {self.input_name: images[i : i + self.batch_size]}
                for i in range(0, len(images), self.batch_size)
            )
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = None


def sensitive_nodes(model_path: Path) -> list[str]:
    """GEMMs of the first and last transformer blocks and of the head (``keep_fp32="edges"``).

    On the BiomedCLIP architecture, keeping these 13 of 73 GEMMs in fp32 brought the
    embeddings a little closer to fp32 but cost batch-1 latency, and the centred top-1
    agreement (see :class:`~triagenode.optimization.parity.ParityReport`) did not improve
    (figures in ``docs/performance.md``). Hence the default is ``none``; ``edges`` is
    there for trained weights where the parity report says it is needed. Blocks are found
    by timm's ``blocks.<i>/`` node names; a graph without them gets an empty list.
    """
    onnx = require("onnx", "onnx", _PURPOSE)
    model = onnx.load(str(model_path), load_external_data=False)
    gemms = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    blocks = {name: int(m.group(1)) for name in gemms if (m := _BLOCK.search(name))}
    if not blocks:
        return []
    edges = {min(blocks.values()), max(blocks.values())}
    last = max(i for i, name in enumerate(gemms) if name in blocks)
    return [
        name
        for i, name in enumerate(gemms)
        if blocks.get(name) in edges or (name not in blocks and i > last)
    ]


def _copy_metadata(src: Path, dst: Path, precision: str, extra: dict[str, Any]) -> None:
    onnx = require("onnx", "onnx", _PURPOSE)
    source = onnx.load(str(src), load_external_data=False)
    model = onnx.load(str(dst))
    props = {p.key: p.value for p in source.metadata_props}
    props[METADATA_PREFIX + "precision"] = json.dumps(precision)
    for key, value in extra.items():
        props[METADATA_PREFIX + key] = json.dumps(value)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # onnxruntime.quantization logs one INFO line per tensor on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _run_quantizer(
    mode: str,
    src: Path,
    dst: Path,
    calibration: Any,
    per_channel: bool,
    nodes_to_exclude: list[str] | None,
    calibrate_method: str,
) -> None:
    quantization = require("onnxruntime.quantization", "onnx", _PURPOSE)
    if mode == "dynamic":
        quantization.quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=per_channel,
            weight_type=quantization.QuantType.QInt8,
            nodes_to_exclude=nodes_to_exclude or [],
        )
        return
    quantization.quantize_static(
        src,
        dst,
        calibration,
        quant_format=quantization.QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=per_channel,
        activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8,
        nodes_to_exclude=nodes_to_exclude or [],
        calibrate_method=_CALIBRATION[calibrate_method](quantization.CalibrationMethod),
        # Symmetric activations are what TensorRT's explicit quantisation expects.
        extra_options={"ActivationSymmetric": True, "CalibPercentile": 99.99},
    )


def quantize_image_tower(
    fp32_path: Path,
    mode: str,
    out_path: Path | None = None,
    *,
    images: np.ndarray,
    text_embeds: np.ndarray,
    logit_scale: float,
    reference: np.ndarray | None = None,
    calibration: Any = None,
    per_channel: bool = True,
    nodes_to_exclude: list[str] | None = None,
    keep_fp32: str = "none",
    calibrate_method: str = "minmax",
    thresholds: ParityThresholds = parity.INT8,
) -> QuantizeResult:
    """Quantise the fp32 image tower to INT8 and keep it only if parity holds.

    Parameters
    ----------
    fp32_path : pathlib.Path
        ``image.onnx`` written by :func:`~triagenode.optimization.onnx_export.export_onnx`.
    mode : {"dynamic", "static"}
        Dynamic needs no data; static needs ``calibration``.
    out_path : pathlib.Path, optional
        Default ``image.int8-dynamic.onnx`` / ``image.int8-static.onnx`` beside the input.
    images : numpy.ndarray
        Preprocessed parity images ``(N,3,H,W)``.
    text_embeds : numpy.ndarray
        Label embeddings ``(L, D)`` for the top-1 agreement.
    logit_scale : float
        The model's zero-shot temperature.
    reference : numpy.ndarray, optional
        PyTorch fp32 embeddings of ``images``; the fp32 ONNX model's when None.
    calibration : CalibrationDataReader, optional
        E.g. :class:`DicomCalibrationReader`; required for ``static``.
    per_channel : bool
        Per-output-channel weight scales.
    nodes_to_exclude : list of str, optional
        Further node names kept in fp32.
    keep_fp32 : {"none", "edges"}
        ``edges``: keep :func:`sensitive_nodes` (first and last block, head) in fp32.
    calibrate_method : {"minmax", "percentile", "entropy"}
        How static quantisation picks activation ranges.
    thresholds : ParityThresholds
        What the INT8 model must reach to be written.

    Returns
    -------
    QuantizeResult

    Raises
    ------
    ParityError
        When parity is below ``thresholds``; nothing is written.
    ValueError
        For an unknown ``mode`` or ``static`` without calibration data.
    """
    fp32_path = Path(fp32_path)
    if mode not in ("dynamic", "static"):
        raise ValueError(f"mode must be 'dynamic' or 'static' (got {mode!r})")
    if mode == "static" and calibration is None:
        raise ValueError("static quantisation needs calibration data (a folder of DICOM files)")
    name = IMAGE_INT8_DYNAMIC if mode == "dynamic" else IMAGE_INT8_STATIC
    out_path = Path(out_path or fp32_path.with_name(name))
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    if keep_fp32 not in ("edges", "none"):
        raise ValueError(f"keep_fp32 must be 'edges' or 'none' (got {keep_fp32!r})")
    excluded = list(nodes_to_exclude or [])
    if keep_fp32 == "edges":
        excluded += sensitive_nodes(fp32_path)
    started = time.perf_counter()
    with _quiet_root_logger():
        _run_quantizer(mode, fp32_path, tmp, calibration, per_channel, excluded, calibrate_method)
    seconds = time.perf_counter() - started
    if reference is None:
        reference = run_onnx(fp32_path, images)
    report = parity.compare_embeddings(
        reference, run_onnx(tmp, images), text_embeds, logit_scale, thresholds
    )
    if not report.passed:
        tmp.unlink(missing_ok=True)
        raise ParityError(report, f"{out_path} (INT8 {mode})")
    _copy_metadata(
        fp32_path,
        tmp,
        "int8",
        {"quantization": mode, "per_channel": per_channel, "fp32_nodes": len(excluded)},
    )
    os.replace(tmp, out_path)
    log.info("wrote %s in %.1f s: %s", out_path, seconds, report.summary())
    return QuantizeResult(out_path, mode, report, seconds, len(excluded))
