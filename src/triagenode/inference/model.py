"""Loading the vision-language model from ``model.source``: hub cache, local folder, demo.

Every source ends in the same :class:`LoadedModel`: an open_clip ``CustomTextCLIP`` (timm
ViT image tower, Hugging Face BERT text tower) in eval mode, its tokenizer, its preprocess
config and its identity. The text tower is always built from a local folder holding its
``config.json`` (``hf_model_name`` pointed at that folder, ``hf_model_pretrained`` off), so no
source ever reaches the network for the text tower's config; the weights come from one file
whose SHA-256 becomes part of the model's identity.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triagenode import __version__
from triagenode.domain import DEMO_WARNING, ModelIdentity
from triagenode.errors import ModelLoadError
from triagenode.inference import model_files
from triagenode.inference.model_files import PREPARE_HINT
from triagenode.inference.preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessConfig
from triagenode.inference.towers import (
    DEMO_TIMM_NAME,
    LoadedModel,
    demo_vocab,
    finish,
    instantiate,
    local_text_cfg,
    state_sha256,
    write_text_tower,
)

__all__ = [
    "BIOMEDCLIP_MODEL_CFG",
    "BIOMEDCLIP_PREPROCESS_CFG",
    "LoadedModel",
    "PreprocessConfig",
    "build_biomedclip",
    "build_demo_model",
    "load_local_dir",
    "load_model",
    "save_local_dir",
]

log = logging.getLogger(__name__)

BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_REPO = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
# BiomedCLIP's open_clip_config.json as published on the hub.
BIOMEDCLIP_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 512,
    "vision_cfg": {
        "timm_model_name": "vit_base_patch16_224",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 224,
    },
    "text_cfg": {
        "hf_model_name": BIOMEDBERT_REPO,
        "hf_tokenizer_name": BIOMEDBERT_REPO,
        "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": 256,
    },
}
BIOMEDCLIP_PREPROCESS_CFG = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
# BiomedBERT-base (PubMedBERT) text tower: BERT-base with its own 30,522-word vocabulary.
BIOMEDBERT_CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
DEMO_NAME = "triagenode-demo"
DEMO_SEED = 20261126
DEMO_TEXT_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
}


def _scratch(cache_dir: Path | None, name: str) -> Path:
    if cache_dir is not None:
        return Path(cache_dir) / name
    return Path(tempfile.mkdtemp(prefix=f"triagenode-{name}-"))


def build_demo_model(cache_dir: Path | None = None) -> LoadedModel:
    """The demo model: tiny timm ViT + tiny BERT, fixed-seed weights, built in memory.

    Its identity says ``is_demo``; everything made with it must carry :data:`DEMO_WARNING`.
    The text tower's config and vocabulary are written to ``cache_dir/demo-text`` (a temp
    folder when None).
    """
    folder = _scratch(cache_dir, "demo-text")
    vocab = demo_vocab()
    write_text_tower(folder, {**DEMO_TEXT_CONFIG, "vocab_size": len(vocab)}, vocab)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": DEMO_TIMM_NAME,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 64,
        },
        "text_cfg": {
            "hf_model_name": DEMO_NAME,
            "hf_tokenizer_name": DEMO_NAME,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 32,
        },
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        clip = instantiate(model_cfg, folder)
        # A random logit scale of 1/0.07 makes near-uniform demo scores; a fixed larger scale
        # spreads them so the demo output shows distinct findings.
        with torch.no_grad():
            clip.logit_scale.fill_(float(np.log(50.0)))  # type: ignore[operator]
    identity = ModelIdentity(
        name=DEMO_NAME,
        version=f"{__version__}-seed{DEMO_SEED}",
        weights_sha256=state_sha256(clip),
        source="demo",
        is_demo=True,
    )
    log.warning("using the demo model: %s", DEMO_WARNING)
    return finish(clip, folder, model_cfg, BIOMEDCLIP_PREPROCESS_CFG, identity)


def build_biomedclip(random_weights: bool = True, cache_dir: Path | None = None) -> LoadedModel:
    """The real BiomedCLIP architecture (ViT-B/16 + BiomedBERT-base) built with no network.

    Parameters
    ----------
    random_weights
        Must be True: weights come from a fixed seed (for benchmarks and export tests).
        Trained weights are loaded with :func:`load_model` instead.
    cache_dir
        Where the text tower's config and a generated vocabulary are written.
    """
    if not random_weights:
        raise ModelLoadError("build_biomedclip builds random weights only; use load_model()")
    folder = _scratch(cache_dir, "biomedbert-config")
    write_text_tower(folder, BIOMEDBERT_CONFIG, demo_vocab())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = instantiate(BIOMEDCLIP_MODEL_CFG, folder)
    identity = ModelIdentity(
        name="BiomedCLIP-architecture-random",
        version=__version__,
        weights_sha256=state_sha256(clip),
        source="random",
        is_demo=True,
    )
    return finish(clip, folder, BIOMEDCLIP_MODEL_CFG, BIOMEDCLIP_PREPROCESS_CFG, identity)


def save_local_dir(model: LoadedModel, folder: Path) -> Path:
    """Write ``model`` as a ``local-dir:`` folder (config, weights, text tower, manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model.model_cfg,
        "preprocess_cfg": {
            "size": model.preprocess.image_size,
            "mean": list(model.preprocess.mean),
            "std": list(model.preprocess.std),
            "interpolation": model.preprocess.interpolation,
            "resize_mode": model.preprocess.resize_mode,
        },
    }
    (folder / model_files.CLIP_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights = folder / "open_clip_pytorch_model.bin"
    torch.save(model.clip.state_dict(), weights)
    model.tokenizer.tokenizer.save_pretrained(str(folder))
    model.clip.text.config.to_json_file(folder / "config.json")  # type: ignore[union-attr, operator]
    manifest = {
        "name": model.identity.name,
        "version": model.identity.version,
        "is_demo": model.identity.is_demo,
        "weights_file": weights.name,
        "weights_sha256": model_files.sha256_file(weights),
    }
    (folder / model_files.MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return folder


def load_local_dir(folder: Path, source: str | None = None) -> LoadedModel:
    """Load a ``local-dir:`` folder with open_clip, no network.

    Raises
    ------
    ModelLoadError
        Naming every missing file and how to prepare the folder.
    """
    import open_clip

    folder = Path(folder).expanduser().resolve()
    source = source or f"local-dir:{folder}"
    if not folder.is_dir():
        raise ModelLoadError(f"model.source {source}: folder {folder} not found; {PREPARE_HINT}")
    missing = model_files.missing_files(folder)
    if missing:
        raise ModelLoadError(
            f"model.source {source}: missing {', '.join(missing)} in {folder}; {PREPARE_HINT}"
        )
    config = model_files.read_clip_config(folder)
    model_cfg = config["model_cfg"]
    text_cfg = local_text_cfg(model_cfg, folder)
    weights = model_files.find_weights(folder)
    assert weights is not None  # missing_files checked it
    try:
        # open_clip's local-dir schema finds the weights itself; the text tower's config is
        # redirected to this folder so transformers never looks for it on the hub.
        clip = open_clip.create_model(f"local-dir:{folder}", text_cfg=text_cfg, device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"model.source {source}: cannot build the model ({exc})") from exc
    manifest = model_files.read_manifest(folder)
    digest = model_files.sha256_file(weights)
    if manifest.get("weights_sha256") not in (None, digest):
        raise ModelLoadError(
            f"model.source {source}: {weights.name} has SHA-256 {digest[:12]}..., the manifest "
            f"says {str(manifest['weights_sha256'])[:12]}... (corrupt or replaced weights)"
        )
    identity = ModelIdentity(
        name=str(manifest.get("name") or folder.name),
        version=str(manifest.get("version", "local")),
        weights_sha256=digest,
        source=source,
        is_demo=bool(manifest.get("is_demo", False)),
    )
    return finish(clip, folder, model_cfg, config.get("preprocess_cfg", {}), identity)


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_snapshot(
    repo: str, files: tuple[str, ...], cache_dir: Path | None, revision: str | None = None
) -> Path:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:
        if revision is not None and _hf_offline():
            raise ModelLoadError(
                f"model.revision {revision}: not in the Hugging Face cache for {repo} "
                f"(offline); {PREPARE_HINT}"
            ) from None
        if _hf_offline():
            missing = [f for f in files if not isinstance(try_to_load_from_cache(repo, f), str)]
            raise ModelLoadError(
                f"model.source hf-hub:{BIOMEDCLIP_REPO}: offline (HF_HUB_OFFLINE) and "
                f"{repo} is missing {', '.join(missing) or 'its snapshot'} in the Hugging "
                f"Face cache; {PREPARE_HINT}"
            ) from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(files)))
    except Exception as exc:
        raise ModelLoadError(f"hf-hub:{repo}: download failed ({exc}); {PREPARE_HINT}") from exc


