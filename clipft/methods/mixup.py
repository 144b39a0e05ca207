"""Geodesic multi-modal mixup for robust fine-tuning: m²-mix and m³-mix (Oh et al., NeurIPS
2023; official code ``changdaeoh/multimodal-mixup``).

Contrastive fine-tuning plus mixup terms on the unit sphere (``clipft/losses/mixup.py``):

    L = L_CLIP + c(e)·(w_m·L_m² + w_v·L_VV + w_l·L_LL + w_vl·L_VL)

with the weights in ``method.loss_weights`` (``m2mix``, ``vv``, ``ll``, ``vl``), c(e) = 1/(e+1)
for the 0-based epoch e (``method.decay: epoch``, on as in the official scripts; ``none``: 1),
λ ~ Beta(β, β) drawn once per step and term from a generator seeded by (run.seed, step) — the
same on every device and after a resume. Temperatures as the official code: a fixed τ = 0.01
for the CLIP and uni-/joint-modal terms (``method.temperature``; null: the model's learned
logit scale) and τ₂ = 0.07 for the m²-mix negatives. m²-mix = CLIP + m²; m³-mix = all four
(``recipes/m2mix.yaml``, ``recipes/m3mix.yaml``). The training code's loss is followed where
the official README's differs (docs/methods/mixup.md#paper-and-official-code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from clipft.config import ConfigError, MethodConfig, RunConfig, not_one_of
from clipft.data.batch import Batch
from clipft.losses.mixup import joint_mixup_loss, m2mix_loss, unimodal_mixup_loss
from clipft.methods.base import ContrastiveMethod, register_method
from clipft.models import ModelBundle

TERMS = ("m2mix", "vv", "ll", "vl")


@dataclass
class MixupConfig(MethodConfig):
    name: str = "mixup"
    # m²-mix by default (w_m = 0.01); m³-mix also weighs vv, ll, vl (recipes/m3mix.yaml)
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"contrastive": 1.0, "m2mix": 0.01, "vv": 0.0, "ll": 0.0, "vl": 0.0}
    )
    temperature: Optional[float] = 0.01  # τ of CLIP and the uni-/joint-modal terms; null: learned
    m2mix_temperature: float = 0.07  # τ₂ of the m²-mix negatives
    # β of each term's mixing ratio λ ~ Beta(β, β)
    betas: dict[str, float] = field(default_factory=lambda: {"m2mix": 0.5, "vv": 0.5, "ll": 0.5, "vl": 0.5})
    decay: str = "epoch"  # epoch: c(e) = 1/(e+1); none

    def check(self, run: RunConfig) -> None:
        if self.decay not in ("epoch", "none"):
            raise not_one_of("method.decay", self.decay, ("epoch", "none"))
        if set(self.betas) != set(TERMS) or any(b <= 0 for b in self.betas.values()):
            raise ConfigError(f"method.betas: a positive Beta parameter for each of {', '.join(TERMS)}")
        if (self.temperature is not None and self.temperature <= 0) or self.m2mix_temperature <= 0:
            raise ConfigError("method.temperature and method.m2mix_temperature must be > 0")


@register_method("mixup", MixupConfig)
class Mixup(ContrastiveMethod):
    """CLIP fine-tuning with geodesic mixup terms (see the module docstring)."""

    summary = "robust fine-tuning with geodesic multi-modal mixup (m²-mix, m³-mix)"
    paper = 'Oh et al., "Geodesic multi-modal mixup for robust fine-tuning", NeurIPS 2023'

    loss_term_names = ("contrastive", *TERMS)

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__(config, bundle)
        opts: MixupConfig = self.cfg.method  # type: ignore[assignment]  (checked: MixupConfig.check)
        if getattr(self.model, "logit_bias", None) is not None:
            raise ConfigError("method mixup uses the softmax CLIP loss; this model trains with SigLIP's sigmoid loss")
        self.options = opts
        if opts.temperature is not None:  # a fixed temperature: the model's own scale is unused
            self.model.logit_scale.requires_grad_(False)

    def mixing_weights(self) -> dict[str, float]:
        """λ ~ Beta(β, β) for each term, drawn from (run.seed, step): every device the same."""
        rng = np.random.default_rng([self.cfg.run.seed, self.global_step])
        return {term: float(rng.beta(self.options.betas[term], self.options.betas[term])) for term in TERMS}

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        opts = self.options
        image, text = features["image"], features["text"]
        scale = self.logit_scale if opts.temperature is None else torch.tensor(1.0 / opts.temperature, device=image.device)
        _, rank = self.world_and_rank()
        gathered = {"all_image_features": self.gather(image), "all_text_features": self.gather(text),
                    "offset": rank * image.shape[0]}
        lam = self.mixing_weights()
        decay = 1.0 / (self.current_epoch + 1) if opts.decay == "epoch" and self._trainer is not None else 1.0
        mixups = {
            "m2mix": lambda: m2mix_loss(image, text, lam["m2mix"], 1.0 / opts.m2mix_temperature, **gathered),
            "vv": lambda: unimodal_mixup_loss("image", image, text, lam["vv"], scale, **gathered),
            "ll": lambda: unimodal_mixup_loss("text", image, text, lam["ll"], scale, **gathered),
            "vl": lambda: joint_mixup_loss(image, text, lam["vl"], scale, **gathered),
        }
        weights = self.cfg.method.loss_weights
        terms = {"contrastive": self.contrastive_loss(image, text, scale=scale)}
        # a term weighted 0 is not computed (m²-mix leaves the three m³-mix terms at 0)
        terms.update({name: decay * loss() for name, loss in mixups.items() if weights.get(name, 1.0) != 0})
        return terms
