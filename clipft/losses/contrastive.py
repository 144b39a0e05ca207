"""The symmetric CLIP contrastive (InfoNCE) loss, exact across devices.

Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language
Supervision"), Fig. 3: with L2-normalised image and text embeddings v̂_i, t̂_j and the learned
temperature s = exp(logit_scale),

    L = ½ [ (1/N) Σ_i −log softmax_j(s·v̂_i·t̂_j)_i  +  (1/N) Σ_j −log softmax_i(s·t̂_j·v̂_i)_j ].

Across W devices each holding B pairs (N = W·B), every device computes its own B rows of
both directions against all N columns ("local loss", as open_clip's ``local_loss=True``):
the columns are the features gathered from every device *with* gradients, the targets are
the global indices of the local rows (``offset = rank·B``). Averaging the W local losses,
and the gradients as DDP does, gives exactly the loss and gradients of one device holding
all N pairs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_logits(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    all_image_features: Optional[Tensor] = None,
    all_text_features: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Local rows of the scaled similarity matrix in both directions.

    Returns ``(logits_per_image [B, N], logits_per_text [B, N])``: local images against all
    texts, local texts against all images. Without ``all_*`` the batch is its own gallery.
    """
    all_text = text_features if all_text_features is None else all_text_features
    all_image = image_features if all_image_features is None else all_image_features
    return logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T


def clip_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    all_image_features: Optional[Tensor] = None,
    all_text_features: Optional[Tensor] = None,
    offset: int = 0,
    positives: Optional[Tensor] = None,
) -> Tensor:
    """Symmetric InfoNCE of Radford et al. 2021 (Fig. 3) for the local rows.

    Args:
        image_features, text_features: ``[B, D]`` L2-normalised embeddings of this
            device's B pairs (pair i is image i with text i).
        logit_scale: the multiplier s = exp(learned log-scale) (a scalar tensor).
        all_image_features, all_text_features: ``[N, D]`` features of all devices in
            rank order (gathered with gradients); ``None`` on a single device.
        offset: global index of this device's first pair (``rank * B``).
        positives: ``[B, N]`` bool, the columns that are right answers for local row i (its own
            pair included), the same for image→text and text→image (a symmetric relation such
            as "same caption"): the target of row i is uniform over them, UniCL's
            multi-positive cross-entropy (Yang et al., CVPR 2022, Eq. 3). None: pair i alone.

    Returns:
        The mean over local rows of ½(CE image→text + CE text→image).
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image and text features must have the same shape, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    logits_per_image, logits_per_text = clip_logits(
        image_features, text_features, logit_scale, all_image_features, all_text_features
    )
    targets: Tensor = torch.arange(image_features.shape[0], device=image_features.device) + offset
    if positives is not None:
        check_own_pairs(positives, offset)
        targets = positives.float() / positives.sum(dim=1, keepdim=True)
    return (F.cross_entropy(upcast(logits_per_image), targets) + F.cross_entropy(upcast(logits_per_text), targets)) / 2


def check_own_pairs(positives: Tensor, offset: int) -> None:
    """``positives`` ``[B, N]`` must hold each local row's own pair (column ``offset + i``)."""
    rows = torch.arange(positives.shape[0], device=positives.device)
    if not bool(positives[rows, rows + offset].all()):
        raise ValueError("positives: each row's own pair must be among its positives")


def upcast(logits: Tensor) -> Tensor:
    """Softmax in at least fp32: bf16/fp16 logits (autocast) lose the loss's precision."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    all_text_features: Optional[Tensor] = None,
    offset: int = 0,
    positives: Optional[Tensor] = None,
) -> Tensor:
    """Sigmoid loss of SigLIP (Zhai et al., ICCV 2023, Eq. 1) for the local rows.

    On one device with N pairs: L = −(1/N) Σ_i Σ_j log σ(z_ij·(s·v̂_i·t̂_j + b)), z_ij = 1 for
    the pair (i = j) and −1 otherwise, over all N² image–text combinations. Across W devices
    each computes its B local images against the N gathered texts (with gradients, ``offset =
    rank·B``), divided by B: the mean over devices is the one-device loss, the same sum that
    open_clip's exchange of text features between neighbours computes.

    ``positives``: ``[B, N]`` bool, the right answers of local image i (its own pair included):
    z_ij = 1 for every one of them — Eq. 1 with multi-positive labels, each image–text
    combination still an independent binary decision. None: z_ij = 1 for the pair alone.
    """
    all_text = text_features if all_text_features is None else all_text_features
    logits = upcast(logit_scale * image_features @ all_text.T + logit_bias)
    if positives is None:
        rows = torch.arange(image_features.shape[0], device=logits.device)
        positives = torch.zeros_like(logits, dtype=torch.bool)
        positives[rows, rows + offset] = True
    else:
        check_own_pairs(positives, offset)
    signs = positives.to(logits.dtype) * 2 - 1  # z_ij = +1 for a positive, -1 otherwise
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]
