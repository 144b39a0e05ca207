"""NegCLIP (Yuksekgonul et al., "When and why vision-language models behave like
bags-of-words, and what to do about it?", ICLR 2023).

Contrastive fine-tuning in which each pair also brings negative captions — its own caption
with two objects or attributes swapped, an object, attribute or relation replaced, or an
object or attribute added (``data.negatives``: K per pair, SugarCrepe's types, made by the
rules of ``clipft/data/negatives.py`` or read from a file) — as extra columns of the
image→text softmax for every image of the batch (``clipft/losses/hard_negatives.py``).
Defaults of the paper (ViT-B/32 on COCO): batch 256, 5 epochs, lr 1e-6, 50 warm-up steps
then cosine, weight decay 0.2, AdamW β = (0.9, 0.98), ε = 1e-6, one negative caption per
pair (``recipes/negclip_vitb32_coco.yaml``).

Plain fine-tuning on the same captions explains much of NegCLIP's reported gain (SugarCrepe,
Hsieh et al. 2023): compare it against ``finetune`` with the same data and steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor

from clipft.config import ConfigError, MethodConfig, RunConfig
from clipft.data.batch import Batch
from clipft.losses.hard_negatives import negclip_loss
from clipft.methods.base import ContrastiveMethod, register_method
from clipft.models import ModelBundle


def encode_negatives(encode_text: Callable[[Tensor], Tensor], batch: Batch) -> Tensor:
    """``[B, K, D]`` embeddings of each pair's K negative captions (sample-major)."""
    if batch.negative_texts is None:
        raise ValueError("the batch has no negative captions (data.negatives.count)")
    pairs, count, length = batch.negative_texts.shape
    return encode_text(batch.negative_texts.reshape(pairs * count, length)).reshape(pairs, count, -1)


@dataclass
class NegClipConfig(MethodConfig):
    name: str = "negclip"

    def check(self, run: RunConfig) -> None:
        if run.data.negatives.count < 1:
            raise ConfigError(f"method {self.name} needs negative captions: set data.negatives.count >= 1")


@register_method("negclip", NegClipConfig)
class NegClip(ContrastiveMethod):
    """CLIP loss with each pair's negative captions as extra image→text negatives."""

    summary = "compositional fine-tuning: each pair's negative captions as extra image→text negatives"
    paper = 'Yuksekgonul et al., "When and why vision-language models behave like bags-of-words, and what to do about it?", ICLR 2023'

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__(config, bundle)
        if getattr(self.model, "logit_bias", None) is not None:
            raise ConfigError("method negclip uses the softmax CLIP loss; this model trains with SigLIP's sigmoid loss")

    def encode_batch(self, batch: Batch) -> dict[str, Tensor]:
        return {**super().encode_batch(batch), "negative_text": encode_negatives(self.encode_text, batch)}

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        image, text, negatives = features["image"], features["text"], features["negative_text"]
        valid = batch.negative_valid
        assert valid is not None
        _, rank = self.world_and_rank()
        loss = negclip_loss(
            image, text, negatives, valid, self.logit_scale,
            self.gather(image), self.gather(text), self.gather(negatives), self.gather(valid),
            offset=rank * image.shape[0],
        )
        return {"contrastive": loss}
