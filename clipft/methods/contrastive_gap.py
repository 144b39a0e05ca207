"""Contrastive gap: the CLIP loss plus alignment and uniformity terms (Fahim, Murphy & Fyshe,
"It's Not a Modality Gap: Characterizing and Addressing the Contrastive Gap", 2024;
arXiv 2405.18570; the authors' code ``abrar-fahim/contrastive-gap``).

The paper finds that the two-encoder contrastive loss itself leaves the image and text
embeddings in two small, separate regions of the sphere (the "contrastive gap"), and closes
it by adding to the CLIP loss the alignment and uniformity losses of Wang & Isola ("Understanding
contrastive representation learning through alignment and uniformity on the hypersphere",
ICML 2020), carried over to two modalities. On the unit embeddings v̂_i (image) and t̂_i (text)
of the N pairs of a batch:

    L_Align    = (1/N) Σ_i ‖v̂_i − t̂_i‖²                                   (Wang & Isola's L_align, α = 2)
    L_Uniform  = ½ [log mean_{i<j} e^(−2‖v̂_i − v̂_j‖²) + log mean_{i<j} e^(−2‖t̂_i − t̂_j‖²)]
                                                     (their L_uniform, t = 2, within each modality)
    L_XUniform = log mean_{i≠j} e^(−2‖v̂_i − t̂_j‖²)        (across modalities, unmatched pairs)

    L_CUA   = L_CLIP + L_Uniform + L_Align                            (the default)
    L_CUAXU = L_CUA + L_XUniform                          (method.loss_weights.cross_uniformity=1)

L_CLIP is the symmetric CLIP loss (Radford et al. 2021; ``clipft/losses/contrastive.py``) at
the paper's fixed temperature τ = 0.01 (``method.temperature``; null: the model's learned
scale). Every weight is 1, as in the paper (``method.loss_weights``: ``contrastive``,
``alignment``, ``uniformity``, ``cross_uniformity``); all four terms are computed and logged
(``train/<term>``), a weight of 0 only takes a term out of the sum. The paper names these
losses but the text available here does not show its equation numbers; the formulas are the
paper's definitions as its authors' code computes them, and docs/methods/contrastive_gap.md
says what was pinned down and how.

Across devices the uniformity terms are computed over the features of every device (gathered
with gradients): each device computes the same value, that of one device holding the whole
batch, and DDP's gradient average is its gradient. Alignment is a mean over pairs, exact as
the mean of the devices' local means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from clipft.config import ConfigError, MethodConfig, RunConfig
from clipft.data.batch import Batch
from clipft.methods.base import ContrastiveMethod, register_method
from clipft.models import ModelBundle


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32, or as it is when already fp32/fp64 (bf16/fp16 autocast features lose the
    small distances these terms are made of)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``[N, M]`` ‖x_i − y_j‖², in fp32 at least. From ‖x‖² + ‖y‖² − 2x·y, not from pdist's
    square root, whose gradient is NaN where two rows are equal (a caption repeated in a batch)."""
    x, y = at_least_fp32(x), at_least_fp32(y)
    return (x.square().sum(1, keepdim=True) + y.square().sum(1) - 2 * x @ y.T).clamp_min(0)


def log_mean_exp(values: Tensor) -> Tensor:
    """log mean_k e^(values_k), stably."""
    return torch.logsumexp(values, dim=0) - math.log(values.numel())


def alignment_loss(image: Tensor, text: Tensor) -> Tensor:
    """L_Align = mean_i ‖v̂_i − t̂_i‖² over the pairs (Wang & Isola's L_align with α = 2)."""
    return (at_least_fp32(image) - at_least_fp32(text)).square().sum(1).mean()


def uniformity_loss(features: Tensor, t: float = 2.0) -> Tensor:
    """Wang & Isola's L_uniform: log mean_{i<j} e^(−t‖x_i − x_j‖²) over the distinct pairs of rows."""
    if features.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {features.shape[0]}")
    rows, cols = torch.triu_indices(features.shape[0], features.shape[0], offset=1, device=features.device)
    return log_mean_exp(-t * squared_distances(features, features)[rows, cols])


def cross_uniformity_loss(image: Tensor, text: Tensor, t: float = 2.0) -> Tensor:
    """L_XUniform = log mean_{i≠j} e^(−t‖v̂_i − t̂_j‖²) over the unmatched image–text pairs."""
    if image.shape[0] < 2:
        raise ValueError(f"cross-modal uniformity needs at least 2 pairs, got {image.shape[0]}")
    unmatched = ~torch.eye(image.shape[0], dtype=torch.bool, device=image.device)
    return log_mean_exp(-t * squared_distances(image, text)[unmatched])


@dataclass
class ContrastiveGapConfig(MethodConfig):
    name: str = "contrastive_gap"
    # L_CUA: CLIP + in-modal uniformity + alignment, all weights 1 as in the paper;
    # cross_uniformity: 1 gives L_CUAXU
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"contrastive": 1.0, "alignment": 1.0, "uniformity": 1.0, "cross_uniformity": 0.0}
    )
    temperature: Optional[float] = 0.01  # fixed τ of the CLIP term (the paper's); null: the model's learned scale
    uniformity_t: float = 2.0  # t of the uniformity terms' kernel e^(−t‖u − v‖²) (Wang & Isola's, the paper's)

    def check(self, run: RunConfig) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0 (or null: the learned scale), got {self.temperature}")
        if self.uniformity_t <= 0:
            raise ConfigError(f"method.uniformity_t must be > 0, got {self.uniformity_t}")
        if run.data.batch_size < 2:
            raise ConfigError("method contrastive_gap: uniformity needs at least 2 pairs per batch; data.batch_size is 1")


@register_method("contrastive_gap", ContrastiveGapConfig)
class ContrastiveGap(ContrastiveMethod):
    """CLIP loss + alignment + uniformity (+ cross-modal uniformity), see the module docstring."""

    summary = "close the contrastive (modality) gap: the CLIP loss plus alignment and uniformity terms"
    paper = ('Fahim, Murphy & Fyshe, "It\'s not a modality gap: characterizing and addressing the contrastive gap", '
             "arXiv 2405.18570, 2024")

    loss_term_names = ("contrastive", "alignment", "uniformity", "cross_uniformity")

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__(config, bundle)
        if getattr(self.model, "logit_bias", None) is not None:
            raise ConfigError("method contrastive_gap adds to the softmax CLIP loss; this model trains with SigLIP's sigmoid loss")
        self.options: ContrastiveGapConfig = self.cfg.method  # type: ignore[assignment]  (checked: its check())
        if self.options.temperature is not None:  # a fixed temperature: the model's own scale is unused
            self.model.logit_scale.requires_grad_(False)

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        image, text = features["image"], features["text"]
        fixed = self.options.temperature
        scale = None if fixed is None else torch.tensor(1.0 / fixed, device=image.device)
        all_image, all_text = self.gather(image), self.gather(text)
        t = self.options.uniformity_t
        return {
            "contrastive": self.contrastive_loss(image, text, scale=scale),
            "alignment": alignment_loss(image, text),
            "uniformity": (uniformity_loss(all_image, t) + uniformity_loss(all_text, t)) / 2,
            "cross_uniformity": cross_uniformity_loss(all_image, all_text, t),
        }
