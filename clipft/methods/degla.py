"""DeGLA: decoupled global-local alignment (Hu et al., ACM MM 2025; arXiv 2504.16801;
official code ``xiaoxing2001/DeGLA``).

NegCLIP's global loss on hard negative captions, plus local terms on each sample's own
negatives and self-distillation towards an EMA teacher that keeps the general abilities:

    L = L_global + 0.1·L_IGC + 0.1·L_TGC + 0.005·L_distill

(``method.loss_weights``: ``contrastive``, ``igc``, ``tgc``, ``distill``; the losses are in
``clipft/losses/hard_negatives.py``). The teacher is the base class's EMA of the model
(``method.ema_momentum`` = 0.9996 by default, fp32, updated after every optimizer step that
stepped, saved and restored, exact under DDP and ZeRO-3); it embeds the images and every
caption, positives and negatives. K = 4 negatives per pair (``data.negatives.count``), of the
DeGLA types where they apply — reshuffled order, swapped nouns, swapped adjectives, replaced
adjectives, replaced nouns — or read from a file of precomputed (e.g. LLM-written) negatives
(``data.negatives.column``).

Two departures from the released code, both to the paper's intent: TGC contrasts each sample
with its own negatives (the code's mask picks other samples', docs/methods/degla.md#paper-and-official-code), and the
released training script crashes on unknown loss arguments (same section), so nothing of it is
followed beyond the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from clipft.config import ConfigError, RunConfig, not_one_of
from clipft.data.batch import Batch
from clipft.losses.hard_negatives import distillation_loss, image_grounded_contrast, text_grounded_contrast
from clipft.methods.base import register_method
from clipft.methods.negclip import NegClip, NegClipConfig, encode_negatives
from clipft.models import ModelBundle


@dataclass
class DeglaConfig(NegClipConfig):
    name: str = "degla"
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"contrastive": 1.0, "igc": 0.1, "tgc": 0.1, "distill": 0.005}
    )
    ema_momentum: Optional[float] = 0.9996  # the teacher
    tgc_scale: float = 10.0  # fixed logit scale of TGC (τ = 0.1)
    distill_reduction: str = "sum"  # sum (the official code: grows with the batch) | mean (per pair)

    def check(self, run: RunConfig) -> None:
        super().check(run)
        if self.ema_momentum is None:
            raise ConfigError("method degla's teacher is the EMA of the model: method.ema_momentum must be set")
        if self.distill_reduction not in ("sum", "mean"):
            raise not_one_of("method.distill_reduction", self.distill_reduction, ("sum", "mean"))


@register_method("degla", DeglaConfig)
class Degla(NegClip):
    """NegCLIP + IGC + TGC + EMA self-distillation (see the module docstring)."""

    summary = "compositional fine-tuning: hard negatives, IGC + TGC, self-distillation from an EMA teacher"
    paper = 'Hu et al., "Decoupled global-local alignment for improving compositional understanding", ACM MM 2025'

    loss_term_names = ("contrastive", "igc", "tgc", "distill")

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__(config, bundle)
        self.options: DeglaConfig = self.cfg.method  # type: ignore[assignment]  (checked: DeglaConfig.check)

    @property
    def teacher(self) -> torch.nn.Module:
        assert self.ema is not None
        return self.ema

    def frozen_features(self, batch: Batch) -> dict[str, Tensor]:
        """The EMA teacher's unit embeddings of the images, captions and negative captions (in
        fp32, the teacher's precision)."""
        teacher = self.teacher
        images = batch.images.to(next(teacher.parameters()).dtype)
        return {
            "teacher_image": teacher.encode_image(images, normalize=True),
            "teacher_text": teacher.encode_text(batch.texts, normalize=True),
            "teacher_negative_text": encode_negatives(lambda t: teacher.encode_text(t, normalize=True), batch),
        }

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        image, text, negatives = features["image"], features["text"], features["negative_text"]
        valid = batch.negative_valid
        assert valid is not None
        world, _ = self.world_and_rank()
        student = [image, text, negatives.flatten(0, 1)]
        teacher = [features["teacher_image"], features["teacher_text"], features["teacher_negative_text"].flatten(0, 1)]
        return {
            **super().loss_terms(features, batch),  # the global NegCLIP loss, as "contrastive"
            "igc": image_grounded_contrast(image, text, negatives, valid, self.logit_scale),
            "tgc": text_grounded_contrast(text, features["teacher_text"].to(text.dtype), negatives, valid,
                                          self.options.tgc_scale),
            "distill": distillation_loss(student, teacher, self.options.distill_reduction, world),
        }
