"""Build open_clip models; load pretrained weights with errors a user can act on."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import open_clip
import torch
from torch import nn

from clipft.config import ModelConfig, model_config_from_dict
from clipft.models import checkpoint_io
from clipft.models.errors import ModelError
from clipft.models.lora import is_adapted_state_dict, plain_state_dict
from clipft.models.minilm import INSTALL_HINT, MINILM_MODEL, register_minilm
from clipft.models.shipped import shipped_tags, shipped_weights
from clipft.models.text_cache import cache_locked_text_tower
from clipft.models.zero_checkpoint import consolidate, model_states_file

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)

# Prefixes a state dict may carry: DDP ("module."), a clipft/Lightning checkpoint ("model.").
_PREFIXES = ("module.", "model.")


@dataclass
class ModelBundle:
    model: nn.Module
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_val: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def _check_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name.replace("/", "-") not in known:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(
            f"model.name: unknown open_clip model '{name}'.{hint} "
            "(`python -c 'import clipft.models, open_clip; print(open_clip.list_models())'` lists them all)"
        )


def _is_tag(name: str, pretrained: str) -> bool:
    return pretrained.lower() in {t.lower() for t in open_clip.list_pretrained_tags_by_model(name)}


def build_model(cfg: ModelConfig, meta: bool = False) -> ModelBundle:
    """Create the open_clip model of ``cfg.name``; load ``cfg.pretrained`` (tag or file);
    apply tower locking and gradient checkpointing. ``meta``: the structure only, every
    tensor on the meta device (no memory used, nothing loaded), for counting parameters."""
    if cfg.name == MINILM_MODEL and not register_minilm():
        raise ModelError(f"model.name: {MINILM_MODEL} needs the all-MiniLM-L6-v2 package: {INSTALL_HINT}")
    _check_name(cfg.name)
    if meta:
        with torch.device("meta"):
            return build_model(dataclasses.replace(cfg, pretrained=None, cache_locked_text=False))
    pretrained = cfg.pretrained
    tag = None
    if pretrained:
        expanded = os.path.expanduser(pretrained)
        shipped = shipped_weights(cfg.name, pretrained)
        if shipped is not None:
            if not shipped.is_file():
                raise ModelError(f"model.pretrained: the package file of tag '{pretrained}' is missing: {shipped}")
            pretrained = str(shipped)
        elif os.path.isfile(expanded) or os.path.isdir(expanded):  # a file, or a DeepSpeed checkpoint folder
            pretrained = expanded
        elif _is_tag(cfg.name, pretrained):
            tag = pretrained
        else:
            looks_like_path = any(sep in pretrained for sep in ("/", "\\")) or Path(pretrained).suffix != ""
            tags = shipped_tags(cfg.name) + open_clip.list_pretrained_tags_by_model(cfg.name)
            if looks_like_path:
                raise ModelError(f"model.pretrained: file '{pretrained}' not found")
            raise ModelError(
                f"model.pretrained: '{pretrained}' is neither a file nor a pretrained tag of {cfg.name} "
                f"(tags: {', '.join(tags) if tags else 'none'})"
            )
    try:
        with _quiet_root_logger():  # open_clip warns "initialized randomly" before we load a file
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                cfg.name, pretrained=tag, cache_dir=cfg.cache_dir, device=torch.get_default_device(),
                # an HF text tower's own weights load only from a local folder (never the hub),
                # not when a whole-model file follows, and not on the meta device (nothing loads
                # there: transformers refuses from_pretrained under it)
                pretrained_text=_local_hf_text_tower(cfg.name) and not (tag or pretrained)
                and torch.get_default_device().type != "meta",
            )
    except (RuntimeError, OSError, ValueError) as err:
        if cfg.name.startswith("hf-hub:"):
            raise ModelError(
                f"model.name: could not fetch '{cfg.name}' from the Hugging Face hub ({str(err).splitlines()[0][:300]}). "
                "Without internet access, save the model once elsewhere as an open_clip folder and use "
                "model.name=local-dir:/path/to/folder"
            ) from err
        if tag is not None:
            raise ModelError(
                f"model.pretrained: could not download the weights of tag '{tag}' for {cfg.name} "
                f"({str(err).splitlines()[0][:300]}). Without internet access, download the weights once "
                "elsewhere (for example open_clip.create_model(name, pretrained=tag) and "
                "torch.save(model.state_dict(), 'weights.pt')) and set model.pretrained=/path/to/weights.pt"
            ) from err
        raise
    if tag is None and pretrained:
        load_pretrained_file(model, pretrained)
    if cfg.lock_image:
        model.lock_image_tower(
            unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=cfg.lock_image_freeze_bn_stats
        )
    if cfg.lock_text:
        model.lock_text_tower(
            unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=cfg.lock_text_freeze_layer_norm
        )
        if cfg.lock_text_unlocked_layers == 0:  # dropout off in the frozen tower, always
            keep_in_eval(model.text.transformer if hasattr(model, "text") else model.transformer)
            if cfg.cache_locked_text and hasattr(getattr(model, "text", None), "pooler"):
                cache_locked_text_tower(model.text)
    if cfg.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.logit_scale))
    if cfg.lock_logit_scale:
        model.logit_scale.requires_grad_(False)
    if cfg.logit_bias is not None:
        if getattr(model, "logit_bias", None) is None:
            model.logit_bias = nn.Parameter(torch.zeros_like(model.logit_scale.detach()))
        with torch.no_grad():
            model.logit_bias.fill_(cfg.logit_bias)
    if cfg.lora.rank > 0:
        from clipft.models.lora import add_lora

        lora = cfg.lora
        try:
            add_lora(model, lora.rank, lora.alpha, lora.dropout, lora.towers, list(lora.targets))
        except ValueError as err:
            raise ModelError(str(err)) from err
        if cfg.lora_train_logit_scale and not cfg.lock_logit_scale:
            model.logit_scale.requires_grad_(True)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(cfg.name, cache_dir=cfg.cache_dir)
    return ModelBundle(model, preprocess_train, preprocess_val, tokenizer)


def _local_hf_text_tower(name: str) -> bool:
    config = open_clip.get_model_config(name) or {}
    hf_name = config.get("text_cfg", {}).get("hf_model_name")
    return bool(hf_name) and Path(hf_name).is_dir()


class _TrainKeepingEval:
    """A frozen module's ``train``: always eval. A plain object (not a bound method), so the
    module still pickles (``ddp_spawn``) and deep-copies."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def compile_towers(model: nn.Module) -> list[str]:
    """``torch.compile`` the towers of an open_clip model in place (``nn.Module.compile``: the
    module and its state dict keys stay as they are, so checkpoints and export are unchanged).
    Returns the names of the compiled submodules."""
    names = [n for n in ("visual", "transformer", "text") if isinstance(getattr(model, n, None), nn.Module)]
    for name in names:
        getattr(model, name).compile()
    return names


