"""NegCLIP's loss against a direct implementation of its equation, masked negatives, and its
exactness across devices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipft.losses import clip_contrastive_loss, negclip_loss


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _direct(v: torch.Tensor, t: torch.Tensor, n: torch.Tensor, valid: torch.Tensor, s: float) -> float:
    """The equation, one term at a time."""
    count = len(v)
    negatives = [n[a, k] for a in range(count) for k in range(n.shape[1]) if valid[a, k]]
    i2t = 0.0
    for i in range(count):
        denominator = sum(math.exp(s * float(v[i] @ t[j])) for j in range(count))
        denominator += sum(math.exp(s * float(v[i] @ m)) for m in negatives)
        i2t -= math.log(math.exp(s * float(v[i] @ t[i])) / denominator)
    t2i = 0.0
    for j in range(count):
        denominator = sum(math.exp(s * float(t[j] @ v[i])) for i in range(count))
        t2i -= math.log(math.exp(s * float(t[j] @ v[j])) / denominator)
    return (i2t / count + t2i / count) / 2


def test_negclip_loss_is_its_equation_with_absent_negatives_left_out() -> None:
    v, t, n = _unit(5, 8, seed=0), _unit(5, 8, seed=1), _unit(5, 3, 8, seed=2)
    valid = torch.ones(5, 3, dtype=torch.bool)
    valid[1, 2] = valid[4, 0] = False
    s = torch.tensor(7.0, dtype=torch.float64)
    got = negclip_loss(v, t, n, valid, s)
    assert got.item() == pytest.approx(_direct(v, t, n, valid, 7.0), rel=1e-10)
    # with every negative absent it is the CLIP loss; each negative raises it
    none = torch.zeros_like(valid)
    torch.testing.assert_close(negclip_loss(v, t, n, none, s), clip_contrastive_loss(v, t, s))
    assert got > clip_contrastive_loss(v, t, s)


def test_negclip_loss_across_devices_equals_one_device() -> None:
    v, t, n = _unit(6, 4, seed=3), _unit(6, 4, seed=4), _unit(6, 2, 4, seed=5)
    valid = torch.rand(6, 2, generator=torch.Generator().manual_seed(6)) > 0.3
    s = torch.tensor(10.0, dtype=torch.float64)
    whole = negclip_loss(v, t, n, valid, s)
    halves = [
        negclip_loss(v[r * 3:(r + 1) * 3], t[r * 3:(r + 1) * 3], n[r * 3:(r + 1) * 3], valid[r * 3:(r + 1) * 3], s,
                     v, t, n, valid, offset=r * 3)
        for r in range(2)
    ]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)
    # the same batch in another order (each pair with its own negatives) gives the same loss
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(negclip_loss(v[order], t[order], n[order], valid[order], s), whole)
