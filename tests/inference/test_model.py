"""Model loading: demo determinism, local-dir with the network blocked, clear errors for
missing files, ``model prepare`` / ``model check`` on fake snapshots, the real architecture."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from triagenode.cli import main
from triagenode.domain import DEMO_WARNING
from triagenode.errors import ModelLoadError
from triagenode.inference import model_files
from triagenode.inference.model import (
    LoadedModel,
    build_biomedclip,
    build_demo_model,
    load_model,
    save_local_dir,
)

PROMPTS = ["a chest x-ray showing pneumothorax", "a CT scan with no acute abnormality"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return build_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_dir(demo: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_local_dir(demo, tmp_path_factory.mktemp("local") / "model")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: socket.socket, *args: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_demo_model_is_deterministic_and_marked(demo: LoadedModel, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path)
    assert demo.identity.is_demo and again.identity.is_demo
    assert demo.identity.weights_sha256 == again.identity.weights_sha256
    assert demo.warning == DEMO_WARNING
    assert "DEMO" in demo.identity.display_name
    first, second = demo.encode_text(PROMPTS), again.encode_text(PROMPTS)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    assert demo.preprocess.image_size == 64 and demo.logit_scale == pytest.approx(50.0)


def test_local_dir_loads_with_the_network_blocked(
    demo: LoadedModel, demo_dir: Path, no_network: None
) -> None:
    loaded = load_model(f"local-dir:{demo_dir}")
    manifest = json.loads((demo_dir / model_files.MANIFEST).read_text())
    assert loaded.identity.weights_sha256 == manifest["weights_sha256"]
    assert loaded.identity.weights_sha256 == model_files.sha256_file(
        demo_dir / "open_clip_pytorch_model.bin"
    )
    assert loaded.identity.source == f"local-dir:{demo_dir}" and loaded.identity.is_demo
    np.testing.assert_allclose(loaded.encode_text(PROMPTS), demo.encode_text(PROMPTS), atol=1e-6)
    image = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = demo.clip.encode_image(image, normalize=True)
        got = loaded.clip.encode_image(image, normalize=True)
    torch.testing.assert_close(got, expected)


def test_missing_files_are_named_with_the_fix(demo_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(f"local-dir:{broken}")
    message = str(info.value)
    assert "open_clip_pytorch_model.bin" in message and "vocab.txt or tokenizer.json" in message
    assert "triagenode model prepare" in message


def test_replaced_weights_are_refused(demo_dir: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(demo_dir, tampered)
    manifest = json.loads((tampered / model_files.MANIFEST).read_text())
    manifest["weights_sha256"] = "0" * 64
    (tampered / model_files.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="corrupt or replaced"):
        load_model(f"local-dir:{tampered}")


def test_hf_hub_offline_without_cache_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as info:
        load_model("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    message = str(info.value)
    assert "open_clip_config.json" in message and "open_clip_pytorch_model.bin" in message
    assert "HF_HUB_OFFLINE" in message and "triagenode model prepare" in message


def _fake_snapshots(demo_dir: Path, root: Path) -> tuple[Path, Path]:
    """Hugging Face cache layout: models--org--name/snapshots/<revision>/files."""
    clip = root / "models--microsoft--BiomedCLIP-fake" / "snapshots" / "abc123"
    text = root / "models--microsoft--BiomedBERT-fake" / "snapshots" / "def456"
    clip.mkdir(parents=True)
    text.mkdir(parents=True)
    for name in (model_files.CLIP_CONFIG, "open_clip_pytorch_model.bin"):
        shutil.copyfile(demo_dir / name, clip / name)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(demo_dir / name, text / name)
    (text / "pytorch_model.bin").write_bytes(b"text tower weights, not needed")
    return clip, text


def test_model_prepare_and_check_on_fake_snapshots(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_network: None
) -> None:
    clip, text = _fake_snapshots(demo_dir, tmp_path / "hub")
    out = tmp_path / "prepared"
    assert main(["model", "prepare", str(text), str(clip), "--out", str(out)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert not (out / "pytorch_model.bin").exists()
    manifest = json.loads((out / model_files.MANIFEST).read_text())
    assert manifest["name"] == "BiomedCLIP-fake" and manifest["version"] == "abc123"
    assert manifest["text_version"] == "def456"
    assert main(["model", "check", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights_sha256"] == manifest["weights_sha256"]
    assert (
        report["parameters"]["total"]
        == report["parameters"]["image"] + report["parameters"]["text"] + 1
    )  # + logit_scale


def test_model_prepare_without_text_snapshot_fails_clearly(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip, _ = _fake_snapshots(demo_dir, tmp_path / "hub")
    assert main(["model", "prepare", str(clip), "--out", str(tmp_path / "o")]) == 2
    assert "BiomedBERT" in capsys.readouterr().err


def test_real_biomedclip_architecture_builds_offline(tmp_path: Path, no_network: None) -> None:
    model = build_biomedclip(random_weights=True, cache_dir=tmp_path)
    image_params = sum(p.numel() for p in model.visual.parameters())
    text_params = sum(p.numel() for p in model.clip.text.parameters())
    assert 86_000_000 < image_params < 86_500_000  # ViT-B/16 trunk + 768->512 projection
    assert 109_000_000 < text_params < 112_000_000  # BERT-base + MLP projection
    assert model.preprocess.image_size == 224 and model.embed_dim == 512
    assert model.model_cfg["text_cfg"]["context_length"] == 256
    with torch.inference_mode():
        out = model.clip.encode_image(torch.zeros(1, 3, 224, 224), normalize=True)
    assert out.shape == (1, 512)


def test_hf_hub_source_loads_from_the_local_cache(
    demo: LoadedModel,
    demo_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    no_network: None,
) -> None:
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    text_repo = json.loads((demo_dir / model_files.CLIP_CONFIG).read_text())["model_cfg"][
        "text_cfg"
    ]["hf_model_name"]
    for repo_id, names in (
        (repo, (model_files.CLIP_CONFIG, "open_clip_pytorch_model.bin")),
        (text_repo, ("config.json", "tokenizer.json", "tokenizer_config.json")),
    ):
        root = hub / f"models--{repo_id.replace('/', '--')}"
        snapshot = root / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0123abcd")
        for name in names:
            shutil.copyfile(demo_dir / name, snapshot / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    loaded = load_model(f"hf-hub:{repo}", cache_dir=tmp_path / "cache")
    assert loaded.identity.source == f"hf-hub:{repo}"
    assert loaded.identity.version == "0123abcd"
    assert loaded.identity.weights_sha256 == model_files.sha256_file(
        demo_dir / "open_clip_pytorch_model.bin"
    )
    np.testing.assert_allclose(loaded.encode_text(PROMPTS), demo.encode_text(PROMPTS), atol=1e-6)
