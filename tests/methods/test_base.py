from __future__ import annotations

import math

import pytest
import torch

from clipft.config import load_config
from clipft.data.batch import Batch
from clipft.methods import Finetune, build_method
from clipft.methods.base import warmup_cosine


@pytest.fixture(scope="module")
def method() -> Finetune:
    torch.manual_seed(0)
    return build_method(load_config(None, ["model.name=clipft-tiny-vit"]))


def test_parameter_groups(method: Finetune) -> None:
    decay, no_decay = method.parameter_groups()
    names = {id(p): n for n, p in method.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    for name in (
        "model.logit_scale", "model.positional_embedding", "model.token_embedding.weight",
        "model.visual.class_embedding", "model.visual.positional_embedding", "model.ln_final.weight",
        "model.ln_final.bias", "model.visual.ln_pre.weight", "model.transformer.resblocks.0.attn.in_proj_bias",
        "model.transformer.resblocks.0.mlp.c_fc.bias",
    ):
        assert name in not_decayed, name
    for name in (
        "model.visual.conv1.weight", "model.transformer.resblocks.0.attn.in_proj_weight",
        "model.transformer.resblocks.0.mlp.c_fc.weight", "model.text_projection", "model.visual.proj",
    ):
        assert name in decayed, name


def test_warmup_cosine_values() -> None:
    assert warmup_cosine(0, 100, 10, 0.0, "cosine") == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.0, "cosine") == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.0, "cosine") == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.0, "cosine") == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.1, "cosine") == pytest.approx(0.1)
    assert warmup_cosine(77, 100, 10, 0.0, "constant") == 1.0
    assert warmup_cosine(3, 100, 0, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.03)))


def test_logit_scale_clamped_after_an_optimizer_step_only(method: Finetune) -> None:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)
    optimizer.register_step_post_hook(method._mark_optimizer_step)  # as configure_optimizers does
    with torch.no_grad():
        method.model.logit_scale.fill_(10.0)
    method.on_train_batch_end(None, None, 0)  # accumulating: no step yet
    assert method.logit_scale.item() == pytest.approx(math.exp(10.0))
    optimizer.step()  # no gradients: a step the divergence guard dropped changes nothing
    method.on_train_batch_end(None, None, 0)
    assert method.logit_scale.item() == pytest.approx(math.exp(10.0))
    method.model.logit_scale.grad = torch.zeros_like(method.model.logit_scale)
    optimizer.step()
    method.on_train_batch_end(None, None, 0)
    assert method.logit_scale.item() == pytest.approx(100.0)


def _batch(method: Finetune) -> Batch:
    captions = ["a small red circle", "a large blue square", "a small green star", "a large cyan cross"]
    return Batch(torch.randn(4, 3, 32, 32), method.tokenizer(captions), captions, ["0", "1", "2", "3"])


def test_loss_weights(method: Finetune) -> None:
    batch = _batch(method)
    torch.manual_seed(0)
    base = method.training_step(batch, 0)
    method.cfg.method.loss_weights = {"contrastive": 2.0}
    try:
        assert method.training_step(batch, 0).item() == pytest.approx(2 * base.item(), rel=1e-5)
        method.cfg.method.loss_weights = {"hard_negative": 1.0}
        with pytest.raises(ValueError, match=r"does not compute: \['hard_negative'\]"):
            method.training_step(batch, 0)
    finally:
        method.cfg.method.loss_weights = {}


def test_gather_and_offset_wiring(method: Finetune, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 ranks, rank 1's rows are scored against both ranks' features with targets
    offset by B: the loss equals the single-device loss restricted to rank 1's rows."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from clipft.losses import clip_contrastive_loss

    g = torch.Generator().manual_seed(0)
    other_img, other_txt = (F.normalize(torch.randn(3, 4, generator=g), dim=1) for _ in range(2))
    local_img, local_txt = (F.normalize(torch.randn(3, 4, generator=g), dim=1) for _ in range(2))
    remote = {id(local_img): other_img, id(local_txt): other_txt}
    monkeypatch.setattr(method, "_trainer", SimpleNamespace(world_size=2, global_rank=1))
    monkeypatch.setattr(type(method), "global_rank", property(lambda self: 1))
    monkeypatch.setattr(method, "all_gather", lambda x, sync_grads: torch.stack([remote[id(x)], x]))
    got = method.contrastive_loss(local_img, local_txt)
    all_img, all_txt = torch.cat([other_img, local_img]), torch.cat([other_txt, local_txt])
    s = method.logit_scale
    expected = clip_contrastive_loss(local_img, local_txt, s, all_img, all_txt, offset=3)
    torch.testing.assert_close(got, expected)
    # and the mean over both ranks' local losses is the full-batch loss
    first = clip_contrastive_loss(other_img, other_txt, s, all_img, all_txt, offset=0)
    torch.testing.assert_close((first + got) / 2, clip_contrastive_loss(all_img, all_txt, s))


def test_a_model_with_a_logit_bias_is_trained_with_the_sigmoid_loss() -> None:
    """SigLIP models (a logit bias, e.g. ViT-B-16-SigLIP) keep their pre-training objective."""
    import torch.nn.functional as F

    from clipft.losses import clip_contrastive_loss, siglip_loss

    method = build_method(load_config(None, ["model.name=clipft-tiny-vit"]))
    v, t = (F.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(s)), dim=1) for s in (1, 2))
    s = method.logit_scale
    torch.testing.assert_close(method.contrastive_loss(v, t), clip_contrastive_loss(v, t, s))
    method.model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    torch.testing.assert_close(method.contrastive_loss(v, t), siglip_loss(v, t, s, method.model.logit_bias))


