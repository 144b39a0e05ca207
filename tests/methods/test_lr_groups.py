"""optim.layer_decay and optim.lr_multipliers: every parameter's learning rate is the formula
(docs/finetuning.md), LoRA adapters take their block's, the schedule scales each group's own
base lr, and bad settings stop with one line naming the key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clipft.config import ConfigError, load_config
from clipft.data.batch import Batch
from clipft.methods import build_method
from clipft.methods.base import ContrastiveMethod, warmup_cosine
from clipft.models.layers import layer_decay_multipliers, layer_depths

TINY = ["model.name=clipft-tiny-vit"]  # 2 image blocks, 2 text blocks: N = 2, top = 3
EMBEDDINGS = ("positional_embedding", "token_embedding.weight", "visual.class_embedding",
              "visual.positional_embedding", "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias")


def _tiny_depth(name: str) -> int:
    """The depth of a tiny-model parameter, written out by hand."""
    if name in EMBEDDINGS:
        return 0
    for block in (0, 1):
        if f"resblocks.{block}." in name:
            return block + 1
    return 3  # ln_post, proj, ln_final, text_projection, logit_scale


def _optimizer(method: ContrastiveMethod, total: int = 100) -> tuple[torch.optim.Optimizer, object]:
    method.trainer = SimpleNamespace(estimated_stepping_batches=total)  # what configure_optimizers reads
    try:
        configured = method.configure_optimizers()
    finally:
        method.trainer = None
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def _lr_by_name(method: ContrastiveMethod, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    names = {id(p): n.removeprefix("model.") for n, p in method.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_every_parameter_gets_lr_times_decay_to_the_depth_from_the_top() -> None:
    method = build_method(load_config(None, [*TINY, "optim.lr=1e-3", "optim.layer_decay=0.6"]))
    optimizer, _ = _optimizer(method)
    lrs = _lr_by_name(method, optimizer)
    assert set(lrs) == {n for n, _ in method.model.named_parameters()}
    for name, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * 0.6 ** (3 - _tiny_depth(name)), rel=1e-12), name
    assert lrs["logit_scale"] == lrs["visual.proj"] == lrs["text_projection"] == 1e-3
    assert lrs["token_embedding.weight"] == pytest.approx(1e-3 * 0.6**3)
    # groups: unique (multiplier, weight decay) pairs, named for the lr log keys
    keys = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert len(keys) == len(set(keys)) == 8  # 4 depths x {decay, no decay}
    assert [g["name"] for g in optimizer.param_groups][:2] == ["decay_x1", "no_decay_x1"]
    decayed = {n for g in optimizer.param_groups if g["weight_decay"] > 0 for n in _lr_by_name(method, _Only(g))}
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decayed and "visual.ln_pre.weight" not in decayed


class _Only:  # an optimizer-shaped view of one group
    def __init__(self, group: dict) -> None:
        self.param_groups = [group]


def test_default_is_two_groups_at_the_run_lr() -> None:
    method = build_method(load_config(None, [*TINY, "optim.lr=1e-3"]))
    optimizer, _ = _optimizer(method)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)


def test_towers_of_different_depth_share_one_scale() -> None:
    """A 4-block image tower and a 2-block text tower: text block i takes depth 2(i+1); both
    towers' embeddings get γ^5, both last blocks γ, the projections 1."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(32, CLIPVisionCfg(layers=4, width=32, patch_size=8, image_size=16, head_width=16),
                 CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=2))
    names = [n for n, _ in model.named_parameters()]
    depths, top = layer_depths(names)
    assert top == 5
    for i in range(4):
        assert depths[f"visual.transformer.resblocks.{i}.mlp.c_fc.weight"] == i + 1
    assert depths["transformer.resblocks.0.mlp.c_fc.weight"] == 2 and depths["transformer.resblocks.1.ln_1.bias"] == 4
    multipliers = layer_decay_multipliers(names, 0.5)
    for name in ("visual.conv1.weight", "visual.class_embedding", "token_embedding.weight", "positional_embedding"):
        assert multipliers[name] == 0.5**5, name
    for name in ("visual.proj", "visual.ln_post.weight", "text_projection", "ln_final.bias", "logit_scale"):
        assert multipliers[name] == 1.0, name
    assert multipliers["visual.transformer.resblocks.3.attn.in_proj_weight"] == 0.5
    assert multipliers["transformer.resblocks.1.attn.in_proj_weight"] == 0.5


def test_timm_and_resnet_style_names() -> None:
    names = ["logit_scale", "visual.trunk.pos_embed", "visual.trunk.patch_embed.proj.weight",
             "visual.trunk.blocks.0.attn.qkv.weight", "visual.trunk.blocks.1.attn.qkv.weight", "visual.trunk.norm.weight",
             "visual.trunk.attn_pool.latent", "visual.head.proj.weight",
             "text.token_embedding.weight", "text.transformer.resblocks.0.ln_1.weight", "text.ln_final.weight",
             "text.text_projection.weight"]
    depths, top = layer_depths(names)
    assert top == 3
    assert depths["visual.trunk.pos_embed"] == depths["visual.trunk.patch_embed.proj.weight"] == 0
    assert depths["text.token_embedding.weight"] == 0
    assert depths["visual.trunk.blocks.1.attn.qkv.weight"] == 2 and depths["text.transformer.resblocks.0.ln_1.weight"] == 2
    for name in ("visual.trunk.norm.weight", "visual.trunk.attn_pool.latent", "visual.head.proj.weight",
                 "text.ln_final.weight", "text.text_projection.weight", "logit_scale"):
        assert depths[name] == top, name
    resnet = ["visual.conv1.weight", "visual.bn1.weight", "visual.layer1.0.conv1.weight", "visual.layer1.0.downsample.0.weight",
              "visual.layer2.0.conv1.weight", "visual.attnpool.positional_embedding", "visual.attnpool.c_proj.weight"]
    depths, top = layer_depths(resnet)
    assert [depths[n] for n in resnet] == [0, 0, 1, 1, 2, top, top]


