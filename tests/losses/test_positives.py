"""Several images of one caption (one concept drawn in two styles): with positives, every pair
that shares the caption is a right answer instead of a negative — in the CLIP loss with weight
1/#positives (UniCL's multi-positive target), in SigLIP's with label +1. With CLIP's loss and
equal text features for equal captions the two losses are one function (tested below)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipft.config import load_config
from clipft.data.batch import Batch
from clipft.losses.contrastive import clip_contrastive_loss, siglip_loss
from clipft.methods import build_method


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_multi_positive_loss_is_the_equation() -> None:
    v, t, s = unit(4, 5, seed=0), unit(4, 5, seed=1), torch.tensor(10.0, dtype=torch.float64)
    same = torch.tensor([0, 1, 0, 2])  # pairs 0 and 2 share a caption
    positives = same[:, None] == same[None, :]
    expected = 0.0
    for logits in (s * v @ t.T, s * t @ v.T):
        log_p = logits.log_softmax(dim=1)
        expected += sum(-log_p[i, positives[i]].mean() for i in range(4)) / 4 / 2
    got = clip_contrastive_loss(v, t, s, positives=positives)
    assert got.item() == pytest.approx(float(expected), rel=1e-12)
    # no shared caption: the plain CLIP loss; shared ones lower it when the two look alike
    assert clip_contrastive_loss(v, t, s, positives=torch.eye(4, dtype=torch.bool)).item() == pytest.approx(
        clip_contrastive_loss(v, t, s).item(), rel=1e-12)
    # with positives, image 0's descent direction turns toward text 2 (same caption: a right
    # answer now, a wrong one in the plain loss)
    descent = []
    for given in (None, positives):
        image = v.clone().requires_grad_(True)
        descent.append(-torch.autograd.grad(clip_contrastive_loss(image, t, s, positives=given), image)[0][0])
    assert float((descent[1] - descent[0]) @ t[2]) > 0.1
    with pytest.raises(ValueError, match="own pair must be among its positives"):
        clip_contrastive_loss(v, t, s, positives=torch.zeros(4, 4, dtype=torch.bool))


def test_the_base_method_uses_same_caption_positives_when_asked() -> None:
    plain = build_method(load_config(None, []))
    asked = build_method(load_config(None, ["data.same_caption_positives=true"]))
    captions = ["a red circle", "a blue square", "a red circle", "a green star"]
    batch = Batch(torch.randn(4, 3, 32, 32), plain.tokenizer(captions), captions, ["0", "1", "2", "3"])
    assert plain.caption_positives(batch) is None
    positives = asked.caption_positives(batch)
    assert positives.tolist() == [[c == d for d in captions] for c in captions]
    features = {"image": unit(4, 8, seed=2).float(), "text": unit(4, 8, seed=3).float()}
    got = asked.loss_terms(features, batch)["contrastive"]
    assert got.item() == pytest.approx(clip_contrastive_loss(features["image"], features["text"], asked.logit_scale,
                                                             positives=positives).item(), rel=1e-6)
    assert got.item() != pytest.approx(plain.loss_terms(features, batch)["contrastive"].item(), rel=1e-3)


def text_tower(weight: torch.Tensor, caption_ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """A text encoder: unit(W · one-hot(caption)); ``keep``: a dropout mask per row (a text tower
    in training mode, or caption augmentation), else deterministic."""
    raw = weight[:, caption_ids].T
    return F.normalize(raw if keep is None else raw * keep, dim=-1)


def clip_and_grads(positives: torch.Tensor | None, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """CLIP loss of 6 pairs whose captions 0 and 2, 1 and 5 are equal, and its gradients w.r.t.
    the images, the text tower's weight and the log-scale."""
    captions = torch.tensor([0, 1, 0, 2, 3, 1])
    raw_images = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_(True)
    log_scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    loss = clip_contrastive_loss(F.normalize(raw_images, dim=-1), text_tower(weight, captions, keep), log_scale.exp(),
                                 positives=positives)
    return (loss, *torch.autograd.grad(loss, (raw_images, weight, log_scale)))


SAME_CAPTION = torch.tensor([0, 1, 0, 2, 3, 1])[:, None] == torch.tensor([0, 1, 0, 2, 3, 1])[None, :]


def test_clip_loss_with_equal_features_for_equal_captions_is_unchanged_by_positives() -> None:
    """Equal captions through a deterministic text tower give equal text features; then CLIP's
    loss with same-caption positives (UniCL, Eq. 3) is CLIP's own loss, in value and gradient.
    Image→text: the duplicates' columns have equal logits, so −½(log p_i + log p_i') = −log p_i.
    Text→image: the duplicates' rows are one distribution, so both sums are −log q_i − log q_i'.
    Both losses are one function of the encoders' parameters (not of the text features taken
    one by one: the duplicates' feature gradients differ, only their sum agrees)."""
    plain, with_positives = clip_and_grads(None), clip_and_grads(SAME_CAPTION)
    assert with_positives[0].item() == pytest.approx(plain[0].item(), rel=1e-13)
    for got, expected in zip(with_positives[1:], plain[1:]):
        torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-13)
    # the text features' own gradients differ for the duplicates; their sum (what the tower's
    # parameters receive) does not
    v = unit(6, 5, seed=6)
    grads = []
    for given in (None, SAME_CAPTION):
        t = text_tower(unit(5, 4, seed=7), torch.tensor([0, 1, 0, 2, 3, 1])).requires_grad_(True)
        grads.append(torch.autograd.grad(clip_contrastive_loss(v, t, torch.tensor(12.0, dtype=torch.float64),
                                                               positives=given), t)[0])
    assert (grads[1][0] - grads[0][0]).norm() > 1e-2
    torch.testing.assert_close(grads[1][0] + grads[1][2], grads[0][0] + grads[0][2], rtol=1e-11, atol=1e-13)


