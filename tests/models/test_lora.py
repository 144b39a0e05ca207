"""LoRA through peft on open_clip towers: the attention split is exact, adapters start as the
base model, only adapters train, and merging (module-level or on a state dict) reproduces the
adapted model — the out_proj case included."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from clipft.config import load_config
from clipft.models import ModelError, build_model, count_parameters, read_state_dict
from clipft.models.lora import (
    SplitAttention,
    adapters_disabled,
    merge_lora,
    pack_attention,
    plain_state_dict,
    split_attention,
)

ALL = "model.lora.targets=[q,k,v,out,c_fc,c_proj]"


def _bundle(*overrides: str):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return build_model(load_config(None, ["model.pretrained=synthetic", *overrides]).model)


def _inputs(bundle):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), bundle.tokenizer(["a red circle", "two blue stars", "a cat", "x"])


def _encode(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def _perturb_adapters(model: nn.Module) -> None:
    """Random B (peft starts it at zero), as after training."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_computes_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    split = SplitAttention(attention)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    causal = torch.full((5, 5), float("-inf")).triu(1)  # open_clip's text mask (additive)
    boolean = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = masked out
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    for kwargs in ({}, {"attn_mask": causal}, {"attn_mask": boolean}, {"key_padding_mask": padding},
                   {"attn_mask": causal, "key_padding_mask": padding}):
        expected = attention(x, x, x, need_weights=False, **kwargs)[0]
        got, weights = split(x, x, x, need_weights=False, **kwargs)
        assert weights is None
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=lambda m: f"{kwargs.keys()}: {m}")
    # and back: the packed module has open_clip's names and values
    holder = nn.Sequential(split)
    assert pack_attention(holder) == 1 and isinstance(holder[0], nn.MultiheadAttention)
    for key, value in attention.state_dict().items():
        torch.testing.assert_close(holder[0].state_dict()[key], value, rtol=0, atol=0)


