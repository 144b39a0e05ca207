"""LoRA adapters (Hu et al., ICLR 2022) on open_clip towers, through peft, exactly.

LoRA replaces a frozen linear map W by W + (α/r)·B·A with trainable A (r × d_in, random) and
B (d_out × r, zeros), so an adapted model starts as the base model.

open_clip's attention is ``torch.nn.MultiheadAttention``, which peft adapts badly (docs/models.md,
LoRA adapters): the in-projection packs q, k and v into one parameter, ``out_proj``
is never called as a module (an adapter on it alone trains nothing) and the pinned peft applies
the out_proj delta twice. clipft therefore first rewrites each self-attention module as
:class:`SplitAttention`: four ``nn.Linear`` layers ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj`` over the same weights, computing the same function (tested to 1e-6), and peft then
adapts ordinary Linear layers — the well-trodden path, also under DeepSpeed ZeRO-3. For export,
:func:`merge_lora` folds every adapter into its weight and :func:`pack_attention` restores
``nn.MultiheadAttention`` with open_clip's own parameter names.

Targets (``model.lora.targets``): ``q``, ``k``, ``v``, ``out`` (attention) and ``c_fc``,
``c_proj`` (MLP) in the blocks of the image tower (``visual.*``), the text tower
(``transformer.*`` / ``text.*``) or both (``model.lora.towers``).
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGET_LAYERS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj", "c_fc": "c_fc", "c_proj": "c_proj"}
TOWER_PREFIXES = {"image": ("visual",), "text": ("transformer", "text")}


class SplitAttention(nn.Module):
    """Self-attention of ``nn.MultiheadAttention`` (same-size q, k, v) with its projections as
    four ``nn.Linear`` layers; called like the module it replaces and returning ``(output,
    None)`` (open_clip asks for no attention weights)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        if not attention._qkv_same_embed_dim:
            raise ValueError("SplitAttention needs an attention with equal query, key and value sizes")
        if attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError("SplitAttention does not support bias_k/bias_v or add_zero_attn")
        width = attention.embed_dim
        self.num_heads = attention.num_heads
        self.batch_first = attention.batch_first
        self.dropout = attention.dropout
        bias = attention.in_proj_bias is not None
        device, dtype = attention.in_proj_weight.device, attention.in_proj_weight.dtype
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            layer = nn.Linear(width, width, bias=bias, device=device, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(attention.in_proj_weight[index * width:(index + 1) * width])
                if bias:
                    layer.bias.copy_(attention.in_proj_bias[index * width:(index + 1) * width])
            setattr(self, name, layer)
        self.out_proj = nn.Linear(width, width, bias=attention.out_proj.bias is not None, device=device, dtype=dtype)
        self.out_proj.load_state_dict(attention.out_proj.state_dict())

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        **unused: Any,
    ) -> tuple[Tensor, None]:
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, length, width = query.shape
        heads = self.num_heads

        def split_heads(x: Tensor) -> Tensor:
            return x.reshape(batch, x.shape[1], heads, width // heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(query)), split_heads(self.k_proj(key)), split_heads(self.v_proj(value))
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, batch, heads, length, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _additive_mask(
    attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], dtype: torch.dtype,
    batch: int, heads: int, q_len: int, k_len: int,
) -> Optional[Tensor]:
    """``nn.MultiheadAttention``'s masks (boolean True = masked out, or additive floats) as one
    additive mask for ``scaled_dot_product_attention``."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    out = None
    if attn_mask is not None:
        out = additive(attn_mask)
        if out.dim() == 3:  # (N·heads, L, S)
            out = out.reshape(batch, heads, q_len, k_len)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).reshape(batch, 1, 1, k_len)
        out = padding if out is None else out + padding
    return out


def _children(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            yield parent, name, child


def split_attention(model: nn.Module) -> int:
    """Replace every same-size self-attention ``nn.MultiheadAttention`` by :class:`SplitAttention`
    (in place); returns how many were replaced."""
    count = 0
    for parent, name, child in _children(model):
        if isinstance(child, nn.MultiheadAttention) and child._qkv_same_embed_dim:
            setattr(parent, name, SplitAttention(child))
            count += 1
    return count


def pack_attention(model: nn.Module) -> int:
    """The inverse of :func:`split_attention`: ``nn.MultiheadAttention`` with open_clip's
    parameter names (``in_proj_weight`` = [W_q; W_k; W_v]) in place of each SplitAttention."""
    count = 0
    for parent, name, child in _children(model):
        if isinstance(child, SplitAttention):
            if any(is_lora_layer(m) for m in child.modules()):
                raise ValueError("merge the LoRA adapters (merge_lora) before packing the attention")
            q, k, v, out = child.q_proj, child.k_proj, child.v_proj, child.out_proj
            attention = nn.MultiheadAttention(
                q.in_features, child.num_heads, dropout=child.dropout, bias=q.bias is not None,
                batch_first=child.batch_first, device=q.weight.device, dtype=q.weight.dtype,
            )
            with torch.no_grad():
                attention.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
                if q.bias is not None:
                    attention.in_proj_bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
                attention.out_proj.load_state_dict(out.state_dict())
            attention.train(child.training)
            setattr(parent, name, attention)
            count += 1
    return count


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_layer(m) for m in model.modules())


def target_pattern(towers: str, targets: list[str]) -> str:
    """The regular expression of the module names that LoRA adapts."""
    if towers not in ("image", "text", "both"):
        raise ValueError(f"model.lora.towers={towers!r} is not one of: image, text, both")
    unknown = [t for t in targets if t not in TARGET_LAYERS]
    if unknown or not targets:
        raise ValueError(f"model.lora.targets: {unknown or targets} — choose from {', '.join(TARGET_LAYERS)}")
    prefixes = [p for tower in (("image", "text") if towers == "both" else (towers,)) for p in TOWER_PREFIXES[tower]]
    layers = sorted({TARGET_LAYERS[t] for t in targets})
    return rf"^({'|'.join(prefixes)})\..*\.({'|'.join(layers)})$"


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, towers: str, targets: list[str]) -> int:
    """Add LoRA adapters to ``model`` in place (attention split first when it is targeted);
    every other parameter is frozen. Returns the number of adapted layers."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"model.lora.rank must be > 0, got {rank}")
    pattern = target_pattern(towers, targets)
    if any(t in ("q", "k", "v", "out") for t in targets):
        split_attention(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.match(pattern, n)]
    if not names:
        raise ValueError(
            f"model.lora: no Linear layer matches towers={towers} targets={targets} in this model "
            f"(pattern {pattern}); open_clip's own towers name them q_proj/k_proj/v_proj/out_proj (after the "
            "attention split), c_fc and c_proj"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, model)
    return len(names)


