"""``lp_ft``: LP-FT (Kumar et al., "Fine-tuning can distort pretrained features and underperform
out-of-distribution", ICLR 2022, Sec. 4): first a linear probe on the frozen features, then full
fine-tuning from it — the ``classifier`` method (image tower + head, cross-entropy) with the head
started at the probe (:mod:`clipft.methods.linear_probe`, the same settings and λ search) instead
of at the zero-shot classifier.

    (W₀, b₀) = the linear probe of the start's unit image features
    L        = CE(W·f̂(x) + b, y),  image tower and head trained

The paper's argument: a random or poor head makes the early gradients distort the features that
out-of-distribution inputs rely on; a head that already fits the training data (the probe) leaves
them closer to the start. WiSE-FT's start for the head stays the zero-shot head
(``head.start_weight``), as for ``classifier``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from clipft.methods.base import register_method
from clipft.methods.classifier import Classifier
from clipft.methods.linear_probe import LinearProbeConfig, probe_head


@dataclass
class LpFtConfig(LinearProbeConfig):
    """The probe's settings are linear_probe's (l2_grid, l2, val_fraction, max_iter)."""

    name: str = "lp_ft"


@register_method("lp_ft", LpFtConfig)
class LpFt(Classifier):
    """``classifier`` with its head started at the linear probe (see the module docstring)."""

    summary = "LP-FT: a linear probe, then the image tower and head fine-tuned from it, cross-entropy"
    paper = 'Kumar et al., "Fine-tuning can distort pretrained features and underperform out-of-distribution", ICLR 2022'
    needs_features = True

    def start_head(self, zero_shot: tuple[Tensor, Tensor], features: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        assert features is not None
        fit = probe_head(self, features, len(zero_shot[0]))
        return fit.weight, fit.bias


__all__ = ["LpFt", "LpFtConfig"]
