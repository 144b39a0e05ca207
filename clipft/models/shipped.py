"""Weights shipped inside the package, used like open_clip pretrained tags.

``model.name=clipft-tiny-vit model.pretrained=synthetic`` starts from a tiny model that
clipft pre-trained on its synthetic data (``recipes/pretrain_tiny.yaml``), so
post-pre-training methods (CLIP-Refine, ...) have a pre-trained start with no download.
The file is fp16 safetensors (a few MB); it loads into the fp32 model.

Rebuild it: ``clipft fit recipes/pretrain_tiny.yaml``, then
``python -m clipft.models runs/pretrain_tiny/<time>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


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
