"""Weights shipped inside the package, used like open_clip pretrained tags.

``model.name=clipft-tiny-vit model.pretrained=synthetic`` starts from a tiny model that
clipft pre-trained on its synthetic data (``recipes/pretrain_tiny.yaml``), so
post-pre-training methods (CLIP-Refine, ...) have a pre-trained start with no download.
The file is fp16 safetensors (a few MB); it loads into the fp32 model.

Rebuild it: ``clipft fit recipes/pretrain_tiny.yaml``, then
``python -m clipft.models runs/pretrain_tiny/<time>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

WEIGHTS_DIR = Path(__file__).parent / "weights"

# (model name, tag) -> (file in WEIGHTS_DIR, the recipe that rebuilds it)
SHIPPED: dict[tuple[str, str], tuple[str, str]] = {
    ("clipft-tiny-vit", "synthetic"): ("clipft-tiny-vit-synthetic.safetensors", "recipes/pretrain_tiny.yaml"),
}


def shipped_tags(model_name: str) -> list[str]:
    return [tag for name, tag in SHIPPED if name == model_name]


def shipped_weights(model_name: str, tag: str) -> Optional[Path]:
    """The package file of ``tag`` for ``model_name``, or None when clipft ships no such tag."""
    entry = SHIPPED.get((model_name, tag.lower()))
    return WEIGHTS_DIR / entry[0] if entry else None


def write_shipped_weights(checkpoint: str | Path, model_name: str = "clipft-tiny-vit", tag: str = "synthetic") -> Path:
    """Write the model weights of a clipft checkpoint as the package file of (model, tag)."""
    from safetensors.torch import save_file

    from clipft.models.factory import read_state_dict

    out = shipped_weights(model_name, tag)
    if out is None:
        raise ValueError(f"no shipped tag '{tag}' for {model_name} (known: {sorted(SHIPPED)})")
    state = {k: v.to(torch.float16).contiguous() for k, v in read_state_dict(checkpoint).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"source": Path(checkpoint).name, "rebuilt_by": SHIPPED[(model_name, tag)][1]})
    tmp.replace(out)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Store a checkpoint's model as weights shipped with clipft.")
    parser.add_argument("checkpoint")
    parser.add_argument("--model", default="clipft-tiny-vit")
    parser.add_argument("--tag", default="synthetic")
    args = parser.parse_args(argv)
    out = write_shipped_weights(args.checkpoint, args.model, args.tag)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
