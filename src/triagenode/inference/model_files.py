"""Model folders on disk: what a ``local-dir:`` folder must hold, and how to make one.

A local model folder holds, side by side:

- ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``, as on the Hugging Face hub),
- the CLIP weights (``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``),
- the BERT text tower's ``config.json`` and tokenizer files (``vocab.txt`` and/or
  ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``),
- ``triagenode-model.json``: a manifest (name, version, weights file and its SHA-256).

:func:`prepare_local_dir` builds such a folder from downloaded Hugging Face snapshots of the
BiomedCLIP repository and its BiomedBERT text repository; no network is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from triagenode.errors import ModelLoadError

__all__ = [
    "CLIP_CONFIG",
    "MANIFEST",
    "PREPARE_HINT",
    "TEXT_FILES",
    "WEIGHT_NAMES",
    "find_weights",
    "missing_files",
    "prepare_local_dir",
    "read_manifest",
    "sha256_file",
]

log = logging.getLogger(__name__)

CLIP_CONFIG = "open_clip_config.json"
MANIFEST = "triagenode-model.json"
# open_clip's own preference order (factory._find_checkpoint_in_dir).
WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
TEXT_FILES = (
    "config.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")  # at least one is needed
PREPARE_HINT = (
    "on a machine with network access download the Hugging Face snapshots of "
    "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 and "
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract, run "
    "`triagenode model prepare SNAPSHOT_DIR... --out DIR`, copy DIR here and set "
    'model.source = "local-dir:DIR"'
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_weights(folder: Path) -> Path | None:
    """The CLIP weights file of a folder, by open_clip's preference order."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def read_clip_config(folder: Path) -> dict[str, Any]:
    """``open_clip_config.json`` of a folder, checked to hold ``model_cfg``."""
    config = _read_json(folder / CLIP_CONFIG)
    if not isinstance(config.get("model_cfg"), dict):
        raise ModelLoadError(f"{folder / CLIP_CONFIG}: no 'model_cfg' object")
    return config


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest, or an empty dict when it has none."""
    path = folder / MANIFEST
    return _read_json(path) if path.is_file() else {}


def missing_files(folder: Path) -> list[str]:
    """Names of the files a local model folder lacks (empty when complete)."""
    missing: list[str] = []
    if not (folder / CLIP_CONFIG).is_file():
        missing.append(CLIP_CONFIG)
    if find_weights(folder) is None:
        missing.append(" or ".join(WEIGHT_NAMES[1:3]))
    text_cfg: dict[str, Any] = {}
    if (folder / CLIP_CONFIG).is_file():
        text_cfg = read_clip_config(folder)["model_cfg"].get("text_cfg", {})
    if "hf_model_name" in text_cfg or not text_cfg:
        if not (folder / "config.json").is_file():
            missing.append("config.json (text tower)")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            missing.append("vocab.txt or tokenizer.json (tokenizer)")
    return missing


def _is_clip_snapshot(folder: Path) -> bool:
    return (folder / CLIP_CONFIG).is_file()


def _is_text_snapshot(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and "model_type" in _read_json(config)


def _place(source: Path, target: Path, link: bool) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    if link:
        target.symlink_to(source.resolve())
    else:
        shutil.copyfile(source, target)


def prepare_local_dir(snapshots: list[Path], out: Path, *, link: bool = False) -> dict[str, Any]:
    """Assemble a ``local-dir:`` model folder from Hugging Face snapshot folders.

    Parameters
    ----------
    snapshots
        Snapshot folders (``.../snapshots/<revision>``): one of the CLIP repository (holding
        ``open_clip_config.json`` and weights), one of the text repository (``config.json``
        and tokenizer files). One folder holding both also works.
    out
        The folder to create or fill; existing files of the same names are replaced.
    link
        Symlink instead of copying (for a view of the local Hugging Face cache); copies are
        what an air-gapped machine needs.

    Returns
    -------
    dict
        The manifest written to ``out/triagenode-model.json``.

    Raises
    ------
    ModelLoadError
        When no snapshot holds the CLIP config or weights, no text tower config or tokenizer
        is found, or the result would be incomplete.
    """
    folders = [Path(s) for s in snapshots]
    for folder in folders:
        if not folder.is_dir():
            raise ModelLoadError(f"snapshot {folder}: not a folder")
    clip = next((f for f in folders if _is_clip_snapshot(f)), None)
    if clip is None:
        raise ModelLoadError(
            f"none of {', '.join(map(str, folders))} holds {CLIP_CONFIG}; pass the snapshot "
            "of the BiomedCLIP repository"
        )
    weights = find_weights(clip)
    if weights is None:
        raise ModelLoadError(f"snapshot {clip}: no CLIP weights ({', '.join(WEIGHT_NAMES)})")
    text = next((f for f in folders if f != clip and _is_text_snapshot(f)), None)
    if text is None and _is_text_snapshot(clip):
        text = clip
    if text is None:
        raise ModelLoadError(
            "no snapshot holds the text tower's config.json; pass the snapshot of "
            "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract as well"
        )
    out.mkdir(parents=True, exist_ok=True)
    config = read_clip_config(clip)
    _place(clip / CLIP_CONFIG, out / CLIP_CONFIG, link)
    _place(weights, out / weights.name, link)
    for name in TEXT_FILES:
        source = text / name if (text / name).is_file() else clip / name
        if source.is_file():
            _place(source, out / name, link)
    missing = missing_files(out)
    if missing:
        raise ModelLoadError(f"prepared folder {out} is incomplete: missing {', '.join(missing)}")
    text_cfg = config["model_cfg"].get("text_cfg", {})
    manifest = {
        "name": clip.parent.parent.name.removeprefix("models--").split("--")[-1]
        if clip.parent.name == "snapshots"
        else clip.name,
        "version": clip.name if clip.parent.name == "snapshots" else "local",
        "text_model": text_cfg.get("hf_model_name", ""),
        "text_version": text.name if text.parent.name == "snapshots" else "local",
        "weights_file": weights.name,
        "weights_sha256": sha256_file(out / weights.name),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("prepared model folder %s from %d snapshot(s)", out, len(folders))
    return manifest