def test_clip_positives_matter_when_equal_captions_give_different_features() -> None:
    """With dropout in the text tower (or caption augmentation) the duplicates' features differ
    and the positives change the loss and every gradient."""
    keep = (torch.rand(6, 5, generator=torch.Generator().manual_seed(8)) > 0.3).double() / 0.7
    plain, with_positives = clip_and_grads(None, keep), clip_and_grads(SAME_CAPTION, keep)
    assert abs(with_positives[0].item() - plain[0].item()) > 1e-2
    for got, expected in zip(with_positives[1:], plain[1:]):
        assert (got - expected).norm() > 1e-3 * expected.norm()


def test_clip_positives_split_across_devices() -> None:
    """Each of 2 devices: its 3 rows, the gathered 6 columns, offset = rank·3 and its rows of the
    [6, 6] positives; the mean of the two is the one-device loss (the duplicates 0 and 5 are on
    different devices)."""
    v, t, s = unit(6, 5, seed=9), unit(6, 5, seed=10), torch.tensor(8.0, dtype=torch.float64)
    same = torch.tensor([0, 1, 2, 3, 4, 0])
    positives = same[:, None] == same[None, :]
    halves = [clip_contrastive_loss(v[k:k + 3], t[k:k + 3], s, v, t, offset=k, positives=positives[k:k + 3]) for k in (0, 3)]
    assert (sum(halves) / 2).item() == pytest.approx(clip_contrastive_loss(v, t, s, positives=positives).item(), rel=1e-12)
    assert clip_contrastive_loss(v, t, s, positives=positives).item() != pytest.approx(clip_contrastive_loss(v, t, s).item(), rel=1e-3)


def siglip_by_hand(v: torch.Tensor, t: torch.Tensor, scale: float, bias: float, positives: torch.Tensor) -> float:
    """−(1/N) Σ_i Σ_j log σ(z_ij (s v_i·t_j + b)), z_ij = 1 for every positive j of image i, −1
    otherwise (Zhai et al. 2023, Eq. 1 with several positives per image)."""
    n = v.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(t.shape[0]):
            z = 1.0 if positives[i, j] else -1.0
            total += math.log1p(math.exp(-z * (scale * float(v[i] @ t[j]) + bias)))
    return total / n


def test_siglip_with_positives_is_the_equation_and_splits_across_devices() -> None:
    v, t = unit(6, 5, seed=11), unit(6, 5, seed=12)
    t[2] = t[0]  # pairs 0 and 2 share a caption and, through a deterministic tower, its features
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    same = torch.tensor([0, 1, 0, 2, 3, 4])
    positives = same[:, None] == same[None, :]
    full = siglip_loss(v, t, scale, bias, positives=positives)
    assert full.item() == pytest.approx(siglip_by_hand(v, t, 10.0, -5.0, positives), rel=1e-12)
    # unlike CLIP's loss, it is not a no-op: without positives text 2 is a negative of image 0
    # although it is text 0 (a pull and a push on the same feature)
    assert abs(full.item() - siglip_loss(v, t, scale, bias).item()) > 0.1
    assert siglip_loss(v, t, scale, bias, positives=torch.eye(6, dtype=torch.bool)).item() == pytest.approx(
        siglip_loss(v, t, scale, bias).item(), rel=1e-13)
    # two devices of 3 pairs, the duplicates 0 and 2 on device 0, their columns gathered
    t_live = t.clone().requires_grad_(True)
    halves = [siglip_loss(v[k:k + 3], t_live[k:k + 3], scale, bias, t_live, offset=k, positives=positives[k:k + 3]) for k in (0, 3)]
    split = (halves[0] + halves[1]) / 2
    assert split.item() == pytest.approx(full.item(), rel=1e-12)
    t_full = t.clone().requires_grad_(True)
    torch.testing.assert_close(torch.autograd.grad(split, t_live)[0],
                               torch.autograd.grad(siglip_loss(v, t_full, scale, bias, positives=positives), t_full)[0])
    with pytest.raises(ValueError, match="own pair must be among its positives"):
        siglip_loss(v, t, scale, bias, positives=torch.zeros(6, 6, dtype=torch.bool))


def test_a_siglip_model_gets_the_same_caption_positives() -> None:
    overrides = ["model.logit_scale=10", "model.logit_bias=-10"]
    plain = build_method(load_config(None, overrides))
    asked = build_method(load_config(None, [*overrides, "data.same_caption_positives=true"]))
    captions = ["a red circle", "a blue square", "a red circle", "a green star"]
    batch = Batch(torch.randn(4, 3, 32, 32), plain.tokenizer(captions), captions, ["0", "1", "2", "3"])
    features = {"image": unit(4, 8, seed=13).float(), "text": unit(4, 8, seed=14).float()}
    features["text"][2] = features["text"][0]
    got = asked.loss_terms(features, batch)["contrastive"]
    expected = siglip_loss(features["image"], features["text"], asked.logit_scale, asked.model.logit_bias,
                           positives=asked.caption_positives(batch))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(got.item() - plain.loss_terms(features, batch)["contrastive"].item()) > 1e-2
