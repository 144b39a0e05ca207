"""The CLIP loss against its equation (Radford et al. 2021, Fig. 3), and across devices."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

from clipft.losses import clip_contrastive_loss


def direct_equation(v: torch.Tensor, t: torch.Tensor, scale: float) -> float:
    """L = ½[(1/N)Σ_i −log(e^{s v_i·t_i} / Σ_j e^{s v_i·t_j}) + (1/N)Σ_j −log(e^{s t_j·v_j} / Σ_i e^{s t_j·v_i})],
    written with explicit sums over Python floats."""
    n = v.shape[0]
    sim = [[scale * float(v[i] @ t[j]) for j in range(n)] for i in range(n)]
    i2t = sum(-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = sum(-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_matches_equation(scale: float) -> None:
    v, t = unit(6, 5, 0), unit(6, 5, 1)
    loss = clip_contrastive_loss(v, t, torch.tensor(scale, dtype=torch.float64))
    assert loss.item() == pytest.approx(direct_equation(v, t, scale), rel=1e-6)


def test_symmetric_and_scale_matters() -> None:
    v, t = unit(5, 4, 2), unit(5, 4, 3)
    s = torch.tensor(7.0, dtype=torch.float64)
    # swapping the modalities swaps the two directions: same total
    assert clip_contrastive_loss(v, t, s).item() == pytest.approx(clip_contrastive_loss(t, v, s).item(), rel=1e-9)
    assert clip_contrastive_loss(v, t, s).item() != pytest.approx(clip_contrastive_loss(v, t, s * 2).item(), rel=1e-3)


def test_limits() -> None:
    n = 8
    eye = torch.eye(n, dtype=torch.float64)
    # perfectly aligned, orthogonal pairs and a large scale: loss → 0
    assert clip_contrastive_loss(eye, eye, torch.tensor(100.0, dtype=torch.float64)).item() < 1e-30 + 1e-12
    # scale 0: every logit equal → log N in both directions
    v, t = unit(n, 3, 4), unit(n, 3, 5)
    assert clip_contrastive_loss(v, t, torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(math.log(n))


def test_gradient_of_logit_scale_matches_autograd_of_equation() -> None:
    v, t = unit(4, 3, 6), unit(4, 3, 7)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    clip_contrastive_loss(v, t, log_scale.exp()).backward()
    h = 1e-6
    numeric = (direct_equation(v, t, math.exp(math.log(10) + h)) - direct_equation(v, t, math.exp(math.log(10) - h))) / (2 * h)
    assert log_scale.grad.item() == pytest.approx(numeric, rel=1e-5)


def test_offset_selects_global_targets() -> None:
    v, t = unit(6, 4, 8), unit(6, 4, 9)
    s = torch.tensor(5.0, dtype=torch.float64)
    full = clip_contrastive_loss(v, t, s)
    halves = [clip_contrastive_loss(v[k : k + 3], t[k : k + 3], s, v, t, offset=k) for k in (0, 3)]
    assert (sum(halves) / 2).item() == pytest.approx(full.item(), rel=1e-12)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one_device() -> None:
    """2 ranks × 4 pairs with gathered features = 1 device × 8 pairs: loss and gradients.
    (Each rank's feature gradient is world × the single-device one, because DDP divides
    every parameter gradient by world when it averages; the logit scale shows this.)"""
    worker = os.path.join(os.path.dirname(__file__), "two_rank_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "out.pt")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
        # two fresh interpreters (as torchrun would start), independent of pytest's process
        procs = [
            subprocess.Popen([sys.executable, worker, out_file], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE)
            for r in range(2)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()[-2000:]
        got = torch.load(out_file)
        grads = [torch.load(f"{out_file}.{r}") for r in range(2)]

    torch.manual_seed(0)
    v = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    loss = clip_contrastive_loss(F.normalize(v, dim=1), F.normalize(t, dim=1), log_scale.exp())
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert got["scale_grad"].item() == pytest.approx(log_scale.grad.item(), rel=1e-9)
    v_grad = torch.cat([g["v_grad"] for g in grads]) / 2  # DDP's average over 2 ranks
    t_grad = torch.cat([g["t_grad"] for g in grads]) / 2
    torch.testing.assert_close(v_grad, v.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t_grad, t.grad, rtol=1e-9, atol=1e-12)


def siglip_by_hand(v: torch.Tensor, t: torch.Tensor, scale: float, bias: float) -> float:
    """−(1/N) Σ_i Σ_j log σ(z_ij (s v_i·t_j + b)), z_ii = 1, z_ij = −1 (Zhai et al. 2023, Eq. 1)."""
    n = v.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * (scale * float(v[i] @ t[j]) + bias))))
    return total / n


def test_siglip_matches_equation_and_splits_across_devices() -> None:
    from clipft.losses import siglip_loss

    v, t = unit(6, 5, 2), unit(6, 5, 3)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    full = siglip_loss(v, t, scale, bias)
    assert full.item() == pytest.approx(siglip_by_hand(v, t, 10.0, -10.0), rel=1e-9)
    # two devices of 3 pairs: local images against all texts, offset targets; mean = full loss
    t_live = t.clone().requires_grad_(True)
    halves = [siglip_loss(v[r * 3:(r + 1) * 3], t_live[r * 3:(r + 1) * 3], scale, bias, t_live, offset=r * 3) for r in range(2)]
    split = (halves[0] + halves[1]) / 2
    assert split.item() == pytest.approx(full.item(), rel=1e-12)
    (grad_split,) = torch.autograd.grad(split, t_live)
    t_full = t.clone().requires_grad_(True)
    (grad_full,) = torch.autograd.grad(siglip_loss(v, t_full, scale, bias), t_full)
    assert torch.allclose(grad_split, grad_full, atol=1e-12)
