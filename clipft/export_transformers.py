"""open_clip CLIP weights as Hugging Face transformers' ``CLIPModel`` (and its text or vision
tower alone), for the libraries that load those: diffusers' Stable Diffusion pipelines read a
``CLIPTextModel`` / ``CLIPTextModelWithProjection``, LLaVA-style models a ``CLIPVisionModel``,
serving stacks ``CLIPModel`` with its ``CLIPProcessor``.

The two libraries hold the same network (Radford et al., ICML 2021): a pre-LN ViT whose class
token is pooled, and a causal text transformer pooled at the end-of-text token. What differs is
the layout, and each difference is a trap this module maps once:

- attention: open_clip's ``nn.MultiheadAttention`` packs q, k, v into one ``in_proj`` (rows
  q, then k, then v); transformers has ``q_proj``, ``k_proj``, ``v_proj``;
- projections: open_clip computes ``x @ proj`` with ``proj`` of shape (width, embed_dim);
  transformers' ``visual_projection`` / ``text_projection`` are bias-free ``nn.Linear``
  (``x @ W.T``), so W is ``proj.T``;
- activation: ``quick_gelu: true`` in the open_clip config is ``hidden_act="quick_gelu"``,
  otherwise exact GELU (``"gelu"``);
- text pooling: open_clip pools at the largest token id (the end-of-text token, 49407);
  transformers pools at the first ``eos_token_id`` unless that id is 2 (its legacy argmax
  rule), so the config sets ``eos_token_id=49407``: the same position for every sequence
  open_clip's tokenizer makes;
- the class / positional embeddings, ``ln_pre`` → ``pre_layrnorm``, ``ln_post`` →
  ``post_layernorm``, ``ln_final`` → ``final_layer_norm``, ``logit_scale`` (both store log s).

Architectures transformers' CLIP cannot express are refused with one line naming what would
be needed (:class:`NotMappable`). The tokenizer files are made from open_clip's own BPE
vocabulary (the one in the open_clip package), so the folder loads offline.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch

TRANSFORMERS_FORMATS = ("transformers", "transformers-text", "transformers-vision")
SOT_ID, EOT_ID = 49406, 49407  # open_clip's <start_of_text> / <end_of_text>
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"  # their names in transformers' CLIP vocabulary
# transformers' CLIP pads with <|endoftext|>; "!" (id 0, open_clip's pad) would become a special
# token and split "!!" in captions. Positions up to the end-of-text token are unaffected.
PAD_TOKEN = EOT_TOKEN
ARCHITECTURES = {"transformers": "CLIPModel", "transformers-text": "CLIPTextModelWithProjection",
                 "transformers-vision": "CLIPVisionModelWithProjection"}
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL.Image.Resampling values


class NotMappable(ValueError):
    """An open_clip model (or preprocessing) that transformers' CLIP cannot hold; the message
    is one line naming the part and what would be needed."""


# Settings with a value other than open_clip's default that transformers' CLIP has no place
# for: (tower, key) -> what it is and what would be needed.
_REFUSED = {
    ("vision", "timm_model_name"): "a timm image tower (e.g. ConvNeXt); transformers' CLIPVisionModel is "
                                   "open_clip's own ViT: export --format local-dir for open_clip, or timm's own export",
    ("vision", "attentional_pool"): "an attentional pooler (CoCa-style) over the image tokens; CLIPVisionModel pools "
                                    "the class token only: export --format local-dir",
    ("vision", "pool_type"): "image pooling other than the class token ('tok'); CLIPVisionModel pools the class "
                             "token only: export --format local-dir",
    ("vision", "global_average_pool"): "average pooling of the image tokens; CLIPVisionModel pools the class token "
                                       "only: export --format local-dir",
    ("vision", "no_ln_pre"): "an image tower without ln_pre; CLIPVisionModel always has pre_layrnorm",
    ("text", "hf_model_name"): "a Hugging Face text tower (e.g. MiniLM/BERT); CLIPTextModel is OpenAI's causal text "
                               "transformer: export --format local-dir (it carries the text tower)",
    ("text", "no_causal_mask"): "a text tower without a causal mask (bidirectional, SigLIP-style); CLIPTextModel is "
                                "always causal: SiglipModel would be needed",
    ("text", "embed_cls"): "a text tower with an appended class token (CoCa); CLIPTextModel pools at the end-of-text "
                           "token: export --format local-dir",
    ("text", "proj_bias"): "a text projection with a bias; transformers' text_projection is a Linear without bias",
    ("text", "proj_type"): "a text tower without a projection (proj_type none); CLIPModel needs text_projection",
    ("text", "hf_tokenizer_name"): "a tokenizer other than open_clip's CLIP BPE; the exported CLIPTokenizer is "
                                   "open_clip's vocabulary: the model's own tokenizer files would be needed",
    ("text", "tokenizer_kwargs"): "tokenizer settings other than open_clip's default lower-casing; CLIPTokenizer "
                                  "lower-cases only",
}
_LAYER_SCALE = "layer-scale (ls_init_value); transformers' CLIPEncoderLayer has no per-layer scale"
_CUSTOM_BLOCK = "a custom attention block (qk-norm, scaled cosine attention, head scales or extra norms); " \
                "CLIPAttention is plain attention"
_CUSTOM_KEYS = ("block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                "scale_fc")
# Settings that only change training, the output dtype or which outputs are returned.
_HARMLESS = {"patch_dropout", "output_tokens", "output_dim", "timm_model_pretrained", "timm_pool", "timm_proj",
             "timm_proj_bias", "timm_drop", "timm_drop_path", "attn_pooler_queries", "attn_pooler_heads",
             "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "pad_id", "final_ln_after_pool"}


_TOP_LEVEL = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "custom_text", "cast_dtype", "init_logit_scale"}


def _defaults() -> dict[str, dict[str, Any]]:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return {"vision": {f.name: f.default for f in dataclasses.fields(CLIPVisionCfg)},
            "text": {f.name: f.default for f in dataclasses.fields(CLIPTextCfg)}}


def check_mappable(model_cfg: dict[str, Any], state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Raise :class:`NotMappable` (one line) unless ``model_cfg`` (an open_clip model config)
    describes a CLIP that transformers' ``CLIPModel`` computes exactly."""
    if "multimodal_cfg" in model_cfg:
        raise NotMappable("the model has a multimodal text decoder (CoCa); transformers' CLIPModel has none: "
                          "export --format local-dir")
    if "init_logit_bias" in model_cfg or (state is not None and "logit_bias" in state):
        raise NotMappable("the model has a logit bias (SigLIP's sigmoid loss); transformers' CLIPModel has no "
                          "logit_bias: SiglipModel would be needed, or a run without model.logit_bias")
    for key in sorted(set(model_cfg) - _TOP_LEVEL):
        raise NotMappable(f"{key}={json.dumps(model_cfg[key])}: a setting transformers' CLIP has no place for; "
                          "export --format local-dir")
    defaults = _defaults()
    for tower in ("vision", "text"):
        cfg = dict(model_cfg.get(f"{tower}_cfg") or {})
        for key, value in cfg.items():
            default = defaults[tower].get(key)
            if value == default or value is None or key in _HARMLESS:
                continue
            if (tower, key) == ("vision", "pos_embed_type") and value == "sin_cos_2d":
                continue  # a fixed table, stored in the state dict like a learned one
            if (tower, key) == ("text", "pool_type") and value == "eos" and cfg.get("eos_id") == EOT_ID:
                continue  # the end-of-text token, as transformers pools
            if (tower, key) == ("text", "eos_id"):
                continue
            if (tower, key) == ("text", "tokenizer_kwargs") and value in ({}, {"clean": "lower"}):
                continue
            if key == "norm_kwargs" and set(value) <= {"eps"}:
                continue  # layer_norm_eps
            where = f"{tower}_cfg.{key}={json.dumps(value)}"
            if key == "ls_init_value":
                raise NotMappable(f"{where}: {_LAYER_SCALE}")
            if key in _CUSTOM_KEYS:
                raise NotMappable(f"{where}: {_CUSTOM_BLOCK}")
            if key == "layers" and tower == "vision" and isinstance(value, (list, tuple)):
                raise NotMappable(f"{where}: a ResNet image tower; transformers' CLIPVisionModel is a ViT: "
                                  "export --format local-dir")
            if (tower, key) in _REFUSED:
                raise NotMappable(f"{where}: {_REFUSED[(tower, key)]}")
            if (tower, key) == ("text", "pool_type"):
                raise NotMappable(f"{where}: text pooling other than at the end-of-text token (49407); "
                                  "CLIPTextModel pools there")
            if key in ("image_size", "patch_size") and isinstance(value, (list, tuple)) and len(set(value)) > 1:
                raise NotMappable(f"{where}: a non-square {key.replace('_', ' ')}; CLIPVisionModel takes one size")
            if key in ("image_size", "patch_size", "layers", "width", "head_width", "mlp_ratio", "heads",
                       "context_length", "vocab_size", "pos_embed_type"):
                if key == "vocab_size" and value != 49408:
                    raise NotMappable(f"{where}: a vocabulary other than open_clip's CLIP BPE (49408 tokens); "
                                      "the model's own tokenizer files would be needed")
                continue
            raise NotMappable(f"{where}: a setting transformers' CLIP has no place for; export --format local-dir")