def keep_in_eval(module: nn.Module) -> None:
    """Keep a frozen module in eval mode (dropout off) whatever ``train()`` is called on: its
    own ``train`` is replaced, so a parent's recursive ``train()`` cannot switch it back."""
    module.train = _TrainKeepingEval(module)  # type: ignore[method-assign]
    module.eval()


EMA_KEY = "ema_state_dict"  # a clipft checkpoint's EMA weights (method.ema_momentum)


def read_training_state(path: str | Path) -> dict[str, Any]:
    """The Lightning side of a clipft checkpoint (global step, loop states, hyper-parameters,
    what methods store such as the EMA weights): the .ckpt file's dict, or for a DeepSpeed
    checkpoint folder rank 0's model-states file (ZeRO-1/2: ``mp_rank_00_model_states.pt``,
    ZeRO-3: ``zero_pp_rank_0_mp_rank_00_model_states.pt``)."""
    path = Path(path)
    state = checkpoint_io.load(model_states_file(path) if path.is_dir() else path, mmap=True)
    if not isinstance(state, dict):
        raise ModelError(f"'{path}' is not a clipft checkpoint")
    return state


def read_module_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a clipft checkpoint (.ckpt file or DeepSpeed folder, gathered from the
    ranks' shards) under the method's own names: ``model.*`` and what else the method trains."""
    path = str(path)
    state = consolidate(path) if os.path.isdir(path) else checkpoint_io.load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"'{path}' is not a clipft checkpoint")
    return state


def read_state_dict(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Read model weights from a file in any of the usual layouts: a plain state dict
    (.pt/.bin/.pth), safetensors, a dict with ``state_dict`` (open_clip training checkpoint,
    clipft/Lightning checkpoint), a DeepSpeed checkpoint folder and an OpenAI TorchScript
    archive. A ``module.`` (DDP) or ``model.`` (clipft) prefix is removed; a clipft checkpoint's
    other modules (teachers) are dropped, and LoRA adapters are merged into the weights they
    adapt (open_clip's own names and layout come out). ``ema=True``: the EMA weights of a
    clipft checkpoint instead of the live ones."""
    path = str(path)
    hparams: Any = None
    if ema:
        training = read_training_state(path)
        state, hparams = training.get(EMA_KEY), training.get("hyper_parameters")
        if state is None:
            raise ModelError(f"'{path}' holds no EMA weights (its run did not set method.ema_momentum)")
        state = dict(state)
    elif os.path.isdir(path):
        state = consolidate(path)
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:  # OpenAI's released .pt files are TorchScript archives: checkpoint_io reads them when trusted
        state = checkpoint_io.load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        hparams = state.get("hyper_parameters")
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"'{path}' does not hold a state dict of tensors")
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            if prefix == "model.":  # clipft checkpoint: keep only the trained model's weights
                state = {k: v for k, v in state.items() if k.startswith(prefix)}
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # TorchScript extras
        state.pop(key, None)
    if hparams is None and os.path.isdir(path):
        hparams = read_training_state(path).get("hyper_parameters")
    run_config = (hparams or {}).get("config") if isinstance(hparams, dict) else None
    if not ema and isinstance(run_config, dict) and run_config.get("trainer", {}).get("exclude_frozen_parameters"):
        # a DeepSpeed checkpoint without its frozen weights: they are the run's start

        state = {**build_model(model_config_from_dict(run_config)).model.state_dict(), **state}
    if is_adapted_state_dict(state):
        state = plain_state_dict(state, _lora_scaling(path, hparams))
    return state