def _pairs(method: Finetune, n: int) -> Batch:
    words = ["red", "blue", "green", "cyan", "small", "large", "circle", "square", "star", "cross"]
    g = torch.Generator().manual_seed(n)
    captions = [" ".join(words[i] for i in torch.randint(0, len(words), (4,), generator=g).tolist()) for _ in range(n)]
    return Batch(torch.randn(n, 3, 32, 32, generator=g), method.tokenizer(captions), captions, [str(i) for i in range(n)])


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.logit_bias=-5"], ["method.name=clip_refine", "model.pretrained=synthetic", "method.loss_weights.contrastive=1"],
     ["method.name=clip_refine", "model.pretrained=synthetic", "method.features=raw"]],
    ids=["clip", "siglip", "clip_refine", "clip_refine_raw"],
)
def test_micro_batches_give_the_whole_batch_loss_and_gradients(overrides: list[str]) -> None:
    """trainer.micro_batch_size encodes 10 pairs as 4 + 4 + 2 under activation checkpointing:
    the loss sees all 10 pairs' features, so loss and every gradient (the logit scale's and
    bias's included, once) equal those of the batch encoded at once."""
    torch.manual_seed(0)
    method = build_method(load_config(None, ["model.name=clipft-tiny-vit", *overrides]))
    method.train()
    batch = _pairs(method, 10)
    results = []
    for micro in (None, 4):
        method.cfg.trainer.micro_batch_size = micro
        method.zero_grad()
        loss = method.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}))
    (whole, whole_grads), (split, split_grads) = results
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    assert whole_grads.keys() == split_grads.keys()
    assert ("model.logit_scale" in whole_grads) == ("method.features=raw" not in overrides)  # raw: no scale used
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert whole_grads["model.visual.conv1.weight"].abs().sum() > 0


def test_micro_batches_split_every_field_alike() -> None:
    method = build_method(load_config(None, ["model.name=clipft-tiny-vit"]))
    batch = _pairs(method, 5)
    chunks = batch.chunks(2)
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c.images for c in chunks]), batch.images)
    assert torch.equal(torch.cat([c.texts for c in chunks]), batch.texts)
    assert sum((c.captions for c in chunks), []) == batch.captions
    assert sum((c.image_ids for c in chunks), []) == batch.image_ids


def test_excluding_frozen_weights_needs_a_start_that_restores_them() -> None:
    from clipft.config import ConfigError

    with pytest.raises(ConfigError, match="model.pretrained"):
        build_method(load_config(None, ["trainer.exclude_frozen_parameters=true"]))
    method = build_method(load_config(None, ["trainer.exclude_frozen_parameters=true", "model.pretrained=synthetic"]))
    assert method.strict_loading is False


def test_a_trainable_parameter_the_loss_never_uses_stops_the_first_step() -> None:
    """Under DDP such a parameter would leave its gradient bucket unsynchronised (the step
    silently uses one device's gradients), so the base refuses it on every strategy."""
    import lightning as L
    from torch.utils.data import DataLoader

    method = build_method(load_config(None, ["model.name=clipft-tiny-vit", "optim.fused=false"]))
    method.model.unused_weight = torch.nn.Parameter(torch.zeros(3))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="does not use: model.unused_weight"):
        trainer.fit(method, train_dataloaders=DataLoader([_pairs(method, 4)], batch_size=None))


def test_training_gap_is_logged_from_unit_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """``train/gap`` and ``train/pair_distance`` are the geometry of the unit embeddings, also for
    a method whose loss sees raw features (CLIP-Refine's ``features: raw``): the same numbers as
    the validation gap metrics on the normalised features."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from clipft.eval.gap import centroid_distance, mean_pair_distance

    torch.manual_seed(0)
    method = build_method(load_config(None, ["method.name=clip_refine", "method.features=raw"]))
    logged: dict[str, float] = {}
    monkeypatch.setattr(method, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(method, "_trainer", SimpleNamespace(world_size=1, global_rank=0, global_step=0))
    captions = ["a red circle", "a blue star", "a green cross", "a cyan square"]
    batch = Batch(torch.randn(4, 3, 32, 32), method.tokenizer(captions), captions, list("0123"))
    features = method.batch_features(batch)
    image, text = features["image"].detach(), features["text"].detach()
    assert not torch.allclose(image.norm(dim=-1), torch.ones(4), atol=0.05)  # raw: not unit
    method.loss_terms(features, batch)
    unit_image, unit_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    assert logged["train/gap"] == pytest.approx(centroid_distance(unit_image, unit_text), rel=1e-5)
    assert logged["train/pair_distance"] == pytest.approx(mean_pair_distance(unit_image, unit_text), rel=1e-5)
