"""Losses as pure functions: tensors in, tensor out (no Lightning, no model code)."""

from clipft.losses.contrastive import clip_contrastive_loss, clip_logits, siglip_loss
from clipft.losses.hard_negatives import distillation_loss, image_grounded_contrast, negclip_loss, text_grounded_contrast
from clipft.losses.refine import hycd, rafa, sample_references

__all__ = [
    "clip_contrastive_loss", "clip_logits", "distillation_loss", "hycd", "image_grounded_contrast", "negclip_loss",
    "rafa", "sample_references", "siglip_loss", "text_grounded_contrast",
]