# the q projection of a SplitAttention (open_clip names its attention modules ``attn``)
_SPLIT_Q = re.compile(r"(^|\.)attn\.q_proj\.(base_layer\.)?weight$")


def is_adapted_state_dict(state: dict[str, Tensor]) -> bool:
    return any(".lora_A." in k or _SPLIT_Q.search(k) for k in state)


def plain_state_dict(state: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """The state dict of an adapted model (peft LoRA layers, split attention) as that of the
    plain open_clip model: W + scaling·B·A merged into each adapted weight (scaling = α/r),
    ``base_layer`` dropped from the names, and q/k/v packed back into ``in_proj_weight`` /
    ``in_proj_bias``. What :func:`merge_lora` + :func:`pack_attention` do to a model, on
    tensors (so it also reads checkpoints, DeepSpeed ones included, without building one)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            lora_a, lora_b = state.get(f"{prefix}.lora_A.default.weight"), state.get(f"{prefix}.lora_B.default.weight")
            if leaf == "weight" and lora_a is not None and lora_b is not None:
                value = (value.double() + scaling * (lora_b.double() @ lora_a.double())).to(value.dtype)
            key = f"{prefix}.{leaf}"
        out[key] = value
    for key in [k for k in out if _SPLIT_Q.search(k)]:
        attention = key[: -len(".q_proj.weight")]
        out[f"{attention}.in_proj_weight"] = torch.cat([out.pop(f"{attention}.{p}_proj.weight") for p in "qkv"])
        if f"{attention}.q_proj.bias" in out:
            out[f"{attention}.in_proj_bias"] = torch.cat([out.pop(f"{attention}.{p}_proj.bias") for p in "qkv"])
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base layer, W ← W + (α/r)·B·A, and put the plain layer back
    (in place); returns the number of merged layers."""
    count = 0
    for parent, name, child in _children(model):
        if is_lora_layer(child):
            child.merge()
            setattr(parent, name, child.get_base_layer())
            count += 1
    return count


class adapters_disabled:
    """Context in which every LoRA layer of ``model`` computes its base layer only."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if is_lora_layer(m)]

    def __enter__(self) -> None:
        for layer in self.layers:
            layer.enable_adapters(False)

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            layer.enable_adapters(True)