def _lora_scaling(path: str, hparams: Any) -> float:
    """α/r of the LoRA adapters in a clipft checkpoint, from the run config stored in it."""
    try:
        lora = hparams["config"]["model"]["lora"]
        return float(lora["alpha"]) / int(lora["rank"])
    except (TypeError, KeyError, ZeroDivisionError) as err:
        raise ModelError(f"'{path}' has LoRA adapters but no clipft run config saying their rank and alpha") from err


def _fmt(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Prefix the errors of reading a file with the setting that named it (``--ckpt``,
    ``run.resume``, ``model.pretrained``), keeping their type."""
    try:
        yield
    except ModelError as err:
        if str(err).startswith(f"{label}:"):
            raise
        raise type(err)(f"{label}: {err}") from err


def load_pretrained_file(model: nn.Module, path: str | Path, label: str = "model.pretrained") -> None:
    """Load weights from a local file into ``model``. If the file does not fit the
    architecture, fail with the missing, unexpected and wrongly shaped keys; messages start
    with ``label``, the setting that named the file."""
    with labelled(label):
        state = read_state_dict(path)
    own = model.state_dict()
    # Same conventions as open_clip's loader: scalar-vs-1d logit scale, and position
    # embeddings interpolated to the model's image size / context length.
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own and state[key].ndim != own[key].ndim:
            state[key] = state[key].reshape(own[key].shape)
    if "logit_bias" in own and "logit_bias" not in state and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(own["logit_bias"])
    for resize in (open_clip.model.resize_pos_embed, open_clip.model.resize_text_pos_embed):
        try:
            resize(state, model)
        except (AssertionError, RuntimeError, KeyError):  # a different width: reported below
            pass
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    )
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all()))
    if nonfinite:
        raise ModelError(
            f"{label}: '{path}' holds NaN or inf in {len(nonfinite)} weight tensors (first: {nonfinite[0]}); "
            "the run that wrote it diverged: use an earlier checkpoint"
        )
    if missing or unexpected or mismatched:
        parts = [f"{label}: '{path}' does not fit the architecture of this model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if mismatched:
            parts.append(f"wrong shapes ({len(mismatched)}): {_fmt(mismatched)}")
        parts.append("check model.name: it must be the architecture the weights were trained with")
        raise ModelError("\n  ".join(parts))
    model.load_state_dict(state, strict=True)


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """Total and trainable parameter counts, for the whole model and per tower."""
    groups: dict[str, list[nn.Parameter]] = {"total": list(model.parameters())}
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module):
        groups["image"] = list(visual.parameters())
        seen = {id(p) for p in groups["image"]}
        groups["text"] = [
            p for n, p in model.named_parameters() if id(p) not in seen and n not in ("logit_scale", "logit_bias")
        ]
    return {
        name: {"total": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad)}
        for name, ps in groups.items()
    }
