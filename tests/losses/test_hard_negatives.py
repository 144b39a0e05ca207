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


def _own_ce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor, s: float) -> float:
    total = 0.0
    for i in range(len(anchors)):
        logits = [s * float(anchors[i] @ positives[i])]
        logits += [s * float(anchors[i] @ negatives[i, k]) for k in range(negatives.shape[1]) if valid[i, k]]
        total -= logits[0] - math.log(sum(math.exp(x) for x in logits))
    return total / len(anchors)


def test_degla_local_terms_are_their_equations_on_each_samples_own_negatives() -> None:
    from clipft.losses import distillation_loss, image_grounded_contrast, text_grounded_contrast

    v, t, teacher_t = _unit(5, 6, seed=11), _unit(5, 6, seed=12), _unit(5, 6, seed=13)
    n = _unit(5, 3, 6, seed=14)
    valid = torch.ones(5, 3, dtype=torch.bool)
    valid[2, 1] = False
    s = torch.tensor(20.0, dtype=torch.float64)
    igc = image_grounded_contrast(v, t, n, valid, s)
    assert igc.item() == pytest.approx(_own_ce(v, t, n, valid, 20.0), rel=1e-10)
    tgc = text_grounded_contrast(t, teacher_t, n, valid)
    assert tgc.item() == pytest.approx(_own_ce(t, teacher_t, n, valid, 10.0), rel=1e-10)
    # own negatives: handing row i another sample's negatives changes the loss (the released
    # code's type-major mask on a sample-major batch does exactly that)
    assert not torch.isclose(text_grounded_contrast(t, teacher_t, n.roll(1, 0), valid.roll(1, 0)), tgc)
    # per-sample terms: the mean of two devices' halves is the whole
    halves = [image_grounded_contrast(v[:2], t[:2], n[:2], valid[:2], s), image_grounded_contrast(v[2:4], t[2:4], n[2:4], valid[2:4], s)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, image_grounded_contrast(v[:4], t[:4], n[:4], valid[:4], s))
    # distillation: Σ‖·‖² over all rows (x devices, so the devices' mean is the one-device sum), or per row
    student, teacher = [v, t], [teacher_t, t]
    whole = ((v - teacher_t) ** 2).sum()
    torch.testing.assert_close(distillation_loss(student, teacher), whole)
    torch.testing.assert_close(distillation_loss(student, teacher, "mean"), whole / 5)
    parts = [distillation_loss([v[:2]], [teacher_t[:2]], world_size=2), distillation_loss([v[2:4]], [teacher_t[2:4]], world_size=2)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, distillation_loss([v[:4]], [teacher_t[:4]]))


def test_absent_negatives_leave_every_gradient_finite() -> None:
    """-inf for an absent negative is set after the learned scale multiplies the logits:
    before, its gradient with respect to the scale was 0·(−inf) = NaN."""
    from clipft.losses import image_grounded_contrast

    v, t, n = _unit(3, 4, seed=20), _unit(3, 4, seed=21), _unit(3, 2, 4, seed=22)
    valid = torch.tensor([[True, False], [False, False], [True, True]])
    for loss in (image_grounded_contrast, negclip_loss):
        scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        loss(v, t, n, valid, scale).backward()
        assert torch.isfinite(scale.grad)


def test_tgc_would_fail_with_the_released_codes_negative_mask() -> None:
    """The released TGC builds its mask with ``repeat(1, K)`` (type-major: column k·B + j is
    sample j's) over negatives stored sample-major (row B + i·K + k is sample i's): row i then
    meets negatives of samples ⌊i/K⌋, ⌊(i+B)/K⌋, ... Reproduce that indexing and check that
    clipft's value is the own-negatives equation, not that one."""
    from clipft.losses import text_grounded_contrast

    count, k = 4, 2
    t, teacher_t, n = _unit(count, 5, seed=30), _unit(count, 5, seed=31), _unit(count, k, 5, seed=32)
    valid = torch.ones(count, k, dtype=torch.bool)
    flat = n.reshape(count * k, 5)  # sample-major, as the batch holds them
    released = n.clone()
    for i in range(count):
        for kk in range(k):
            released[i, kk] = flat[kk * count + i]  # type-major reading of a sample-major list
    ours = text_grounded_contrast(t, teacher_t, n, valid)
    assert ours.item() == pytest.approx(_own_ce(t, teacher_t, n, valid, 10.0), rel=1e-10)
    assert abs(ours.item() - _own_ce(t, teacher_t, released, valid, 10.0)) > 1e-3
