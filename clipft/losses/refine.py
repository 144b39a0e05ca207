"""The two losses of CLIP-Refine (Yamaguchi et al., "Post-pre-training for Modality Alignment
in Vision-Language Foundation Models", CVPR 2025; arXiv 2504.12717), as pure functions.

RaFA, random feature alignment (paper Sec. 3.3): each pair i gets a reference vector r_i
drawn from a prior p(z), the same for its image and its text, and both embeddings are pulled
towards it. Two reductions exist, and they differ by a factor 2/D:

* ``paper``: L = 1/(2B) · Σ_i (‖v_i − r_i‖² + ‖t_i − r_i‖²)   (paper Eq. 3);
* ``code``:  L = mean_{i,d} (v_id − r_id)² + mean_{i,d} (t_id − r_id)²   (official code,
  ``F.mse_loss`` per modality, the two summed).

HyCD, hybrid contrastive distillation (paper Sec. 3.4, Eqs. 4–8): KL divergence, in both
directions, from hybrid targets ŷ = α·I + (1−α)·softmax(Z_teacher / T) to softmax(Z_student / T),
where Z = v tᵀ (times the logit scale where asked):

    L = ½ [ (1/B) Σ_i KL(ŷ^{I→T}_i ‖ softmax(Z_s[i,:]/T)) + (1/B) Σ_j KL(ŷ^{T→I}_j ‖ softmax(Z_sᵀ[j,:]/T)) ] · T².

Across devices HyCD takes the gathered features like the CLIP loss (``clip_contrastive_loss``):
the local rows against every device's columns, identity targets offset by ``rank·B``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clipft.losses.contrastive import clip_logits, upcast

RAFA_PRIORS = ("gaussian", "uniform", "sphere")
RAFA_REDUCTIONS = ("paper", "code")


def sample_references(
    batch: int,
    dim: int,
    prior: str = "gaussian",
    mean: float = 0.0,
    std: float = 1.0,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``[batch, dim]`` reference vectors for RaFA, one per pair.

    * ``gaussian``: N(mean·1, std²·I), the paper's prior (mean 0, std 1);
    * ``uniform``: U(mean − √3·std, mean + √3·std) per dimension (same mean and variance);
    * ``sphere``: the Gaussian draw normalised onto the unit sphere (for unit-norm features).
    """
    if prior not in RAFA_PRIORS:
        raise ValueError(f"RaFA prior '{prior}' is not one of: {', '.join(RAFA_PRIORS)}")
    if prior == "uniform":
        unit = torch.rand(batch, dim, device=device, dtype=dtype, generator=generator)
        return mean + std * math.sqrt(3.0) * (2.0 * unit - 1.0)
    refs = mean + std * torch.randn(batch, dim, device=device, dtype=dtype, generator=generator)
    return F.normalize(refs, dim=-1) if prior == "sphere" else refs


def rafa(image_features: Tensor, text_features: Tensor, references: Tensor, reduction: str = "paper") -> Tensor:
    """Random feature alignment (paper Eq. 3; see the module docstring for the reductions).

    Args:
        image_features, text_features: ``[B, D]`` embeddings of B pairs.
        references: ``[B, D]``, row i shared by image i and text i.
        reduction: ``paper`` (½·mean over pairs of the summed squared distances) or ``code``
            (element-wise mean per modality, the two summed; = paper · 2/D).
    """
    if reduction not in RAFA_REDUCTIONS:
        raise ValueError(f"RaFA reduction '{reduction}' is not one of: {', '.join(RAFA_REDUCTIONS)}")
    if not (image_features.shape == text_features.shape == references.shape):
        raise ValueError(
            f"RaFA needs image, text and reference tensors of one shape, got {tuple(image_features.shape)}, "
            f"{tuple(text_features.shape)} and {tuple(references.shape)}"
        )
    image_sq = (upcast(image_features) - upcast(references)).pow(2)
    text_sq = (upcast(text_features) - upcast(references)).pow(2)
    if reduction == "code":
        return image_sq.mean() + text_sq.mean()
    return 0.5 * (image_sq.sum(dim=1) + text_sq.sum(dim=1)).mean()


def hybrid_targets(teacher_logits: Tensor, alpha: float, temperature: float = 1.0, offset: int = 0) -> Tensor:
    """α·(one-hot of the pair) + (1−α)·softmax(teacher_logits / T), row-wise; ``teacher_logits``
    are the local rows ``[B, N]``, pair i's column is ``offset + i``."""
    teacher_logits = upcast(teacher_logits)
    rows = torch.arange(teacher_logits.shape[0], device=teacher_logits.device)
    one_hot = torch.zeros_like(teacher_logits)
    one_hot[rows, rows + offset] = 1.0
    return alpha * one_hot + (1.0 - alpha) * F.softmax(teacher_logits / temperature, dim=1)


def _kl_rows(targets: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """(1/B) Σ_i KL(targets_i ‖ softmax(student_logits_i / T)) · T² (0·log 0 = 0)."""
    log_probs = F.log_softmax(upcast(student_logits) / temperature, dim=1)
    kl = torch.xlogy(targets, targets) - targets * log_probs
    return kl.sum(dim=1).mean() * temperature**2


def hycd(
    image_features: Tensor,
    text_features: Tensor,
    teacher_image_features: Tensor,
    teacher_text_features: Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
    logit_scale: Optional[Tensor] = None,
    teacher_logit_scale: Optional[Tensor] = None,
    all_image_features: Optional[Tensor] = None,
    all_text_features: Optional[Tensor] = None,
    all_teacher_image_features: Optional[Tensor] = None,
    all_teacher_text_features: Optional[Tensor] = None,
    offset: int = 0,
) -> Tensor:
    """Hybrid contrastive distillation (paper Eqs. 4–8), both directions averaged.

    Args:
        image_features, text_features: the student's ``[B, D]`` features of the local pairs
            (raw or normalised: the caller decides).
        teacher_image_features, teacher_text_features: the teacher's, same pairs, no grad.
        alpha: weight of the ground-truth pairing in the targets (α = 1: plain CLIP loss).
        temperature: T of the softened distributions; the loss is multiplied by T².
        logit_scale, teacher_logit_scale: multipliers of the student's and the teacher's
            similarities (``None``: 1, the official code's raw dot products).
        all_*: the features of every device (gathered, the student's with gradients);
            ``None`` on one device. ``offset``: global index of the first local pair.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"HyCD alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"HyCD temperature must be > 0, got {temperature}")
    one = torch.ones((), device=image_features.device, dtype=image_features.dtype)
    student_i2t, student_t2i = clip_logits(
        image_features, text_features, one if logit_scale is None else logit_scale,
        all_image_features, all_text_features,
    )
    with torch.no_grad():
        teacher_i2t, teacher_t2i = clip_logits(
            teacher_image_features, teacher_text_features,
            one if teacher_logit_scale is None else teacher_logit_scale,
            all_teacher_image_features, all_teacher_text_features,
        )
        targets_i2t = hybrid_targets(teacher_i2t, alpha, temperature, offset)
        targets_t2i = hybrid_targets(teacher_t2i, alpha, temperature, offset)
    return 0.5 * (_kl_rows(targets_i2t, student_i2t, temperature) + _kl_rows(targets_t2i, student_t2i, temperature))