def test_lr_multipliers_first_match_wins_and_multiply_the_layer_decay() -> None:
    method = build_method(load_config(None, [
        *TINY, "optim.lr=1e-3", "optim.layer_decay=0.5",
        "optim.lr_multipliers={visual: 1.0, transformer: 0.25, logit_scale: 0.1}"]))
    lrs = _lr_by_name(method, _optimizer(method)[0])
    for name, lr in lrs.items():
        pattern = 1.0 if "visual" in name else 0.25 if "transformer" in name else 0.1 if name == "logit_scale" else 1.0
        assert lr == pytest.approx(1e-3 * pattern * 0.5 ** (3 - _tiny_depth(name)), rel=1e-12), name
    # visual.transformer.* matched "visual" first: no 0.25 there
    assert lrs["visual.transformer.resblocks.1.ln_1.weight"] == pytest.approx(5e-4)
    assert lrs["transformer.resblocks.1.ln_1.weight"] == pytest.approx(1.25e-4)


def test_lora_adapters_take_their_blocks_multiplier() -> None:
    method = build_method(load_config(None, [*TINY, "model.lora.rank=4", "optim.lr=1e-3", "optim.layer_decay=0.5"]))
    lrs = _lr_by_name(method, _optimizer(method)[0])
    adapters = [n for n in lrs if ".lora_" in n]
    assert len(adapters) == 2 * 2 * 4 * 2  # 2 towers x 2 blocks x q, k, v, out x A, B
    for name in adapters:
        block = 0 if "resblocks.0." in name else 1
        assert lrs[name] == pytest.approx(1e-3 * 0.5 ** (2 - block), rel=1e-12), name


def test_the_schedule_scales_each_groups_own_base_lr() -> None:
    method = build_method(load_config(None, [
        *TINY, "optim.lr=1e-3", "optim.layer_decay=0.5", "optim.warmup_steps=4", "optim.min_lr=1e-4"]))
    optimizer, scheduler = _optimizer(method, total=20)
    base = [g["lr"] / warmup_cosine(0, 20, 4, 0.1, "cosine") for g in optimizer.param_groups]
    for step in range(20):
        factor = warmup_cosine(step, 20, 4, 0.1, "cosine")
        for group, lr in zip(optimizer.param_groups, base):
            assert group["lr"] == pytest.approx(lr * factor, rel=1e-9)
        optimizer.step()
        scheduler.step()
    assert sorted({round(b / 1e-3, 9) for b in base}) == [0.125, 0.25, 0.5, 1.0]


def test_one_adamw_step_moves_each_parameter_by_its_lr() -> None:
    """AdamW's first step (no weight decay) moves an element by lr·g/(|g|+eps) ≈ lr: the
    largest change in each tensor is that tensor's learning rate."""
    torch.manual_seed(0)
    method = build_method(load_config(None, [
        *TINY, "optim.lr=1e-2", "optim.weight_decay=0", "optim.layer_decay=0.5", "optim.schedule=constant",
        "optim.lr_multipliers={logit_scale: 0.1}"]))
    optimizer, _ = _optimizer(method)
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    captions = ["a small red circle", "a large blue square", "a small green star", "a large cyan cross"]
    batch = Batch(torch.randn(4, 3, 32, 32), method.tokenizer(captions), captions, ["0", "1", "2", "3"])
    method.loss_terms(method.batch_features(batch), batch)["contrastive"].backward()
    optimizer.step()
    for name, param in method.model.named_parameters():
        expected = 1e-2 * 0.5 ** (3 - _tiny_depth(name)) * (0.1 if name == "logit_scale" else 1.0)
        moved = (param.detach() - before[name]).abs().max().item()
        assert moved == pytest.approx(expected, rel=1e-3), name


@pytest.mark.parametrize("override,message", [
    ("optim.layer_decay=1.5", r"optim.layer_decay: must be in \(0, 1\]"),
    ("optim.layer_decay=0", r"optim.layer_decay: must be in \(0, 1\]"),
    ("optim.lr_multipliers={visual: -1}", "optim.lr_multipliers: multipliers must be >= 0"),
    ("optim.lr_multipliers={'visual[': 0.5}", r"optim.lr_multipliers: pattern 'visual\[' is not a regular expression"),
])
def test_bad_settings_fail_when_the_recipe_is_composed(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, override])


def test_a_pattern_that_matches_no_trainable_parameter_is_named() -> None:
    method = build_method(load_config(None, [*TINY, "optim.lr_multipliers={visual: 0.5, vision_tower: 0.1}"]))
    with pytest.raises(ConfigError, match=r"optim.lr_multipliers: pattern 'vision_tower' matches no trainable parameter"):
        _optimizer(method)
    locked = build_method(load_config(None, [*TINY, "model.lock_image=true", "optim.lr_multipliers={visual: 0.5}"]))
    with pytest.raises(ConfigError, match="pattern 'visual' matches no trainable parameter"):
        _optimizer(locked)