def _load_hf_hub(repo: str, cache_dir: Path | None, revision: str | None = None) -> LoadedModel:
    # ``revision`` (model.revision) pins the image/CLIP repo to one commit; the snapshot's
    # commit becomes the identity's version either way, so results say what was loaded.
    clip_snapshot = _hub_snapshot(
        repo, (model_files.CLIP_CONFIG, "open_clip_pytorch_model.bin"), cache_dir, revision
    )
    text_repo = model_files.read_clip_config(clip_snapshot)["model_cfg"]["text_cfg"].get(
        "hf_model_name", BIOMEDBERT_REPO
    )
    text_snapshot = _hub_snapshot(text_repo, ("config.json", "vocab.txt"), cache_dir)
    folder = _scratch(cache_dir, "hf-hub-" + repo.replace("/", "--"))
    # symlinks into the hub cache: no second copy of the weights
    model_files.prepare_local_dir([clip_snapshot, text_snapshot], folder, link=True)
    return load_local_dir(folder, source=f"hf-hub:{repo}")


def load_model(model_settings: Any, cache_dir: Path | None = None) -> LoadedModel:
    """Load the model named by ``model_settings.source``.

    Parameters
    ----------
    model_settings
        The ``[model]`` settings section (``source``, and ``revision`` for ``hf-hub:``), or
        a source string.
    cache_dir
        Folder for derived files (demo text tower, assembled hub folder); temp when None.

    Raises
    ------
    ModelLoadError
        With the missing files and how to run ``triagenode model prepare``.
    """
    source = model_settings if isinstance(model_settings, str) else model_settings.source
    if source == "demo":
        return build_demo_model(cache_dir)
    if source.startswith("local-dir:"):
        return load_local_dir(Path(source.removeprefix("local-dir:")), source)
    if source.startswith("hf-hub:"):
        revision = getattr(model_settings, "revision", None)
        return _load_hf_hub(source.removeprefix("hf-hub:"), cache_dir, revision)
    raise ModelLoadError(
        f"model.source {source!r}: must be 'demo', 'hf-hub:<repo>' or 'local-dir:<path>'"
    )