def _square(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _eps(cfg: dict[str, Any]) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))


def transformers_config(model_cfg: dict[str, Any], logit_scale: float = 2.6592) -> Any:
    """transformers' ``CLIPConfig`` for an open_clip model config (checked by :func:`check_mappable`)."""
    from transformers import CLIPConfig

    check_mappable(model_cfg)
    defaults = _defaults()
    vision = {**defaults["vision"], **model_cfg["vision_cfg"]}
    text = {**defaults["text"], **model_cfg["text_cfg"]}
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    embed_dim = int(model_cfg["embed_dim"])
    width_v, width_t = int(vision["width"]), int(text["width"])
    if width_v % int(vision["head_width"]):
        raise NotMappable(f"vision_cfg.width={width_v} is not a multiple of head_width={vision['head_width']}")
    text_config = dict(
        vocab_size=int(text["vocab_size"]), hidden_size=width_t, intermediate_size=int(width_t * text["mlp_ratio"]),
        num_hidden_layers=int(text["layers"]), num_attention_heads=int(text["heads"]),
        max_position_embeddings=int(text["context_length"]), hidden_act=act, layer_norm_eps=_eps(text),
        projection_dim=embed_dim, bos_token_id=SOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID,  # the tokenizer's pad
    )
    vision_config = dict(
        hidden_size=width_v, intermediate_size=int(width_v * vision["mlp_ratio"]), num_hidden_layers=int(vision["layers"]),
        num_attention_heads=width_v // int(vision["head_width"]), image_size=_square(vision["image_size"]),
        patch_size=_square(vision["patch_size"]), num_channels=3, hidden_act=act, layer_norm_eps=_eps(vision),
        projection_dim=embed_dim,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
                      logit_scale_init_value=float(logit_scale))


