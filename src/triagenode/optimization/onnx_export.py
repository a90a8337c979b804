"""Export the image and text towers to ONNX, checked against PyTorch fp32 before writing.

Each tower is its own ONNX model with a dynamic batch axis, so the node can encode images
with ONNX Runtime or TensorRT while label prompts (encoded once and cached) may come from
either. A file is written only when ``onnx.checker`` accepts it and its parity with PyTorch
fp32 on the same inputs reaches the thresholds; otherwise :class:`ParityError` is raised and
nothing is left behind. Each file carries the model identity, the weights hash and the
preprocess config in ``metadata_props`` (read back by
:func:`triagenode.inference.backends.artifacts.read_onnx_metadata`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triagenode.inference.backends.artifacts import (
    IMAGE_FP16,
    IMAGE_FP32,
    METADATA_PREFIX,
    TEXT_FP32,
)
from triagenode.optimization import parity
from triagenode.optimization.parity import ParityError, ParityReport, ParityThresholds
from triagenode.optional import require

__all__ = [
    "DEFAULT_OPSET",
    "ExportResult",
    "ImageTower",
    "TextTower",
    "export_onnx",
    "label_prompts",
    "make_fp16_variant",
    "run_onnx",
]

log = logging.getLogger(__name__)

_PURPOSE = "ONNX export"

DEFAULT_OPSET = 18
IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"


class ImageTower(torch.nn.Module):
    """``pixel_values (N,3,H,W) -> image_embeds (N,D)``, unit rows, as the backends return."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.visual(pixel_values), dim=-1)  # type: ignore[operator]


