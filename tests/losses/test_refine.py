"""RaFA and HyCD (CLIP-Refine) against their equations, written out with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipft.losses import clip_contrastive_loss, hycd, rafa, sample_references


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rafa_paper_reduction_is_half_mean_of_squared_distances() -> None:
    v, t, r = randn(5, 3, seed=0), randn(5, 3, seed=1), randn(5, 3, seed=2)
    expected = sum(
        sum((float(v[i, d]) - float(r[i, d])) ** 2 + (float(t[i, d]) - float(r[i, d])) ** 2 for d in range(3))
        for i in range(5)
    ) / (2 * 5)
    assert rafa(v, t, r, "paper").item() == pytest.approx(expected, rel=1e-9)


def test_rafa_code_reduction_is_summed_elementwise_means() -> None:
    v, t, r = randn(4, 6, seed=3), randn(4, 6, seed=4), randn(4, 6, seed=5)
    image_mse = sum((float(v[i, d]) - float(r[i, d])) ** 2 for i in range(4) for d in range(6)) / 24
    text_mse = sum((float(t[i, d]) - float(r[i, d])) ** 2 for i in range(4) for d in range(6)) / 24
    code = rafa(v, t, r, "code").item()
    assert code == pytest.approx(image_mse + text_mse, rel=1e-9)
    # The two readings differ by exactly 2/D (docs/methods/clip_refine.md#equations).
    assert code == pytest.approx(rafa(v, t, r, "paper").item() * 2 / 6, rel=1e-9)


def test_rafa_is_zero_at_the_references_and_rejects_bad_input() -> None:
    r = randn(3, 4, seed=6)
    assert rafa(r, r, r).item() == 0.0
    with pytest.raises(ValueError, match="reduction 'mean'"):
        rafa(r, r, r, "mean")
    with pytest.raises(ValueError, match="one shape"):
        rafa(r, r[:2], r)


def test_reference_priors() -> None:
    g = torch.Generator().manual_seed(0)
    gauss = sample_references(20000, 8, "gaussian", mean=0.5, std=2.0, generator=g)
    assert gauss.mean().item() == pytest.approx(0.5, abs=0.05)
    assert gauss.std().item() == pytest.approx(2.0, rel=0.02)
    uniform = sample_references(20000, 8, "uniform", mean=0.5, std=2.0, generator=g)
    half_width = 2.0 * math.sqrt(3.0)
    assert uniform.min().item() >= 0.5 - half_width and uniform.max().item() <= 0.5 + half_width
    assert uniform.std().item() == pytest.approx(2.0, rel=0.02)
    sphere = sample_references(100, 8, "sphere", generator=g)
    assert torch.allclose(sphere.norm(dim=1), torch.ones(100))
    with pytest.raises(ValueError, match="prior 'normal'"):
        sample_references(2, 2, "normal")


def hycd_by_hand(v, t, v0, t0, alpha, temp, scale=1.0, teacher_scale=1.0) -> float:
    """½[(1/B)Σ_i KL(ŷ_i ‖ softmax(s·v_i·tᵀ/T)) + same for texts]·T², with
    ŷ_i = α·e_i + (1−α)·softmax(s₀·v0_i·t0ᵀ/T), each KL as Σ_j y_j (log y_j − log p_j)."""
    n = v.shape[0]

    def softmax(row):
        m = max(row)
        e = [math.exp(x - m) for x in row]
        return [x / sum(e) for x in e]

    def direction(a, b, a0, b0):
        total = 0.0
        for i in range(n):
            p = softmax([scale * float(a[i] @ b[j]) / temp for j in range(n)])
            q = softmax([teacher_scale * float(a0[i] @ b0[j]) / temp for j in range(n)])
            y = [alpha * (i == j) + (1 - alpha) * q[j] for j in range(n)]
            total += sum(y[j] * (math.log(y[j]) - math.log(p[j])) for j in range(n) if y[j] > 0)
        return total / n

    return 0.5 * (direction(v, t, v0, t0) + direction(t, v, t0, v0)) * temp**2


@pytest.mark.parametrize("alpha,temp", [(0.5, 1.0), (0.0, 2.0), (0.3, 0.5)])
def test_hycd_matches_equation_on_raw_features(alpha: float, temp: float) -> None:
    v, t, v0, t0 = (randn(5, 4, seed=s) for s in range(4))
    loss = hycd(v, t, v0, t0, alpha=alpha, temperature=temp)
    assert loss.item() == pytest.approx(hycd_by_hand(v, t, v0, t0, alpha, temp), rel=1e-9)


def test_hycd_with_logit_scales() -> None:
    v, t, v0, t0 = (F.normalize(randn(6, 3, seed=s), dim=1) for s in range(4, 8))
    loss = hycd(v, t, v0, t0, logit_scale=torch.tensor(20.0, dtype=torch.float64),
                teacher_logit_scale=torch.tensor(50.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(hycd_by_hand(v, t, v0, t0, 0.5, 1.0, 20.0, 50.0), rel=1e-9)


def test_hycd_alpha_one_is_the_clip_loss() -> None:
    v, t = F.normalize(randn(7, 5, seed=8), dim=1), F.normalize(randn(7, 5, seed=9), dim=1)
    teacher = randn(7, 5, seed=10)  # irrelevant at α = 1
    scale = torch.tensor(14.0, dtype=torch.float64)
    loss = hycd(v, t, teacher, teacher, alpha=1.0, logit_scale=scale)
    assert loss.item() == pytest.approx(clip_contrastive_loss(v, t, scale).item(), rel=1e-9)


def test_hycd_is_zero_when_the_student_is_the_teacher_and_alpha_zero() -> None:
    v, t = randn(5, 4, seed=11), randn(5, 4, seed=12)
    assert hycd(v, t, v, t, alpha=0.0).item() == pytest.approx(0.0, abs=1e-12)
    assert hycd(v, t, v, t, alpha=0.5).item() > 0.01  # the ground-truth half still pulls


def test_hycd_across_devices_equals_one_device() -> None:
    """Two simulated ranks of 3 pairs each, with gathered features: the mean of their local
    losses and the gradients summed over ranks equal the 6-pair loss on one device."""
    v, t, v0, t0 = (randn(6, 4, seed=s) for s in range(13, 17))
    v.requires_grad_(True)
    full = hycd(v, t, v0, t0, alpha=0.4, temperature=1.5)
    (full_grad,) = torch.autograd.grad(full, v)
    local = [
        hycd(v[r * 3:(r + 1) * 3], t[r * 3:(r + 1) * 3], v0[r * 3:(r + 1) * 3], t0[r * 3:(r + 1) * 3],
             alpha=0.4, temperature=1.5, all_image_features=v, all_text_features=t,
             all_teacher_image_features=v0, all_teacher_text_features=t0, offset=r * 3)
        for r in range(2)
    ]
    mean = (local[0] + local[1]) / 2
    (split_grad,) = torch.autograd.grad(mean, v)
    assert mean.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(split_grad, full_grad, atol=1e-12)


def test_hycd_rejects_bad_options() -> None:
    v = randn(2, 2, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        hycd(v, v, v, v, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        hycd(v, v, v, v, temperature=0.0)


def _expected_rafa(v: torch.Tensor, t: torch.Tensor, draws: int, normalize: bool = False, **prior) -> tuple[float, torch.Tensor]:
    """Monte-Carlo mean over ``draws`` reference draws of RaFA (paper reduction) and its
    gradient with respect to v (before the normalisation, when there is one)."""
    v = v.clone().requires_grad_(True)
    features = F.normalize(v, dim=1) if normalize else v
    tiled_v, tiled_t = features.repeat(draws, 1), t.repeat(draws, 1)
    refs = sample_references(*tiled_v.shape, **prior, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss = rafa(tiled_v, tiled_t, refs, "paper")
    (grad,) = torch.autograd.grad(loss, v)
    return loss.item(), grad


def test_raw_rafa_in_expectation_only_pulls_each_feature_to_the_prior_mean() -> None:
    """E_r[L] = 1/(2B) Σ_i (‖v_i − μ‖² + ‖t_i − μ‖²) + Dσ²: the shared reference couples an
    image to its text only through noise; on average RaFA shrinks features toward μ."""
    v, t = randn(3, 4, seed=20), randn(3, 4, seed=21)
    mu, sigma = 0.5, 1.0
    loss, grad = _expected_rafa(v, t, 40000, prior="gaussian", mean=mu, std=sigma)
    closed = ((v - mu).pow(2).sum() + (t - mu).pow(2).sum()).item() / (2 * 3) + 4 * sigma**2
    assert loss == pytest.approx(closed, rel=0.01)
    assert torch.allclose(grad, (v - mu) / 3, atol=0.01)


def test_normalized_rafa_with_a_centred_sphere_prior_has_no_expected_gradient() -> None:
    """For unit features and references uniform on the sphere, E‖v̂ − r̂‖² = 2 whatever v̂:
    the normalised reading of RaFA adds noise but no pull (why it leaves the gap alone)."""
    v, t = randn(3, 8, seed=22), F.normalize(randn(3, 8, seed=23), dim=1)
    loss, grad = _expected_rafa(v, t, 40000, normalize=True, prior="sphere")
    assert loss == pytest.approx(2.0, abs=0.01)
    assert grad.abs().max().item() < 0.01
    one_draw = _expected_rafa(v, t, 1, normalize=True, prior="sphere")[1]
    assert one_draw.abs().max().item() > 0.05  # a single draw does push


def _expected_rafa_both(v: torch.Tensor, t: torch.Tensor, draws: int, normalize: bool, reduction: str,
                        **prior) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo mean over ``draws`` reference draws of RaFA's gradient with respect to the
    image and the text features (before the normalisation, when there is one)."""
    v, t = v.clone().requires_grad_(True), t.clone().requires_grad_(True)
    fv, ft = (F.normalize(v, dim=1), F.normalize(t, dim=1)) if normalize else (v, t)
    refs = sample_references(draws * v.shape[0], v.shape[1], **prior, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(1))
    loss = rafa(fv.repeat(draws, 1), ft.repeat(draws, 1), refs, reduction)  # the mean over the draws
    grad_v, grad_t = torch.autograd.grad(loss, [v, t])
    return grad_v, grad_t


