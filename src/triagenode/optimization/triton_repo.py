"""A Triton Inference Server model repository of the image tower (``export-triton``).

Layout (what ``tritonserver --model-repository DIR`` loads)::

    DIR/<model_name>/config.pbtxt
    DIR/<model_name>/1/model.onnx    (or model.plan: a TensorRT engine for one GPU type)

The ONNX file is the parity-checked ``image.onnx`` of ``triagenode optimize export-onnx``;
the TensorRT plan is an engine of ``optimize build-trt`` built from that same file (its
sidecar JSON names the ONNX file's hash), used for ``--kind gpu`` when one is present.
``config.pbtxt`` turns on Triton's dynamic batcher with the node's batch settings and four
priority levels (stat 1, urgent 2, routine 3, low 4: see
:func:`triagenode.inference.backends.triton.triton_priority`), and carries the weights'
hash as a parameter, which the node checks at start.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from triagenode.errors import ConfigError
from triagenode.inference.backends.artifacts import IMAGE_FP32, engines_dir, read_onnx_metadata
from triagenode.inference.backends.engine_cache import file_sha256
from triagenode.inference.backends.triton import (
    DEFAULT_PRIORITY_LEVEL,
    PRECISION_PARAMETER,
    PRIORITY_LEVELS,
    WEIGHTS_PARAMETER,
)

__all__ = ["TritonRepository", "find_plan", "render_config", "write_model_repository"]

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "pixel_values", "image_embeds"  # as written by export-onnx


@dataclass(frozen=True)
class TritonRepository:
    """What :func:`write_model_repository` wrote."""

    model_dir: Path
    config_path: Path
    model_file: Path
    platform: str  # onnxruntime_onnx or tensorrt_plan
    max_batch: int
    preferred_batch_sizes: list[int] = field(default_factory=list)
    kind: str = "KIND_CPU"

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _quote(text: str) -> str:
    """A protobuf text-format string literal (bytes outside printable ASCII as octal)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def render_config(
    *,
    model_name: str,
    platform: str,
    max_batch: int,
    image_size: int,
    embed_dim: int,
    preferred_batch_sizes: list[int],
    max_queue_delay_us: int,
    kind: str,
    instances: int,
    parameters: dict[str, str],
) -> str:
    """``config.pbtxt`` text (Triton's ``ModelConfig`` in protobuf text format). Pure."""
    sizes = ", ".join(str(n) for n in preferred_batch_sizes)
    params = "".join(
        f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}\n"
        for key, value in sorted(parameters.items())
    )
    return (
        "# Written by `triagenode optimize export-triton`; the node checks inputs, outputs\n"
        f"# and {WEIGHTS_PARAMETER} against its own model at start.\n"
        f"name: {_quote(model_name)}\n"
        f"platform: {_quote(platform)}\n"
        f"max_batch_size: {max_batch}\n"
        "input [\n"
        f"  {{ name: {_quote(INPUT_NAME)} data_type: TYPE_FP32 "
        f"dims: [ 3, {image_size}, {image_size} ] }}\n"
        "]\n"
        "output [\n"
        f"  {{ name: {_quote(OUTPUT_NAME)} data_type: TYPE_FP32 dims: [ {embed_dim} ] }}\n"
        "]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {sizes} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        f"  priority_levels: {PRIORITY_LEVELS}\n"
        f"  default_priority_level: {DEFAULT_PRIORITY_LEVEL}\n"
        "}\n"
        "instance_group [\n"
        f"  {{ count: {instances} kind: {kind} }}\n"
        "]\n" + params
    )


def find_plan(artifacts_dir: Path, onnx_sha256: str) -> tuple[Path, dict[str, Any]] | None:
    """A TensorRT engine built from the ONNX file with this hash, and its sidecar key.

    fp16 is preferred over fp32 (int8 engines come from another ONNX file). None when
    ``optimize build-trt`` has not built one.
    """
    found: list[tuple[int, Path, dict[str, Any]]] = []
    for sidecar in sorted(engines_dir(artifacts_dir).glob("*.json")):
        try:
            key = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        engine = sidecar.with_suffix(".engine")
        if isinstance(key, dict) and key.get("onnx_sha256") == onnx_sha256 and engine.is_file():
            found.append((0 if key.get("precision") == "fp16" else 1, engine, key))
    if not found:
        return None
    _, engine, key = min(found, key=lambda item: item[0])
    return engine, key


