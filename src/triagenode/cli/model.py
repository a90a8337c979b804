"""``triagenode model``: prepare and check local model folders for air-gapped sites."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser("model", parents=[parent], help="model folders")
    actions = parser.add_subparsers(dest="action", required=True)
    prepare = actions.add_parser(
        "prepare",
        parents=[parent],
        help="build a local-dir model folder from Hugging Face snapshots",
        description="Copy the CLIP config and weights and the text tower's config and "
        "tokenizer from downloaded Hugging Face snapshot folders into one folder that "
        "model.source = 'local-dir:DIR' loads with no network.",
    )
    prepare.add_argument("snapshots", nargs="+", type=Path, metavar="SNAPSHOT_DIR")
    prepare.add_argument("--out", required=True, type=Path, metavar="DIR")
    prepare.set_defaults(handler=_prepare)
    check = actions.add_parser(
        "check",
        parents=[parent],
        help="load a local-dir model folder and print its architecture and weights hash",
    )
    check.add_argument("folder", type=Path, metavar="DIR")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=_check)


def _prepare(args: argparse.Namespace) -> int:
    from triagenode.inference.model_files import prepare_local_dir

    manifest = prepare_local_dir(list(args.snapshots), args.out)
    print(f"prepared {args.out}")
    print(f"  model:   {manifest['name']} ({manifest['version']})")
    print(f"  text:    {manifest['text_model']} ({manifest['text_version']})")
    print(f"  weights: {manifest['weights_file']} sha256 {manifest['weights_sha256']}")
    print(f'set model.source = "local-dir:{args.out.resolve()}"')
    return 0


def _count(module: object) -> int:
    return sum(p.numel() for p in module.parameters())  # type: ignore[attr-defined]


def _check(args: argparse.Namespace) -> int:
    from triagenode.inference.model import load_local_dir

    model = load_local_dir(args.folder)
    vision = model.model_cfg.get("vision_cfg", {})
    text = model.model_cfg.get("text_cfg", {})
    report = {
        "name": model.identity.name,
        "version": model.identity.version,
        "weights_sha256": model.identity.weights_sha256,
        "demo": model.identity.is_demo,
        "image_tower": vision.get("timm_model_name", "open_clip ViT"),
        "text_tower": model.clip.text.config.model_type,  # type: ignore[union-attr]
        "text_tower_source": text.get("hf_model_name", ""),
        "embed_dim": model.embed_dim,
        "image_size": model.preprocess.image_size,
        "context_length": text.get("context_length"),
        "parameters": {
            "image": _count(model.clip.visual),
            "text": _count(model.clip.text),
            "total": _count(model.clip),
        },
        "logit_scale": round(model.logit_scale, 4),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "parameters":
            value = ", ".join(f"{k} {v:,}" for k, v in value.items())
        print(f"{key:18} {value}")
    return 0