def _means_distance(v: torch.Tensor, t: torch.Tensor) -> float:
    return (v.mean(0) - t.mean(0)).norm().item()


def test_expected_rafa_step_moves_the_modality_means_toward_each_other_only_on_raw_features() -> None:
    """Issue 26: the raw readings (``raw``, ``raw_rafa``: Gaussian N(0, I) references, the code's
    reduction) have an expected RaFA gradient 2(v − μ)/(BD) — analytic and Monte-Carlo agree — so
    a step along it shrinks both modality means toward μ and the distance between them by the
    factor 1 − 2η/(BD). The normalised reading's expected gradient is ~0: no pull at all."""
    B, D = 4, 6
    v, t = randn(B, D, seed=30) + 2.0, randn(B, D, seed=31) - 1.0  # two modalities with far-apart means
    grad_v, grad_t = _expected_rafa_both(v, t, 40000, normalize=False, reduction="code", prior="gaussian")
    assert torch.allclose(grad_v, 2 * v / (B * D), atol=0.01) and torch.allclose(grad_t, 2 * t / (B * D), atol=0.01)
    eta = 1.0
    before = _means_distance(v, t)
    after = _means_distance(v - eta * grad_v, t - eta * grad_t)
    assert after == pytest.approx((1 - 2 * eta / (B * D)) * before, rel=0.01) and after < 0.95 * before
    # the normalised reading: unit features, references on the sphere, the paper's reduction
    grad_v, grad_t = _expected_rafa_both(v, t, 40000, normalize=True, reduction="paper", prior="sphere")
    assert max(grad_v.abs().max().item(), grad_t.abs().max().item()) < 0.01
    unit = lambda x: F.normalize(x, dim=1)  # noqa: E731
    shift = _means_distance(unit(v - eta * grad_v), unit(t - eta * grad_t)) - _means_distance(unit(v), unit(t))
    assert abs(shift) < 0.005
