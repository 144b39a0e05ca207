"""Where each parameter of an open_clip model sits in its tower: the depth that layer-wise
learning-rate decay (``optim.layer_decay``) scales by.

Layer-wise decay (BEiT, Bao et al., ICLR 2022, §2.4 / App. "layer-wise learning rate decay";
used for CLIP by FT-CLIP, Dong et al. 2022, "CLIP Itself is a Strong Fine-tuner") gives the
parameters at depth d of a network with L blocks the learning rate lr·γ^(L+1−d): the
embeddings (d = 0) the smallest, block i (d = i+1) more, and what sits above the last block
(final norm, projection, logit scale; d = L+1) the full rate.

A CLIP model has two towers of possibly different depth. Here both are put on one scale, that
of the deeper tower (N = max(L_image, L_text) blocks): block i of a tower with L blocks has
depth (i+1)·N/L, so in both towers the embeddings have depth 0, the last block depth N and the
top N+1, and the multiplier is γ^(N+1−depth). (A 12-block image tower and a 6-block text tower:
text block i takes the depth of image block 2i+1.)

Which parameter is where, from its name (open_clip, timm and Hugging Face towers):

* a block: a name with ``resblocks.<i>``, ``blocks.<i>``, ``layers.<i>``, ``layer.<i>`` or
  ``layer<s>.<i>`` (ResNet stages); every parameter under the block (LoRA adapters included)
  takes its depth; blocks are numbered in the order the model lists them;
* depth 0: the embeddings (``positional_embedding``, ``class_embedding``, ``token_embedding``,
  ``pos_embed``, ``patch_embed``, ``cls_token``, ``reg_token``, ``embeddings``) and anything the tower lists
  before its first block (patch convolution, ``ln_pre``, a ResNet stem);
* the top: the projections (``proj``, ``text_projection``, ``head``), anything the tower lists
  after its last block (``ln_post``, ``ln_final``, attention pooling) and every parameter that
  belongs to neither tower (``logit_scale``, ``logit_bias``, a method's own parameters);
* anything else between two blocks (a ConvNeXt stage's down-sampling) takes the next block's.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

IMAGE, TEXT = "image", "text"
_BLOCK = re.compile(r"^(.*?(?:resblocks|blocks|layers|layer|layer\d+)\.\d+)\.")
_TEXT_ROOTS = ("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection", "text.")
_EMBEDDINGS = ("positional_embedding", "class_embedding", "token_embedding", "pos_embed", "patch_embed", "cls_token", "reg_token",
               "embeddings")
_TOP_LEAVES = ("proj", "text_projection", "head", "logit_scale", "logit_bias")
# prefixes stripped before looking for an embedding name at the start (tower roots, wrappers)
_ROOTS = re.compile(r"^(visual\.(trunk\.)?|text\.(transformer\.)?)")


def tower_of(name: str) -> Optional[str]:
    """``image``, ``text`` or None (shared: logit scale and bias, a method's own parameters)."""
    if name.startswith("visual."):
        return IMAGE
    if name.startswith(_TEXT_ROOTS):
        return TEXT
    return None


def block_of(name: str) -> Optional[str]:
    """The name of the block that holds a parameter (``visual.transformer.resblocks.3``), or None."""
    match = _BLOCK.match(name)
    return match.group(1) if match else None


def _is_embedding(name: str) -> bool:
    return _ROOTS.sub("", name).startswith(_EMBEDDINGS)


def _is_top(name: str) -> bool:
    parts = name.split(".")
    leaf = parts[-1] if parts[-1] not in ("weight", "bias") else parts[-2] if len(parts) > 1 else parts[-1]
    return leaf in _TOP_LEAVES or (len(parts) > 1 and parts[1] in ("head", "proj"))


def layer_depths(names: Iterable[str]) -> tuple[dict[str, float], float]:
    """(depth of each parameter name on the common scale, depth of the top N+1); see the module
    docstring. ``names`` in the model's order (``named_parameters``), frozen ones included, so
    that the scale does not depend on what is trained."""
    names = list(names)
    blocks: dict[str, list[str]] = {IMAGE: [], TEXT: []}
    for name in names:
        tower, block = tower_of(name), block_of(name)
        if tower is not None and block is not None and block not in blocks[tower]:
            blocks[tower].append(block)
    deepest = max(len(found) for found in blocks.values())
    top = float(deepest + 1)
    depths: dict[str, float] = {}
    for tower, found in blocks.items():
        index = {block: i for i, block in enumerate(found)}
        scale = deepest / len(found) if found else 0.0
        members = [n for n in names if tower_of(n) == tower]
        for position, name in enumerate(members):
            block = block_of(name)
            if block is not None:
                depths[name] = (index[block] + 1) * scale
            elif _is_embedding(name):
                depths[name] = 0.0
            elif _is_top(name):
                depths[name] = top
            else:  # by position: before the first block, between two, after the last
                following = next((block_of(n) for n in members[position + 1:] if block_of(n) is not None), None)
                seen_block = any(block_of(n) is not None for n in members[:position])
                if following is None:
                    depths[name] = top
                elif not seen_block:
                    depths[name] = 0.0
                else:
                    depths[name] = (index[following] + 1) * scale
    for name in names:
        depths.setdefault(name, top)
    return depths, top


def layer_decay_multipliers(names: Iterable[str], decay: float) -> dict[str, float]:
    """γ^(N+1−depth) for each parameter name (γ = ``decay``): 1 at the top, γ for the last
    blocks, γ^(N+1) for the embeddings."""
    depths, top = layer_depths(names)
    return {name: decay ** (top - depth) for name, depth in depths.items()}


def tower_block_counts(names: Iterable[str]) -> dict[str, int]:
    """The number of blocks found in each tower."""
    counts: dict[str, list[str]] = {IMAGE: [], TEXT: []}
    for name in names:
        tower, block = tower_of(name), block_of(name)
        if tower is not None and block is not None and block not in counts[tower]:
            counts[tower].append(block)
    return {tower: len(found) for tower, found in counts.items()}
