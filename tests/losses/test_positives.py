"""Several images of one caption (one concept drawn in two styles): with positives, every pair
that shares the caption is a right answer of the CLIP loss, with weight 1/#positives (UniCL's
multi-positive target), instead of a negative."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipft.config import load_config
from clipft.data.batch import Batch
from clipft.losses.contrastive import clip_contrastive_loss
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