class TextTower(torch.nn.Module):
    """``input_ids (N,L) int64 -> text_embeds (N,D)``, unit rows."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        features = self.clip.encode_text(input_ids)  # type: ignore[operator]
        return torch.nn.functional.normalize(features, dim=-1)


@dataclass(frozen=True)
class ExportResult:
    """Paths written and the parity of each against PyTorch fp32."""

    image_path: Path
    text_path: Path | None
    image_parity: ParityReport
    text_parity: ParityReport | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_path": str(self.image_path),
            "text_path": str(self.text_path) if self.text_path else None,
            "image_parity": self.image_parity.to_dict(),
            "text_parity": self.text_parity.to_dict() if self.text_parity else None,
        }


def label_prompts() -> list[str]:
    """One prompt per label of every shipped label set: the parity label sample."""
    from triagenode.config.labels import default_label_settings

    prompts: list[str] = []
    for label_set in default_label_settings().sets.values():
        prompts.extend(label.prompts[0] for label in label_set.labels)
    return list(dict.fromkeys(prompts))


def run_onnx(path: Path, inputs: np.ndarray, *, batch: int = 16, threads: int = 0) -> np.ndarray:
    """Run a one-input ONNX model on CPU in batches and stack the first output."""
    ort = require("onnxruntime", "onnx", "Running an ONNX model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [
        session.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)
    ]
    return np.concatenate(parts).astype(np.float32)


def _as_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if hasattr(config, "model_dump"):
        return dict(config.model_dump())
    return dict(config)


def _metadata(loaded: Any, tower: str, precision: str) -> dict[str, str]:
    identity = loaded.identity
    values: dict[str, Any] = {
        "tower": tower,
        "precision": precision,
        "model_name": identity.name,
        "model_version": identity.version,
        "weights_sha256": identity.weights_sha256,
        "source": identity.source,
        "is_demo": identity.is_demo,
        "embed_dim": int(loaded.embed_dim),
        "logit_scale": float(loaded.logit_scale),
        "preprocess": _as_dict(loaded.preprocess),
    }
    return {METADATA_PREFIX + k: json.dumps(v, default=str) for k, v in values.items()}


def _write_checked(model: Any, path: Path, metadata: dict[str, str]) -> None:
    onnx = require("onnx", "onnx", _PURPOSE)
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    # The path form lets the checker handle models over the 2 GB protobuf limit too.
    onnx.checker.check_model(str(path), full_check=True)


def _trace(
    module: torch.nn.Module, example: torch.Tensor, path: Path, names: tuple[str, str], opset: int
) -> None:
    # The TorchScript exporter handles open_clip's HF text tower and timm's fused attention
    # in seconds; the dynamo exporter is slower here and gains nothing for these graphs.
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _finalise(
    tmp: Path, final: Path, metadata: dict[str, str], report: ParityReport, what: str
) -> None:
    onnx = require("onnx", "onnx", _PURPOSE)
    if not report.passed:
        tmp.unlink(missing_ok=True)
        raise ParityError(report, what)
    _write_checked(onnx.load(str(tmp)), tmp, metadata)
    os.replace(tmp, final)
    log.info("wrote %s: %s", final, report.summary())


def export_onnx(
    loaded: Any,
    out_dir: Path,
    *,
    images: np.ndarray | None = None,
    n_images: int = 16,
    opset: int = DEFAULT_OPSET,
    text: bool = True,
    thresholds: ParityThresholds = parity.FP32,
) -> ExportResult:
    """Export ``loaded``'s towers to ``out_dir/image.onnx`` and ``out_dir/text.onnx``.

    Parameters
    ----------
    loaded : triagenode.inference.model.LoadedModel
        The model; its ``clip``, ``tokenizer``, ``identity``, ``preprocess``,
        ``logit_scale`` and ``embed_dim`` are used.
    out_dir : pathlib.Path
        Created when missing; files appear only after they pass parity.
    images : numpy.ndarray, optional
        Preprocessed parity images ``(N,3,H,W)``; by default ``n_images`` synthetic phantoms.
    n_images : int
        Size of the synthetic sample when ``images`` is None.
    opset : int
        ONNX opset (17 or newer).
    text : bool
        Also export the text tower.
    thresholds : ParityThresholds
        Parity the exported models must reach (fp32 by default).

    Returns
    -------
    ExportResult

    Raises
    ------
    ParityError
        When a tower's parity is below ``thresholds``; that file is not written.
    triagenode.optional.MissingDependency
        When ``onnx`` or ``onnxruntime`` is not installed (the ``onnx`` extra).
    """
    if opset < 17:
        raise ValueError(f"opset must be 17 or newer (got {opset})")
    # Checked first: without them torch's exporter fails only after tracing, in its own words.
    for module in ("onnx", "onnxruntime"):
        require(module, "onnx", _PURPOSE)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pre = loaded.preprocess
    if images is None:
        images = parity.synthetic_images(n_images, pre.image_size, pre.mean, pre.std)
    prompts = label_prompts()
    clip = loaded.clip.eval()
    with torch.no_grad():
        ref_image = ImageTower(clip)(torch.from_numpy(images)).numpy()
        tokens = loaded.tokenizer(prompts)
        ref_text = TextTower(clip)(tokens).numpy()
    scale = float(loaded.logit_scale)

    image_tmp = out_dir / f".{IMAGE_FP32}.tmp"
    _trace(
        ImageTower(clip),
        torch.from_numpy(images[:2]),
        image_tmp,
        (IMAGE_INPUT, IMAGE_OUTPUT),
        opset,
    )
    image_report = parity.compare_embeddings(
        ref_image, run_onnx(image_tmp, images), ref_text, scale, thresholds
    )
    _finalise(
        image_tmp,
        out_dir / IMAGE_FP32,
        _metadata(loaded, "image", "fp32"),
        image_report,
        f"{out_dir / IMAGE_FP32}",
    )

    text_path, text_report = None, None
    if text:
        text_tmp = out_dir / f".{TEXT_FP32}.tmp"
        _trace(TextTower(clip), tokens[:2], text_tmp, (TEXT_INPUT, TEXT_OUTPUT), opset)
        # Prompts ranked against the images: the text tower's own "top-1 agreement".
        text_report = parity.compare_embeddings(
            ref_text, run_onnx(text_tmp, tokens.numpy()), ref_image, scale, thresholds
        )
        text_path = out_dir / TEXT_FP32
        _finalise(
            text_tmp, text_path, _metadata(loaded, "text", "fp32"), text_report, str(text_path)
        )
    return ExportResult(out_dir / IMAGE_FP32, text_path, image_report, text_report)


def _sort_nodes(graph: Any) -> None:
    """Reorder ``graph.node`` topologically (Kahn's algorithm, stable), as ONNX requires."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or an undefined input; cannot sort it")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def make_fp16_variant(
    fp32_path: Path,
    out_path: Path | None = None,
    *,
    images: np.ndarray | None = None,
    text_embeds: np.ndarray | None = None,
    logit_scale: float = 100.0,
    thresholds: ParityThresholds = parity.FP16,
) -> tuple[Path, ParityReport | None]:
    """Write a half-precision copy of an ONNX model for GPUs, inputs and outputs kept fp32.

    Keeping float32 I/O lets every backend feed the same arrays. The metadata is copied with
    ``precision`` set to ``fp16``. ONNX Runtime's CPU provider runs it too, so parity with the
    fp32 model is checked here, on ``images`` (when given), before the file is kept.

    Parameters
    ----------
    fp32_path : pathlib.Path
        The exported fp32 image tower.
    out_path : pathlib.Path, optional
        Default ``image.fp16.onnx`` beside it.
    images, text_embeds : numpy.ndarray, optional
        Parity sample and label embeddings; no parity check without ``images``.
    logit_scale : float
        Zero-shot temperature for the top-1 agreement.
    thresholds : ParityThresholds
        What the fp16 model must reach.

    Returns
    -------
    (pathlib.Path, ParityReport or None)

    Raises
    ------
    ParityError
        When parity is below ``thresholds``; nothing is written.
    """
    onnx = require("onnx", "onnx", _PURPOSE)
    float16 = require("onnxruntime.transformers.float16", "onnx", _PURPOSE)
    out_path = Path(out_path or Path(fp32_path).with_name(IMAGE_FP16))
    model = onnx.load(str(fp32_path))
    metadata = {p.key: p.value for p in model.metadata_props}
    half = float16.convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _sort_nodes(half.graph)  # the converter appends its input casts after their consumers
    metadata[METADATA_PREFIX + "precision"] = json.dumps("fp16")
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    _write_checked(half, tmp, metadata)
    report = None
    if images is not None:
        reference = run_onnx(Path(fp32_path), images)
        labels = text_embeds if text_embeds is not None else np.eye(reference.shape[1])
        report = parity.compare_embeddings(
            reference, run_onnx(tmp, images), labels, logit_scale, thresholds
        )
        if not report.passed:
            tmp.unlink(missing_ok=True)
            raise ParityError(report, str(out_path))
    os.replace(tmp, out_path)
    return out_path, report
