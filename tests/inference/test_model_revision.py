"""``model.revision`` pins an ``hf-hub:`` source to one commit, and the commit loaded is what
the model's identity (and so every result, SR and API answer) records. Offline: a Hugging
Face cache with two commits of the same repo is laid out by the test."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from triagenode.config.settings import load_settings
from triagenode.errors import ConfigError, ModelLoadError
from triagenode.inference import model_files
from triagenode.inference.model import build_demo_model, load_model, save_local_dir

REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
PINNED = "1" * 40
NEWER = "2" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("revision")
    demo_dir = save_local_dir(build_demo_model(folder / "demo"), folder / "model")
    weights = demo_dir / "open_clip_pytorch_model.bin"
    changed = folder / "changed.bin"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1.0
    torch.save(state, changed)
    text_repo = json.loads((demo_dir / model_files.CLIP_CONFIG).read_text())["model_cfg"][
        "text_cfg"
    ]["hf_model_name"]
    hub = folder / "hub"
    clip_root = hub / f"models--{REPO.replace('/', '--')}"
    for commit, bin_file in ((PINNED, weights), (NEWER, changed)):
        snapshot = clip_root / "snapshots" / commit
        snapshot.mkdir(parents=True)
        shutil.copyfile(demo_dir / model_files.CLIP_CONFIG, snapshot / model_files.CLIP_CONFIG)
        shutil.copyfile(bin_file, snapshot / "open_clip_pytorch_model.bin")
    (clip_root / "refs").mkdir()
    (clip_root / "refs" / "main").write_text(NEWER)  # the repo moved on since it was pinned
    text_root = hub / f"models--{text_repo.replace('/', '--')}"
    text_snapshot = text_root / "snapshots" / ("3" * 40)
    text_snapshot.mkdir(parents=True)
    (text_root / "refs").mkdir()
    (text_root / "refs" / "main").write_text("3" * 40)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo_dir / name, text_snapshot / name)
    return hub


@pytest.fixture
def offline_hub(hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _model(revision: str | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(source=f"hf-hub:{REPO}", revision=revision)


def test_revision_pins_the_commit_loaded_and_is_recorded(offline_hub: Path, tmp_path: Path) -> None:
    pinned = load_model(_model(PINNED), cache_dir=tmp_path / "pinned")
    assert pinned.identity.version == PINNED
    pinned_weights = offline_hub / f"models--{REPO.replace('/', '--')}" / "snapshots" / PINNED
    assert pinned.identity.weights_sha256 == model_files.sha256_file(
        pinned_weights / "open_clip_pytorch_model.bin"
    )
    newest = load_model(_model(None), cache_dir=tmp_path / "newest")
    assert newest.identity.version == NEWER  # unpinned: whatever main points at today
    assert newest.identity.weights_sha256 != pinned.identity.weights_sha256


def test_a_revision_missing_from_the_cache_is_named(offline_hub: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model\.revision 4{40}: not in the Hugging Face"):
        load_model(_model("4" * 40), cache_dir=tmp_path)


def test_revision_settings(tmp_path: Path) -> None:
    node = {"data_dir": str(tmp_path)}
    assert load_settings(None, node=node, model={"revision": PINNED}).model.revision == PINNED
    for bad in ("main", "v1.0", "ABC" + "1" * 37, "1" * 39):
        with pytest.raises(ConfigError, match=r"model\.revision: must be a commit hash"):
            load_settings(None, node=node, model={"revision": bad})
    with pytest.raises(ConfigError, match="only an hf-hub: source has revisions"):
        load_settings(None, node=node, model={"source": "demo", "revision": PINNED})
    production = {
        "node": {**node, "environment": "production"},
        "scp": {"allowed_calling_aets": ["CT1"]},
    }
    with pytest.raises(ConfigError, match=r"model\.revision: an hf-hub: source must be pinned"):
        load_settings(None, **production)
    assert load_settings(None, **production, model={"revision": PINNED}).model.revision