def _text_prefix(state: dict[str, torch.Tensor]) -> str:
    """open_clip's CLIP keeps the text tower at the top level, CustomTextCLIP under ``text.``."""
    return "text." if "text.token_embedding.weight" in state else ""


def _blocks(src: str, dst: str, layers: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for name in ("weight", "bias"):
            q, k, v = state[f"{s}.attn.in_proj_{name}"].chunk(3, dim=0)  # packed rows: q, k, v
            out.update({f"{d}.self_attn.q_proj.{name}": q, f"{d}.self_attn.k_proj.{name}": k,
                        f"{d}.self_attn.v_proj.{name}": v,
                        f"{d}.self_attn.out_proj.{name}": state[f"{s}.attn.out_proj.{name}"],
                        f"{d}.layer_norm1.{name}": state[f"{s}.ln_1.{name}"],
                        f"{d}.layer_norm2.{name}": state[f"{s}.ln_2.{name}"],
                        f"{d}.mlp.fc1.{name}": state[f"{s}.mlp.c_fc.{name}"],
                        f"{d}.mlp.fc2.{name}": state[f"{s}.mlp.c_proj.{name}"]})
    return out


def _norm(dst: str, src: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{dst}.{n}": state[f"{src}.{n}"] for n in ("weight", "bias")}


def to_transformers(model_cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    """(``CLIPConfig``, state dict with transformers' ``CLIPModel`` names) for open_clip weights.

    Every open_clip tensor must be used: one left over is a part transformers has no place
    for, and is refused by name rather than dropped."""
    check_mappable(model_cfg, state)
    config = transformers_config(model_cfg, float(state["logit_scale"]))
    t = _text_prefix(state)
    v_layers, t_layers = config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        **_norm("vision_model.pre_layrnorm", "visual.ln_pre", state),
        **_blocks("visual.transformer.resblocks", "vision_model.encoder.layers", v_layers, state),
        **_norm("vision_model.post_layernorm", "visual.ln_post", state),
        "visual_projection.weight": state["visual.proj"].T,  # x @ proj == Linear(x) with weight proj.T
        "text_model.embeddings.token_embedding.weight": state[f"{t}token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state[f"{t}positional_embedding"],
        **_blocks(f"{t}transformer.resblocks", "text_model.encoder.layers", t_layers, state),
        **_norm("text_model.final_layer_norm", f"{t}ln_final", state),
        "text_projection.weight": state[f"{t}text_projection"].T,
    }
    used = {f"{p}.attn.in_proj_{n}" for p in _prefixes(state) for n in ("weight", "bias")}
    used |= {f"{p}.{part}.{n}" for p in _prefixes(state) for part in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc",
                                                                        "mlp.c_proj") for n in ("weight", "bias")}
    used |= {"logit_scale", "visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding", "visual.proj",
             f"{t}token_embedding.weight", f"{t}positional_embedding", f"{t}text_projection"}
    used |= {f"{p}.{n}" for p in ("visual.ln_pre", "visual.ln_post", f"{t}ln_final") for n in ("weight", "bias")}
    left = sorted(set(state) - used)
    if left:
        raise NotMappable(f"open_clip weights with no place in transformers' CLIPModel: {', '.join(left[:4])}"
                          f"{' ...' if len(left) > 4 else ''}; export --format local-dir")
    return config, {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _prefixes(state: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".attn.in_proj_weight")[0] for k in state if k.endswith(".attn.in_proj_weight")}


def to_open_clip(config: Any, hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The inverse of :func:`to_transformers`: (open_clip model config, open_clip state dict)
    for a transformers ``CLIPConfig`` and ``CLIPModel`` state dict."""
    vc, tc = config.vision_config, config.text_config
    if vc.hidden_act != tc.hidden_act or vc.hidden_act not in ("gelu", "quick_gelu"):
        raise NotMappable(f"hidden_act {vc.hidden_act!r} / {tc.hidden_act!r}: open_clip's CLIP uses one of gelu, "
                          "quick_gelu for both towers")
    model_cfg: dict[str, Any] = {
        "embed_dim": config.projection_dim,
        "vision_cfg": {"image_size": vc.image_size, "layers": vc.num_hidden_layers, "width": vc.hidden_size,
                       "patch_size": vc.patch_size, "head_width": vc.hidden_size // vc.num_attention_heads,
                       "mlp_ratio": vc.intermediate_size / vc.hidden_size},
        "text_cfg": {"context_length": tc.max_position_embeddings, "vocab_size": tc.vocab_size, "width": tc.hidden_size,
                     "heads": tc.num_attention_heads, "layers": tc.num_hidden_layers,
                     "mlp_ratio": tc.intermediate_size / tc.hidden_size},
    }
    if vc.hidden_act == "quick_gelu":
        model_cfg["quick_gelu"] = True
    for key, sub in (("vision_cfg", vc), ("text_cfg", tc)):
        if sub.layer_norm_eps != 1e-5:
            model_cfg[key]["norm_kwargs"] = {"eps": sub.layer_norm_eps}
    s = hf_state
    state = {
        "logit_scale": s["logit_scale"],
        "visual.class_embedding": s["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": s["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": s["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": s["visual_projection.weight"].T,
        "token_embedding.weight": s["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": s["text_model.embeddings.position_embedding.weight"],
        "text_projection": s["text_projection.weight"].T,
    }
    for dst, src in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):
        state.update({f"{dst}.{n}": s[f"{src}.{n}"] for n in ("weight", "bias")})
    for dst, src, layers in (("visual.transformer.resblocks", "vision_model.encoder.layers", vc.num_hidden_layers),
                             ("transformer.resblocks", "text_model.encoder.layers", tc.num_hidden_layers)):
        for i in range(layers):
            d, p = f"{dst}.{i}", f"{src}.{i}"
            for n in ("weight", "bias"):
                state[f"{d}.attn.in_proj_{n}"] = torch.cat([s[f"{p}.self_attn.{x}_proj.{n}"] for x in "qkv"])
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    state[f"{d}.{a}.{n}"] = s[f"{p}.{b}.{n}"]
    return model_cfg, {k: v.contiguous() for k, v in state.items()}


# --- processor: tokenizer and image processor -------------------------------------------------

def bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token → id, merges in rank order) of open_clip's BPE (the gzip file in the open_clip
    package), its two special tokens under transformers' CLIP names."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": SOT_TOKEN, "<end_of_text>": EOT_TOKEN}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    if vocab.get(SOT_TOKEN) != SOT_ID or vocab.get(EOT_TOKEN) != EOT_ID:
        raise NotMappable("open_clip's BPE vocabulary does not end in <start_of_text>=49406, <end_of_text>=49407")
    return vocab, [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]


def clip_tokenizer(context_length: int) -> Any:
    """transformers' ``CLIPTokenizer`` over open_clip's BPE vocabulary, padding with id 0 and
    truncating to ``context_length`` as open_clip's tokenizer does."""
    from transformers import CLIPTokenizer

    vocab, merges = bpe_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=PAD_TOKEN, model_max_length=int(context_length))


def _write_vocab_files(folder: Path) -> None:
    """vocab.json and merges.txt: the files older transformers (the slow CLIPTokenizer) and
    diffusers' tokenizer folders read, beside tokenizer.json."""
    vocab, merges = bpe_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def image_processor(preprocess: dict[str, Any]) -> Any:
    """transformers' ``CLIPImageProcessor`` doing open_clip's validation preprocessing
    (``preprocess_cfg``: size, mean, std, interpolation, resize mode)."""
    from transformers import CLIPImageProcessor

    size = _square(preprocess.get("size", 224))
    mode, interpolation = preprocess.get("resize_mode", "shortest"), preprocess.get("interpolation", "bicubic")
    if preprocess.get("mode", "RGB") != "RGB":
        raise NotMappable(f"preprocess_cfg.mode={preprocess.get('mode')}: CLIPImageProcessor converts to RGB only")
    if interpolation not in _RESAMPLE:
        raise NotMappable(f"preprocess_cfg.interpolation={interpolation}: choose one of {', '.join(_RESAMPLE)}")
    if mode == "shortest":
        geometry = {"size": {"shortest_edge": size}, "do_center_crop": True, "crop_size": {"height": size, "width": size}}
    elif mode == "squash":
        geometry = {"size": {"height": size, "width": size}, "do_center_crop": False}
    else:
        raise NotMappable(f"preprocess_cfg.resize_mode={mode}: CLIPImageProcessor resizes the shortest edge and "
                          "crops, or squashes; padding the longest edge would need a custom processor")
    return CLIPImageProcessor(
        do_resize=True, resample=_RESAMPLE[interpolation], do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        image_std=list(preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))), do_convert_rgb=True, **geometry,
    )


