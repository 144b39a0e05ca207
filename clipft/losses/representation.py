"""MMRL's loss (Guo & Gu, "MMRL: Multi-Modal Representation Learning for Vision-Language
Models", CVPR 2025, Eq. 11-13; docs/methods/mmrl.md#equations):

    L = α·CE(s·f̂_c ĝᵀ, y) + (1−α)·CE(s·f̂_r ĝᵀ, y)
        + λ·(1 − mean_i cos(f_c,i, f^ZS_i)) + λ·(1 − mean_k cos(g_k, g^ZS_k)),

f_c the class-token image features, f_r the representation-token image features, g the
class text features (all with representation tokens), f^ZS and g^ZS the frozen zero-shot
model's features of the same images and prompts, s the logit scale. The terms come back
unweighted and named; the method weights them (α, 1−α, λ, λ).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_regulariser(features: Tensor, targets: Tensor) -> Tensor:
    """1 − mean_i cos(features_i, targets_i) (MMRL Eq. 12-13): 0 when every row points where
    the frozen model's does."""
    return 1.0 - F.cosine_similarity(features, targets.to(features.dtype), dim=-1).mean()


def mmrl_terms(
    class_features: Tensor,
    representation_features: Tensor,
    text_features: Tensor,
    labels: Tensor,
    scale: Tensor | float,
    zero_shot_image: Tensor,
    zero_shot_text: Tensor,
) -> dict[str, Tensor]:
    """The four terms of MMRL's loss.

    Args:
        class_features, representation_features: ``[B, D]`` image features f_c, f_r (any norm).
        text_features: ``[C, D]`` class text features g with representation tokens.
        labels: ``[B]`` class indices into the rows of ``text_features``.
        scale: the logit scale s (CLIP's exp(logit_scale), 100 for OpenAI's models).
        zero_shot_image: ``[B, D]`` the frozen model's features of the same images.
        zero_shot_text: ``[C, D]`` the frozen model's features of the same prompts.
    """
    text_unit = F.normalize(text_features, dim=-1)
    class_logits = scale * F.normalize(class_features, dim=-1) @ text_unit.T
    representation_logits = scale * F.normalize(representation_features, dim=-1) @ text_unit.T
    return {
        "class": F.cross_entropy(class_logits, labels),
        "representation": F.cross_entropy(representation_logits, labels),
        "image_reg": cosine_regulariser(class_features, zero_shot_image),
        "text_reg": cosine_regulariser(text_features, zero_shot_text),
    }


__all__ = ["cosine_regulariser", "mmrl_terms"]
