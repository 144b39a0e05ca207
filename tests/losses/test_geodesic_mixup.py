"""Geodesic mixup: slerp's geometry and numerics, and each mixup loss against a direct
implementation of its equation, on one device and split across two."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipft.losses.mixup import joint_mixup_loss, m2mix_loss, slerp, unimodal_mixup_loss


def _unit(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def _angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.acos((x * y).sum(-1).clamp(-1, 1))


def test_slerp_geometry() -> None:
    a, b = _unit(50, 16, seed=0), _unit(50, 16, seed=1)
    torch.testing.assert_close(slerp(a, b, 1.0), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(slerp(a, b, 0.0), b, atol=1e-6, rtol=0)
    theta = _angle(a, b)
    for lam in (0.1, 0.37, 0.5, 0.9):
        mixed = slerp(a, b, lam)
        torch.testing.assert_close(mixed.norm(dim=-1), torch.ones(50, dtype=torch.float64), atol=1e-6, rtol=0)
        # on the geodesic: the angle to a is (1 − λ)θ, to b λθ
        torch.testing.assert_close(_angle(a, mixed), (1 - lam) * theta, atol=1e-5, rtol=0)
        torch.testing.assert_close(_angle(mixed, b), lam * theta, atol=1e-5, rtol=0)
    # a λ per row broadcasts
    lams = torch.rand(50, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(_angle(slerp(a, b, lams), b), lams[:, 0] * theta, atol=1e-5, rtol=0)


def test_slerp_is_safe_for_equal_and_opposite_vectors_and_under_autocast() -> None:
    a = _unit(4, 8, seed=3, dtype=torch.float32).requires_grad_(True)
    same = slerp(a, a, 0.3)
    torch.testing.assert_close(same, a.detach(), atol=1e-6, rtol=0)
    opposite = slerp(a, -a, 0.3)
    assert torch.isfinite(opposite).all() and torch.isfinite(slerp(a, -a, 0.5)).all()
    (same.sum() + opposite.sum()).backward()
    assert torch.isfinite(a.grad).all()
    b = _unit(4, 8, seed=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = slerp(a.detach().bfloat16(), b.bfloat16(), 0.25)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), slerp(a.detach(), b, 0.25), atol=2e-2, rtol=0)


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> float:
    total = 0.0
    for row, target in zip(logits, targets):
        log_z = math.log(sum(math.exp(float(x)) for x in row))
        total -= sum(float(t) * (float(x) - log_z) for x, t in zip(row, target))
    return total / len(logits)


def test_m2mix_loss_is_its_equation() -> None:
    v, t, lam, s = _unit(6, 5, seed=5), _unit(6, 5, seed=6), 0.3, 1 / 0.07
    n = slerp(v, t, lam)
    expected = 0.0
    for anchors in (v, t):
        logits = torch.stack([torch.stack([s * (anchors[i] @ (t[i] if j == i else n[j]) if anchors is v
                                                else anchors[i] @ (v[i] if j == i else n[j])) for j in range(6)])
                              for i in range(6)])
        expected += _soft_ce(logits, torch.eye(6, dtype=torch.float64))
    assert m2mix_loss(v, t, lam, s).item() == pytest.approx(expected, rel=1e-9)


def test_unimodal_and_joint_mixups_are_their_equations() -> None:
    v, t, lam, s = _unit(5, 4, seed=7), _unit(5, 4, seed=8), 0.8, 100.0
    flip = torch.eye(5, dtype=torch.float64).flip(0)
    soft = lam * torch.eye(5, dtype=torch.float64) + (1 - lam) * flip
    mixed_v = slerp(v, v.flip(0), lam)
    expected_vv = (_soft_ce(s * mixed_v @ t.T, soft) + _soft_ce(s * t @ mixed_v.T, soft)) / 2
    assert unimodal_mixup_loss("image", v, t, lam, s).item() == pytest.approx(expected_vv, rel=1e-9)
    mixed_t = slerp(t, t.flip(0), lam)
    expected_ll = (_soft_ce(s * mixed_t @ v.T, soft) + _soft_ce(s * v @ mixed_t.T, soft)) / 2
    assert unimodal_mixup_loss("text", v, t, lam, s).item() == pytest.approx(expected_ll, rel=1e-9)
    two = torch.eye(5, dtype=torch.float64) + flip  # mass 2 per row (the middle row: 2 on itself)
    expected_vl = (_soft_ce(s * mixed_v @ mixed_t.T, two) + _soft_ce(s * mixed_t @ mixed_v.T, two)) / 2
    assert joint_mixup_loss(v, t, lam, s).item() == pytest.approx(expected_vl, rel=1e-9)


@pytest.mark.parametrize("loss", ["m2mix", "vv", "ll", "vl"])
def test_mixup_losses_across_devices_equal_one_device(loss: str) -> None:
    v, t = _unit(8, 6, seed=9), _unit(8, 6, seed=10)
    fn = {"m2mix": m2mix_loss, "vl": joint_mixup_loss,
          "vv": lambda *a, **k: unimodal_mixup_loss("image", *a, **k),
          "ll": lambda *a, **k: unimodal_mixup_loss("text", *a, **k)}[loss]
    whole = fn(v, t, 0.6, 20.0)
    halves = [fn(v[r * 4:(r + 1) * 4], t[r * 4:(r + 1) * 4], 0.6, 20.0, all_image_features=v, all_text_features=t,
                 offset=r * 4) for r in range(2)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)
