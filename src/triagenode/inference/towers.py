"""The building blocks of a loaded model: towers, tokenizer, identity hash.

:class:`LoadedModel` is what every model source produces. The text tower is always built
from a local folder holding its ``config.json`` (``hf_model_name`` pointed at that folder,
``hf_model_pretrained`` off), so building never reaches a hub. The demo image tower is a
tiny timm ViT registered here under :data:`DEMO_TIMM_NAME`.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triagenode.domain import DEMO_WARNING, ModelIdentity
from triagenode.inference.preprocess import PreprocessConfig

__all__ = [
    "DEMO_TIMM_NAME",
    "LoadedModel",
    "demo_vocab",
    "finish",
    "instantiate",
    "local_text_cfg",
    "state_sha256",
    "write_text_tower",
]

DEMO_TIMM_NAME = "triagenode_demo_vit"


@dataclass
class LoadedModel:
    """A model ready for inference, with everything a result must say about it."""

    identity: ModelIdentity
    clip: torch.nn.Module  # open_clip CustomTextCLIP, eval mode, on CPU
    tokenizer: Any  # open_clip HFTokenizer: list[str] -> LongTensor (N, context_length)
    preprocess: PreprocessConfig
    logit_scale: float
    embed_dim: int
    model_cfg: dict[str, Any]

    @property
    def visual(self) -> torch.nn.Module:
        """The image tower (``clip.visual``), e.g. for ONNX export."""
        return self.clip.visual  # type: ignore[return-value]

    @property
    def warning(self) -> str | None:
        """:data:`DEMO_WARNING` for the demo model, else None."""
        return DEMO_WARNING if self.identity.is_demo else None

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings, float32 ``(len(prompts), embed_dim)``."""
        tokens = self.tokenizer(prompts)
        with torch.inference_mode():
            features = self.clip.encode_text(tokens, normalize=True)  # type: ignore[operator]
        return features.float().cpu().numpy()


def register_demo_timm_model() -> None:
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(DEMO_TIMM_NAME):
        return

    def triagenode_demo_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        """A tiny ViT (64x64 input, 2 blocks of width 64) for the demo model."""
        args = {
            "img_size": 64,
            "patch_size": 16,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 2,
            "mlp_ratio": 2.0,
        }
        # timm passes its registry bookkeeping (pretrained_cfg, cache_dir...) along.
        accepted = {"num_classes", "global_pool", "drop_path_rate", "img_size"}
        model = VisionTransformer(**{**args, **{k: v for k, v in kwargs.items() if k in accepted}})
        # open_clip's TimmModel reads default_cfg, which timm's registry normally sets
        model.default_cfg = {"input_size": (3, 64, 64)}  # type: ignore[assignment]
        return model

    register_model(triagenode_demo_vit)
    # timm appends registered names to the defining module's __all__; keep ours curated.
    if DEMO_TIMM_NAME in __all__:
        __all__.remove(DEMO_TIMM_NAME)


register_demo_timm_model()


def demo_vocab() -> list[str]:
    """A small, fixed WordPiece vocabulary: specials, characters, continuations, words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = sorted(
        {
            "a",
            "an",
            "the",
            "of",
            "with",
            "showing",
            "this",
            "is",
            "seen",
            "on",
            "no",
            "acute",
            "abnormality",
            "normal",
            "chest",
            "x",
            "ray",
            "ct",
            "scan",
            "mri",
            "image",
            "photograph",
            "pneumothorax",
            "pleural",
            "effusion",
            "pneumonia",
            "cardiomegaly",
            "pulmonary",
            "edema",
            "embolism",
            "hemorrhage",
            "intracranial",
            "fracture",
            "mass",
            "stroke",
            "tumor",
            "brain",
            "retina",
            "skin",
            "melanoma",
        }
    )
    return specials + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + words


def write_text_tower(folder: Path, config: dict[str, Any], vocab: list[str]) -> None:
    """Write a BERT ``config.json`` and tokenizer files that ``transformers`` reads offline."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    BertConfig(**config).to_json_file(folder / "config.json")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer_config = {
        "do_lower_case": True,
        "tokenizer_class": "BertTokenizer",
        "model_max_length": config["max_position_embeddings"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")


def state_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's tensors in key order: the identity of in-memory weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def local_text_cfg(model_cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    text_cfg.update(
        hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_model_pretrained=False
    )
    return text_cfg


def instantiate(model_cfg: dict[str, Any], text_folder: Path) -> torch.nn.Module:
    from open_clip.model import CustomTextCLIP

    cfg = json.loads(json.dumps(model_cfg))  # deep copy; open_clip mutates its config
    cfg["text_cfg"] = local_text_cfg(cfg, text_folder)
    cfg.setdefault("vision_cfg", {})["timm_model_pretrained"] = False
    cfg.pop("custom_text", None)
    return CustomTextCLIP(**cfg)


def finish(
    clip: torch.nn.Module,
    text_folder: Path,
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any],
    identity: ModelIdentity,
) -> LoadedModel:
    from open_clip.tokenizer import HFTokenizer

    clip.eval()
    context = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    tokenizer = HFTokenizer(str(text_folder), context_length=context)
    image_size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    image_size = int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
    logit_scale = float(clip.logit_scale.detach().exp().clamp(max=100).item())  # type: ignore[union-attr, operator]
    return LoadedModel(
        identity=identity,
        clip=clip,
        tokenizer=tokenizer,
        preprocess=PreprocessConfig.from_open_clip(image_size, preprocess_cfg),
        logit_scale=logit_scale,
        embed_dim=int(model_cfg["embed_dim"]),
        model_cfg=model_cfg,
    )