def write_model_repository(
    out_dir: Path,
    artifacts_dir: Path,
    *,
    model_name: str,
    max_batch: int,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_ms: float = 10.0,
    gpu: bool = False,
    instances: int = 1,
    use_plan: bool = True,
) -> TritonRepository:
    """Write ``out_dir/<model_name>/`` from the artefacts of ``optimize export-onnx``.

    Parameters
    ----------
    out_dir : pathlib.Path
        The model repository (created; other models in it are left alone).
    artifacts_dir : pathlib.Path
        Holds ``image.onnx`` (and ``trt/`` engines).
    model_name : str
        Folder and Triton model name (``model.triton.model_name``).
    max_batch : int
        ``max_batch_size`` (``model.max_batch``); a TensorRT plan's own limit wins.
    preferred_batch_sizes : list of int, optional
        Sizes the dynamic batcher aims for; default ``[max_batch]``.
    max_queue_delay_ms : float
        Longest a request waits for company on the server (``model.max_wait_ms``).
    gpu : bool
        ``KIND_GPU`` instances (and a TensorRT plan when one was built); else ``KIND_CPU``.
    instances : int
        Model instances (per GPU for ``KIND_GPU``).
    use_plan : bool
        False: ONNX even when a TensorRT plan is present.

    Raises
    ------
    ConfigError
        When ``image.onnx`` is missing or not an image-tower export, or a size is invalid.
    """
    source = Path(artifacts_dir) / IMAGE_FP32
    if not source.is_file():
        raise ConfigError(f"{source}: not found; run `triagenode optimize export-onnx` first")
    meta = read_onnx_metadata(source)
    if meta.get("tower") != "image" or not meta.get("weights_sha256"):
        raise ConfigError(
            f"{source}: not an image tower written by `triagenode optimize export-onnx` "
            "(its triagenode.* metadata is missing)"
        )
    if max_batch < 1 or instances < 1:
        raise ConfigError(f"max_batch and instances must be >= 1 (got {max_batch}, {instances})")
    platform, model_file, parameters = "onnxruntime_onnx", "model.onnx", {}
    plan = None
    if gpu and use_plan:
        plan = find_plan(Path(artifacts_dir), file_sha256(source))
    if plan is not None:
        key = plan[1]
        platform, model_file = "tensorrt_plan", "model.plan"
        max_batch = min(max_batch, int(key.get("max_batch", max_batch)))
        parameters["triagenode.tensorrt_gpu"] = str(key.get("gpu", {}).get("name", ""))
    preferred = sorted(set(preferred_batch_sizes or [max_batch]))
    bad = [n for n in preferred if not 1 <= n <= max_batch]
    if bad:
        raise ConfigError(f"preferred batch sizes {bad}: each must be 1..{max_batch}")
    parameters[WEIGHTS_PARAMETER] = str(meta["weights_sha256"])
    parameters[PRECISION_PARAMETER] = (
        "fp16" if plan is not None else str(meta.get("precision", "fp32"))
    )
    parameters["triagenode.model"] = f"{meta.get('model_name', '')} {meta.get('model_version', '')}"
    if meta.get("is_demo"):
        parameters["triagenode.demo"] = "DEMO, NOT FOR CLINICAL USE"
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    image_size = int(meta.get("preprocess", {}).get("image_size", 224))
    text = render_config(
        model_name=model_name,
        platform=platform,
        max_batch=max_batch,
        image_size=image_size,
        embed_dim=int(meta["embed_dim"]),
        preferred_batch_sizes=preferred,
        max_queue_delay_us=round(max_queue_delay_ms * 1000),
        kind=kind,
        instances=instances,
        parameters=parameters,
    )
    model_dir = Path(out_dir) / model_name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / model_file
    for stale in ("model.onnx", "model.plan"):
        if stale != model_file:
            (version_dir / stale).unlink(missing_ok=True)
    # Copy under a temporary name and rename, so a server polling the repository never
    # loads half a file.
    tmp = target.with_suffix(target.suffix + ".tmp")
    shutil.copyfile(plan[0] if plan is not None else source, tmp)
    tmp.replace(target)
    config = model_dir / "config.pbtxt"
    config_tmp = config.with_suffix(".pbtxt.tmp")
    config_tmp.write_text(text, encoding="ascii")
    config_tmp.replace(config)
    log.info("Triton model %s: %s, %s, max batch %d", model_dir, platform, kind, max_batch)
    return TritonRepository(model_dir, config, target, platform, max_batch, preferred, kind)
