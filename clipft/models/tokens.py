"""Deep learnable tokens in open_clip's towers (MaPLe-style deep prompts; MMRL's
representation tokens).

K tokens are inserted before block ``first_layer`` of a tower, and from then on the tokens
at those K positions may be replaced at the input of every later block: a callback
``layer_tokens(block, previous)`` returns the tokens to put there (``[K, width]`` or
``[B, K, width]``), given the previous block's output at those positions (``None`` at the
insertion block), or ``None`` to keep what the previous block produced.

* Image (open_clip ``VisionTransformer``): the sequence ``[CLS, patches]`` becomes
  ``[CLS, tokens, patches]`` with no attention mask, so the class token attends to them.
  The tower's own pooling and projection then run on the sequence without the tokens, so
  the class feature is computed exactly as open_clip computes it (the tokens act only
  through attention).
* Text (open_clip's causal text transformer, in ``CLIP`` or ``CustomTextCLIP``):
  ``[BOT, words, EOT, pad]`` becomes ``[BOT, tokens, words, EOT, pad]``; the causal mask is
  rebuilt for the longer sequence and the pooled position (the end-of-text token) moves
  by K: the pooling runs on the sequence with the tokens taken out again.

Both return the tower's projected feature and the tokens' final states ``[B, K, width]``
(before the tower's final norm), from which a method builds its own features. With no
tokens (``num_tokens=0``) they reproduce ``encode_image`` / ``encode_text`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LayerTokens = Callable[[int, Optional[Tensor]], Optional[Tensor]]


class TokenHookError(ValueError):
    """A tower that deep tokens cannot be inserted into (named in the message)."""


@dataclass
class TowerOutput:
    features: Tensor  # [B, D] the tower's projected feature (class token / end-of-text token)
    tokens: Tensor  # [B, K, width] the inserted tokens' final states (before the final norm)


def tower_depth(transformer: nn.Module) -> int:
    return len(transformer.resblocks)


def _run_blocks(
    transformer: nn.Module,
    x: Tensor,
    num_tokens: int,
    first_layer: int,
    layer_tokens: Optional[LayerTokens],
    insert_at: int,
    attn_mask: Callable[[int], Optional[Tensor]],
) -> Tensor:
    """Run the blocks on ``x`` [B, L, W] (batch first), inserting/replacing tokens."""
    batch = x.shape[0]
    for index, block in enumerate(transformer.resblocks):
        if num_tokens and index >= first_layer:
            previous = x[:, insert_at:insert_at + num_tokens] if index > first_layer else None
            new = layer_tokens(index, previous) if layer_tokens is not None else None
            if index == first_layer and new is None:
                raise ValueError(f"layer_tokens returned no tokens for the insertion block {first_layer}")
            if new is not None:
                new = new.to(x.dtype).expand(batch, num_tokens, x.shape[-1])
                after = x[:, insert_at + (num_tokens if index > first_layer else 0):]
                x = torch.cat([x[:, :insert_at], new, after], dim=1)
        mask = attn_mask(x.shape[1])
        h = x if transformer.batch_first else x.transpose(0, 1)
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            h = checkpoint(block, h, None, None, mask, use_reentrant=False)
        else:
            h = block(h, attn_mask=mask)
        x = h if transformer.batch_first else h.transpose(0, 1)
    return x


def _check_range(num_tokens: int, first_layer: int, depth: int, tower: str) -> None:
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_tokens and not 0 <= first_layer < depth:
        raise ValueError(f"{tower} tower has blocks 0..{depth - 1}; cannot insert tokens before block {first_layer}")


def vision_transformer(model: nn.Module) -> VisionTransformer:
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise TokenHookError(
            f"deep tokens need open_clip's VisionTransformer image tower; this model's image tower is "
            f"{type(visual).__name__} (ResNet and timm towers have no token sequence to extend)"
        )
    return visual


def encode_image_with_tokens(
    model: nn.Module, images: Tensor, num_tokens: int, first_layer: int, layer_tokens: Optional[LayerTokens]
) -> TowerOutput:
    """The image tower with deep tokens after the class token (see the module docstring)."""
    visual = vision_transformer(model)
    _check_range(num_tokens, first_layer, tower_depth(visual.transformer), "the image")
    x = visual._embeds(images)
    x = _run_blocks(visual.transformer, x, num_tokens, first_layer, layer_tokens, 1, lambda length: None)
    tokens = x[:, 1:1 + num_tokens]
    pooled, _ = visual._pool(torch.cat([x[:, :1], x[:, 1 + num_tokens:]], dim=1))
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return TowerOutput(pooled, tokens)


@dataclass
class _TextParts:
    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Optional[nn.Module | Tensor]
    attn_mask: Optional[Tensor]
    pool_type: str
    eos_id: Optional[int]


def _text_parts(model: nn.Module) -> _TextParts:
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        if text.cls_emb is not None or text.attn_mask is None:
            raise TokenHookError("deep tokens need a causal text transformer without a class embedding (not CoCa)")
        return _TextParts(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                          text.text_projection, text.attn_mask, text.pool_type, text.eos_id)
    if text is None and hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        return _TextParts(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                          model.text_projection, model.attn_mask, model.text_pool_type, getattr(model, "text_eos_id", None))
    raise TokenHookError(
        f"deep tokens need open_clip's own text transformer; this model's text tower is "
        f"{type(text).__name__} (a Hugging Face tower has no hook for them)"
    )


def _causal_mask(length: int, like: Tensor) -> Tensor:
    return torch.full((length, length), float("-inf"), device=like.device, dtype=like.dtype).triu_(1)


def encode_text_with_tokens(
    model: nn.Module, texts: Tensor, num_tokens: int, first_layer: int, layer_tokens: Optional[LayerTokens]
) -> TowerOutput:
    """The text tower with deep tokens after the begin-of-text token (see the module docstring)."""
    parts = _text_parts(model)
    _check_range(num_tokens, first_layer, tower_depth(parts.transformer), "the text")
    cast = parts.transformer.get_cast_dtype()
    x = parts.token_embedding(texts).to(cast) + parts.positional_embedding[: texts.shape[1]].to(cast)
    base_mask = parts.attn_mask

    def mask(length: int) -> Tensor:
        if base_mask is not None and length <= base_mask.shape[0]:
            return base_mask[:length, :length]
        return _causal_mask(length, base_mask if base_mask is not None else x)

    x = _run_blocks(parts.transformer, x, num_tokens, first_layer, layer_tokens, 1, mask)
    tokens = x[:, 1:1 + num_tokens]
    x = parts.ln_final(torch.cat([x[:, :1], x[:, 1 + num_tokens:]], dim=1))
    pooled = text_global_pool(x, texts, parts.pool_type, eos_token_id=parts.eos_id)
    if isinstance(parts.text_projection, nn.Linear):
        pooled = parts.text_projection(pooled)
    elif parts.text_projection is not None:
        pooled = pooled @ parts.text_projection
    return TowerOutput(pooled, tokens)


def text_width(model: nn.Module) -> int:
    return _text_parts(model).transformer.width


def text_depth(model: nn.Module) -> int:
    return tower_depth(_text_parts(model).transformer)


def image_width(model: nn.Module) -> int:
    return vision_transformer(model).transformer.width


def image_depth(model: nn.Module) -> int:
    return tower_depth(vision_transformer(model).transformer)


__all__ = [
    "LayerTokens",
    "TokenHookError",
    "TowerOutput",
    "encode_image_with_tokens",
    "encode_text_with_tokens",
    "image_depth",
    "image_width",
    "text_depth",
    "text_width",
    "vision_transformer",
]
