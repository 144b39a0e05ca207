"""Geodesic multi-modal mixup (Oh et al., "Geodesic Multi-Modal Mixup for Robust Fine-Tuning",
NeurIPS 2023): mixes of unit embeddings along the sphere as hard negatives and soft targets.

Slerp (§3 of the paper): for unit a, b with θ = arccos⟨a, b⟩,
m_λ(a, b) = [sin(λθ)·a + sin((1 − λ)θ)·b] / sin θ, so λ = 1 gives a.

The losses follow the official training code (``main.py``), which disagrees with the loss in
the official README (that one scales the mixed negatives by 0.01 instead of 1/τ₂ and
averages the two directions): with unit v̂, t̂ and λ ~ Beta(β, β),

* m²-mix: n_j = m_λ(v̂_j, t̂_j); image row i has positive ⟨v̂_i, t̂_i⟩ and negatives ⟨v̂_i, n_j⟩
  (j ≠ i), text row i likewise; L = CE(images) + CE(texts) (a sum), logits scaled by 1/τ₂.
* V-V (L-L): each image (text) mixed with its partner in the reversed batch, ṽ_i =
  m_λ(v̂_i, v̂_{N−1−i}), scored against the texts with soft targets λ·I + (1 − λ)·J (J the
  reversal); symmetric soft-target cross-entropy.
* V-L: both modalities mixed with the same λ and partner, ṽ against t̃, targets I + J (rows of
  mass 2, as the official code).

Across devices the partners and mixes are taken in the gathered batch (global indices, a λ
shared by every rank), so every term equals its one-device value.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clipft.losses.contrastive import upcast


def slerp(a: Tensor, b: Tensor, lam: float | Tensor, eps: float = 1e-6) -> Tensor:
    """Geodesic interpolation m_λ(a, b) of unit vectors along the last dimension, in at least
    fp32 (safe under autocast; returned in the inputs' dtype) and renormalised. The cosine is clamped
    away from ±1; where sin θ is tiny (a ≈ ±b) the normalised linear mix is used instead
    (equal vectors give themselves; exactly opposite vectors have no unique geodesic, and
    give the normalised linear mix, which is 0 at λ = ½ — never NaN)."""
    dtype = a.dtype
    a, b = upcast(a), upcast(b)
    lam = torch.as_tensor(lam, dtype=a.dtype, device=a.device)
    cos = (a * b).sum(-1, keepdim=True).clamp(-1 + eps, 1 - eps)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    safe = sin > 1e-3
    geodesic = (torch.sin(lam * theta) * a + torch.sin((1 - lam) * theta) * b) / torch.where(safe, sin, torch.ones_like(sin))
    linear = lam * a + (1 - lam) * b
    return F.normalize(torch.where(safe, geodesic, linear), dim=-1).to(dtype)


def _gathered(local: Tensor, gathered: Optional[Tensor]) -> Tensor:
    return local if gathered is None else gathered


def m2mix_loss(
    image_features: Tensor, text_features: Tensor, lam: float | Tensor, scale: float | Tensor,
    all_image_features: Optional[Tensor] = None, all_text_features: Optional[Tensor] = None, offset: int = 0,
) -> Tensor:
    """m²-mix's hard-negative loss for the local rows (module docstring; scale = 1/τ₂)."""
    all_image, all_text = _gathered(image_features, all_image_features), _gathered(text_features, all_text_features)
    mixed = slerp(all_image, all_text, lam)  # n_j for every pair of the batch
    rows = torch.arange(image_features.shape[0], device=image_features.device)
    targets = rows + offset
    positive = (image_features * text_features).sum(-1)
    loss = image_features.new_zeros(())
    for anchors in (image_features, text_features):
        logits = anchors @ mixed.T
        logits = logits.index_put((rows, targets), positive)  # own pair: the positive, not its mix
        loss = loss + F.cross_entropy(upcast(scale * logits), targets)
    return loss


def _partner_targets(rows: Tensor, total: int, own: float | Tensor, partner: float | Tensor) -> Tensor:
    """Soft targets of global rows ``rows``: ``own`` at the row's index, ``partner`` at the
    reversed batch's (N − 1 − index); added where they coincide."""
    targets = torch.zeros(len(rows), total, device=rows.device, dtype=torch.float64)
    targets[torch.arange(len(rows)), rows] += own
    targets[torch.arange(len(rows)), total - 1 - rows] += partner
    return targets


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return -(targets.to(upcast(logits).dtype) * F.log_softmax(upcast(logits), dim=-1)).sum(-1).mean()


def unimodal_mixup_loss(
    mixed_modality: str, image_features: Tensor, text_features: Tensor, lam: float | Tensor, scale: float | Tensor,
    all_image_features: Optional[Tensor] = None, all_text_features: Optional[Tensor] = None, offset: int = 0,
) -> Tensor:
    """V-V (``mixed_modality="image"``) or L-L (``"text"``) mixup for the local rows: the mixed
    modality's rows scored against the other modality, and back, with targets λ·I + (1 − λ)·J."""
    all_image, all_text = _gathered(image_features, all_image_features), _gathered(text_features, all_text_features)
    mixed_all, other_all = (all_image, all_text) if mixed_modality == "image" else (all_text, all_image)
    mixed_all = slerp(mixed_all, mixed_all.flip(0), lam)
    local = slice(offset, offset + image_features.shape[0])
    other_local = (text_features if mixed_modality == "image" else image_features)
    rows = torch.arange(offset, offset + image_features.shape[0], device=image_features.device)
    targets = _partner_targets(rows, len(mixed_all), lam, 1 - lam)
    forward = _soft_cross_entropy(scale * mixed_all[local] @ other_all.T, targets)
    backward = _soft_cross_entropy(scale * other_local @ mixed_all.T, targets)  # J is symmetric: same targets
    return (forward + backward) / 2


def joint_mixup_loss(
    image_features: Tensor, text_features: Tensor, lam: float | Tensor, scale: float | Tensor,
    all_image_features: Optional[Tensor] = None, all_text_features: Optional[Tensor] = None, offset: int = 0,
) -> Tensor:
    """V-L mixup for the local rows: ṽ = m_λ(v̂, v̂ reversed) against t̃ = m_λ(t̂, t̂ reversed),
    targets I + J (mass 2 per row, as the official code), both directions averaged."""
    all_image, all_text = _gathered(image_features, all_image_features), _gathered(text_features, all_text_features)
    mixed_image = slerp(all_image, all_image.flip(0), lam)
    mixed_text = slerp(all_text, all_text.flip(0), lam)
    local = slice(offset, offset + image_features.shape[0])
    rows = torch.arange(offset, offset + image_features.shape[0], device=image_features.device)
    targets = _partner_targets(rows, len(all_image), 1.0, 1.0)
    forward = _soft_cross_entropy(scale * mixed_image[local] @ mixed_text.T, targets)
    backward = _soft_cross_entropy(scale * mixed_text[local] @ mixed_image.T, targets)
    return (forward + backward) / 2
