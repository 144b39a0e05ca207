"""Deep tokens in open_clip's towers: no tokens = the plain model exactly; with tokens, the
hooked towers equal a direct construction of the extended sequence (text: causal mask over
L + K positions, end-of-text index moved by K); non-ViT towers get a clear error."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from clipft.models.tokens import TokenHookError, encode_image_with_tokens, encode_text_with_tokens

TEXT = ["a small red circle", "a large blue square to the left of a small green star", "x"]


def _models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    built_in = open_clip.create_model("clipft-tiny-vit")  # CLIP: text layers on the model itself
    custom = open_clip.create_model("clipft-tiny-vit", force_custom_text=True)  # CustomTextCLIP: model.text
    return [built_in.eval(), custom.eval()]


def _texts() -> torch.Tensor:
    return open_clip.get_tokenizer("clipft-tiny-vit")(TEXT)


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("index", [0, 1], ids=["CLIP", "CustomTextCLIP"])
@torch.no_grad()
def test_without_tokens_the_towers_are_the_plain_model(index: int) -> None:
    model = _models()[index]
    images, texts = _images(), _texts()
    image = encode_image_with_tokens(model, images, 0, 0, None)
    text = encode_text_with_tokens(model, texts, 0, 0, None)
    assert torch.equal(image.features, model.encode_image(images))
    assert torch.equal(text.features, model.encode_text(texts))
    assert image.tokens.shape == (3, 0, 64) and text.tokens.shape == (3, 0, 64)


def _text_parts(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    return model.text if hasattr(model, "text") else model


@pytest.mark.parametrize("index", [0, 1], ids=["CLIP", "CustomTextCLIP"])
@pytest.mark.parametrize("first", [0, 1])
@torch.no_grad()
def test_text_tokens_equal_a_direct_construction(index: int, first: int) -> None:
    """Tokens after BOT before block ``first``; causal mask over L+K; EOT read at argmax+K."""
    model = _models()[index]
    texts, k = _texts(), 3
    table = torch.randn(2, k, 64, generator=torch.Generator().manual_seed(2))  # per block from `first`
    out = encode_text_with_tokens(model, texts, k, first, lambda block, previous: table[block - first])

    parts = _text_parts(model)
    x = parts.token_embedding(texts) + parts.positional_embedding[: texts.shape[1]]
    blocks = parts.transformer.resblocks
    length = texts.shape[1]
    for i in range(first):
        x = blocks[i](x, attn_mask=parts.attn_mask[:length, :length])
    x = torch.cat([x[:, :1], table[0].expand(3, k, 64), x[:, 1:]], dim=1)
    causal = torch.full((length + k, length + k), float("-inf")).triu_(1)
    for i in range(first, len(blocks)):
        if i > first:
            x = torch.cat([x[:, :1], table[i - first].expand(3, k, 64), x[:, 1 + k:]], dim=1)
        x = blocks[i](x, attn_mask=causal)
    eot = texts.argmax(dim=-1) + k
    expected = parts.ln_final(x[torch.arange(3), eot]) @ parts.text_projection
    torch.testing.assert_close(out.features, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.tokens, x[:, 1:1 + k])
    # the begin-of-text position never sees the tokens (causal), later positions do
    plain = encode_text_with_tokens(model, texts, k, first, lambda block, previous: 0 * table[block - first])
    assert not torch.allclose(plain.features, out.features)


@pytest.mark.parametrize("first", [0, 1])
@torch.no_grad()
def test_image_tokens_equal_a_direct_construction(first: int) -> None:
    """[CLS, tokens, patches], no mask; the class feature pooled without the tokens."""
    model = _models()[0]
    visual, images, k = model.visual, _images(), 4
    table = torch.randn(2, k, 64, generator=torch.Generator().manual_seed(3))
    out = encode_image_with_tokens(model, images, k, first, lambda block, previous: table[block - first])

    x = visual._embeds(images)
    for i, block in enumerate(visual.transformer.resblocks):
        if i == first:
            x = torch.cat([x[:, :1], table[0].expand(3, k, 64), x[:, 1:]], dim=1)
        elif i > first:
            x = torch.cat([x[:, :1], table[i - first].expand(3, k, 64), x[:, 1 + k:]], dim=1)
        x = block(x)
    expected = visual.ln_post(x[:, 0]) @ visual.proj
    torch.testing.assert_close(out.features, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.tokens, x[:, 1:1 + k])
    assert not torch.allclose(out.features, model.encode_image(images), atol=1e-4)  # CLS attends to them


@torch.no_grad()
def test_previous_states_reach_the_callback_and_none_keeps_them() -> None:
    model, images, k = _models()[0], _images(), 2
    seen: list[tuple[int, bool]] = []

    def tokens(block: int, previous):  # type: ignore[no-untyped-def]
        seen.append((block, previous is None))
        return torch.ones(k, 64) if previous is None else None

    out = encode_image_with_tokens(model, images, k, 0, tokens)
    assert seen == [(0, True), (1, False)]
    assert out.tokens.shape == (3, k, 64)


def test_towers_without_a_token_sequence_are_named() -> None:
    resnet = CLIP(64, CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=32), CLIPTextCfg(context_length=8, width=32, heads=2, layers=1))
    with pytest.raises(TokenHookError, match="ModifiedResNet"):
        encode_image_with_tokens(resnet, torch.zeros(1, 3, 32, 32), 2, 0, lambda b, p: torch.zeros(2, 16))
    with pytest.raises(ValueError, match="blocks 0..1"):
        encode_image_with_tokens(_models()[0], _images(), 2, 2, lambda b, p: torch.zeros(2, 64))