def test_split_model_encodes_as_the_open_clip_model() -> None:
    bundle = _bundle()
    images, texts = _inputs(bundle)
    before = _encode(bundle.model.eval(), images, texts)
    assert split_attention(bundle.model) == 4  # 2 image + 2 text blocks
    for got, expected in zip(_encode(bundle.model, images, texts), before):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_adapters_start_as_the_base_model_and_only_they_train() -> None:
    base = _bundle()
    adapted = _bundle(ALL, "model.lora.rank=4")
    images, texts = _inputs(base)
    for got, expected in zip(_encode(adapted.model.eval(), images, texts), _encode(base.model.eval(), images, texts)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    trainable = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # rank 4 on 6 layers of 2 blocks per tower (width 64, MLP 256): A and B of each
    counts = count_parameters(adapted.model)  # what `clipft info` prints
    per_block = 4 * 4 * (64 + 64) + 4 * (64 + 256) + 4 * (256 + 64)
    assert counts["image"]["trainable"] == counts["text"]["trainable"] == 2 * per_block
    adapted.model.train()
    image_features, text_features = adapted.model.encode_image(images), adapted.model.encode_text(texts)
    (image_features.sum() + text_features.sum()).backward()
    got_grad = {n for n, p in adapted.model.named_parameters() if p.grad is not None}
    assert got_grad == {n for n in trainable if ".lora_A." in n} or got_grad == set(trainable)  # B = 0: A has none
    with_scale = _bundle("model.lora.rank=4", "model.lora_train_logit_scale=true")
    assert with_scale.model.logit_scale.requires_grad


def test_merged_adapters_equal_the_adapted_model() -> None:
    adapted = _bundle(ALL, "model.lora.rank=4", "model.lora.alpha=8")
    _perturb_adapters(adapted.model)
    images, texts = _inputs(adapted)
    live = _encode(adapted.model.eval(), images, texts)
    with adapters_disabled(adapted.model):  # the teacher view: the base model
        for got, expected in zip(_encode(adapted.model, images, texts), _encode(_bundle().model.eval(), images, texts)):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert any((a - b).abs().max() > 1e-2 for a, b in zip(live, _encode(_bundle().model.eval(), images, texts)))
    # on the state dict: a plain open_clip model loads it strictly and encodes the same
    plain = open_clip.create_model("clipft-tiny-vit")
    plain.load_state_dict(plain_state_dict(adapted.model.state_dict(), 8 / 4), strict=True)
    for got, expected in zip(_encode(plain.eval(), images, texts), live):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # on the module
    assert merge_lora(adapted.model) == 24 and pack_attention(adapted.model) == 4
    for got, expected in zip(_encode(adapted.model, images, texts), live):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert set(adapted.model.state_dict()) == set(plain.state_dict())


def test_out_projection_adapter_trains_and_is_applied_once() -> None:
    """peft's own MultiheadAttention support trains nothing with out_proj alone and applies its
    delta twice (docs/models.md, LoRA adapters); on the split attention it is an ordinary Linear."""
    adapted = _bundle("model.lora.rank=2", "model.lora.alpha=2", "model.lora.targets=[out]", "model.lora.towers=image")
    _perturb_adapters(adapted.model)
    images, texts = _inputs(adapted)
    adapted.model.train()
    adapted.model.encode_image(images).sum().backward()
    grads = {n: p.grad for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # reference by hand: W_out + 1.0·B·A in a plain open_clip model
    reference = _bundle().model.eval()
    with torch.no_grad():
        for block in range(2):
            layer = adapted.model.visual.transformer.resblocks[block].attn.out_proj
            delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            reference.visual.transformer.resblocks[block].attn.out_proj.weight += delta
    torch.testing.assert_close(_encode(adapted.model.eval(), images, texts)[0], _encode(reference, images, texts)[0],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("override,message", [
    ("model.lora.targets=[query]", "choose from q, k, v, out, c_fc, c_proj"),
    ("model.lora.towers=vision", "model.lora.towers='vision'"),
])
def test_bad_lora_settings_are_named(override: str, message: str) -> None:
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _bundle("model.lora.rank=4", override)


def test_a_short_lora_run_learns_keeps_the_base_and_its_checkpoint_reads_as_open_clip(
    tmp_path: Path, fast_overrides: list[str]
) -> None:
    """Adapters alone (rank 8 on every layer) on a randomly initialised tiny model: the
    validation loss falls from its start, the base weights stay, and the checkpoint reads as a
    plain open_clip state dict (adapters merged)."""
    import lightning as L

    from clipft.cli import main

    args = ["fit", "recipes/quickstart.yaml", *fast_overrides, "model.lora.rank=8", "model.lora.alpha=16", ALL,
            "optim.lr=2e-3", "trainer.max_steps=30", "trainer.val_check_interval=30"]
    assert main(args) == 0
    run = next(Path(fast_overrides[-1].split("=", 1)[1]).glob("quickstart/*"))
    report = json.loads((run / "report.json").read_text())
    assert report["metrics"]["val/loss"] < 3.2  # from log(32) = 3.47 at a random start
    state = read_state_dict(run / "checkpoints" / "last.ckpt")  # merged, open_clip's names
    plain = open_clip.create_model("clipft-tiny-vit")
    plain.load_state_dict(state, strict=True)
    L.seed_everything(0, verbose=False)  # the run's seed: the same random base
    base = build_model(load_config("recipes/quickstart.yaml", []).model).model.state_dict()
    assert torch.equal(state["visual.conv1.weight"], base["visual.conv1.weight"])  # not adapted: unchanged
    assert torch.equal(state["token_embedding.weight"], base["token_embedding.weight"])
    assert not torch.equal(state["visual.transformer.resblocks.0.attn.in_proj_weight"],
                           base["visual.transformer.resblocks.0.attn.in_proj_weight"])