def check_transformers(model_cfg: dict[str, Any], preprocess: dict[str, Any], state: dict[str, torch.Tensor],
                       fmt: str = "transformers") -> None:
    """Everything :func:`write_transformers` would refuse, checked without writing: the format,
    the architecture, every weight's place and (unless only the text tower goes out) the
    preprocessing."""
    if fmt not in TRANSFORMERS_FORMATS:
        raise NotMappable(f"--format {fmt}: choose one of {', '.join(TRANSFORMERS_FORMATS)}")
    to_transformers(model_cfg, state)
    if fmt != "transformers-text":
        image_processor(preprocess)


def write_transformers(folder: Path, model_cfg: dict[str, Any], preprocess: dict[str, Any],
                       state: dict[str, torch.Tensor], fmt: str = "transformers") -> None:
    """Write ``config.json``, ``model.safetensors`` and the processor files into ``folder``:
    ``transformers`` → ``CLIPModel`` + ``CLIPProcessor``; ``transformers-text`` →
    ``CLIPTextModelWithProjection`` (``CLIPTextModel`` loads it too) + tokenizer;
    ``transformers-vision`` → ``CLIPVisionModelWithProjection`` + image processor."""
    from safetensors.torch import save_file

    if fmt not in TRANSFORMERS_FORMATS:
        raise NotMappable(f"--format {fmt}: choose one of {', '.join(TRANSFORMERS_FORMATS)}")
    config, hf_state = to_transformers(model_cfg, state)
    # both made (and refused) before anything is written
    tokenizer = clip_tokenizer(config.text_config.max_position_embeddings) if fmt != "transformers-vision" else None
    images = image_processor(preprocess) if fmt != "transformers-text" else None
    if fmt == "transformers":
        tower_config = config
    else:
        tower = "text" if fmt == "transformers-text" else "vision"
        tower_config = getattr(config, f"{tower}_config")
        keep = (f"{tower}_model.", "text_projection." if tower == "text" else "visual_projection.")
        hf_state = {k: v for k, v in hf_state.items() if k.startswith(keep)}
    tower_config.architectures = [ARCHITECTURES[fmt]]
    tower_config.save_pretrained(str(folder))
    save_file(hf_state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None and images is not None:
        from transformers import CLIPProcessor

        CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))
        images.save_pretrained(str(folder))  # preprocessor_config.json too: what older loaders read
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    else:
        images.save_pretrained(str(folder))
    if tokenizer is not None:
        _write_vocab_files(folder)


__all__ = ["NotMappable", "TRANSFORMERS_FORMATS", "bpe_vocabulary", "check_mappable", "check_transformers",
           "clip_tokenizer", "image_processor", "to_open_clip", "to_transformers", "transformers_config", "write_transformers"]
