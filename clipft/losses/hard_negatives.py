"""Contrastive losses with hard negative captions, exact across devices.

NegCLIP (Yuksekgonul et al., ICLR 2023, §4 and its training code): each sample brings K
negative captions (a swapped or replaced version of its caption). They are extra columns of
the image→text softmax only, for every image of the batch; text→image stays the plain CLIP
direction over the positive texts. With N pairs, unit features v̂, t̂, negatives n̂ (N·K of
them, some possibly absent) and scale s:

    L_i2t = −(1/N) Σ_i log [ exp(s v̂_i·t̂_i) / (Σ_j exp(s v̂_i·t̂_j) + Σ_m exp(s v̂_i·n̂_m)) ]
    L_t2i = −(1/N) Σ_j log softmax_i(s t̂_j·v̂_i)_j
    L = ½ (L_i2t + L_t2i)

The negatives are held sample-major as ``[N, K, D]``, with a ``[N, K]`` validity mask for
captions to which fewer than K negative types applied: the sample axis is the index map, so
a shuffled batch keeps each sample's own negatives. Across devices every device scores its
local rows against the gathered positives and negatives (``offset = rank·B``), which
averages to the one-device loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clipft.losses.contrastive import upcast


def negclip_loss(
    image_features: Tensor,
    text_features: Tensor,
    negative_features: Tensor,
    negative_valid: Tensor,
    logit_scale: Tensor,
    all_image_features: Optional[Tensor] = None,
    all_text_features: Optional[Tensor] = None,
    all_negative_features: Optional[Tensor] = None,
    all_negative_valid: Optional[Tensor] = None,
    offset: int = 0,
) -> Tensor:
    """NegCLIP's loss for the local rows (see the module docstring).

    Args:
        image_features, text_features: ``[B, D]`` unit features of this device's pairs.
        negative_features: ``[B, K, D]`` unit features of each pair's negative captions.
        negative_valid: ``[B, K]`` bool, False where a pair has no k-th negative.
        logit_scale: s = exp(learned log-scale).
        all_*: the same for every device in rank order (gathered with gradients); None on
            one device.
        offset: global index of this device's first pair.
    """
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    all_negative = negative_features if all_negative_features is None else all_negative_features
    all_valid = negative_valid if all_negative_valid is None else all_negative_valid
    negatives = all_negative.reshape(-1, all_negative.shape[-1])
    positive_logits = logit_scale * image_features @ all_text.T
    negative_logits = (logit_scale * image_features @ negatives.T).masked_fill(~all_valid.reshape(1, -1), float("-inf"))
    targets = torch.arange(image_features.shape[0], device=image_features.device) + offset
    image_to_text = F.cross_entropy(upcast(torch.cat([positive_logits, negative_logits], dim=1)), targets)
    text_to_image = F.cross_entropy(upcast(logit_scale * text_features @ all_image.T), targets)
    return (image_to_text + text_to_image) / 2


def _own_candidates(anchors: Tensor, positives: Tensor, negative_features: Tensor, negative_valid: Tensor, scale: float | Tensor) -> Tensor:
    """CE of each anchor over its own positive (column 0) and its own K negatives (absent
    ones masked), as a mean over the rows."""
    positive = (anchors * positives).sum(-1, keepdim=True)  # [B, 1]
    negative = torch.einsum("bd,bkd->bk", anchors, negative_features)
    # masked after scaling: -inf times a learned scale has a NaN gradient
    logits = upcast(scale * torch.cat([positive, negative], dim=1))
    logits = logits.masked_fill(torch.cat([torch.zeros_like(negative_valid[:, :1]), ~negative_valid], dim=1), float("-inf"))
    return F.cross_entropy(logits, torch.zeros(len(anchors), dtype=torch.long, device=anchors.device))


def image_grounded_contrast(
    image_features: Tensor, text_features: Tensor, negative_features: Tensor, negative_valid: Tensor,
    logit_scale: Tensor,
) -> Tensor:
    """DeGLA's IGC (Hu et al., ACM MM 2025, §3.3): each image against its own caption and its
    own K negative captions only, a (K+1)-way softmax at the model's logit scale. Per sample,
    so the mean over each device's rows averages to the one-device value."""
    return _own_candidates(image_features, text_features, negative_features, negative_valid, logit_scale)


def text_grounded_contrast(
    text_features: Tensor, teacher_text_features: Tensor, negative_features: Tensor, negative_valid: Tensor,
    scale: float = 10.0,
) -> Tensor:
    """DeGLA's TGC: the student's caption embedding against the EMA teacher's embedding of the
    same caption (the positive) and the student's embeddings of the caption's own K negatives,
    at a fixed scale of 10. The released code contrasts row i with other samples' negatives
    (a type-major mask on a sample-major batch, docs/methods/degla.md#paper-and-official-code); this is the paper's
    intent, each sample against its own."""
    return _own_candidates(text_features, teacher_text_features, negative_features, negative_valid, scale)


def distillation_loss(student: list[Tensor], teacher: list[Tensor], reduction: str = "sum", world_size: int = 1) -> Tensor:
    """Σ‖student − teacher‖² over every row and dimension of each pair of feature tensors
    (DeGLA's L_distill: images and all texts), or its mean over rows (``reduction="mean"``).
    ``"sum"`` is multiplied by the number of devices, so that averaging the devices' losses
    (as DDP averages gradients) gives the one-device sum of the whole batch."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
    total = sum(((upcast(s) - upcast(t)) ** 2).sum() for s, t in zip(student, teacher))
    if reduction == "sum":
        return total * world_size
    return total / student[0].shape[0]
