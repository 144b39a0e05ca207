"""``ContrastiveMethod``: what every adaptation method shares.

A method subclasses :class:`ContrastiveMethod`, registers itself with
:func:`register_method`, and overrides up to three hooks:

* :meth:`~ContrastiveMethod.encode_batch` — the trained model's features of a batch, one row
  per pair (default: unit image and text embeddings);
* :meth:`~ContrastiveMethod.frozen_features` — rows computed without gradients, such as a
  teacher's embeddings (default: none);
* :meth:`~ContrastiveMethod.loss_terms` — named loss terms from those features (default: the
  CLIP loss, or SigLIP's for a model with a logit bias).

The base does the rest once: encoding in micro-batches (``trainer.micro_batch_size``),
gathering features across devices with gradients, the weighted sum of the terms (each
logged as ``train/<term>``), AdamW parameter groups without weight decay on biases, norms,
the logit scale and embeddings and with per-parameter learning-rate multipliers
(``optim.layer_decay``, ``optim.lr_multipliers``; docs/finetuning.md), linear warm-up + cosine schedule, the logit-scale clamp
after each optimizer step (as open_clip's training loop), frozen teachers and an EMA of the
model (``method.ema_momentum``) that work under DDP and DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clipft.config import ConfigError, MethodConfig, RunConfig, from_dict, register_method_config, to_dict
from clipft.data.batch import Batch
from clipft.losses.contrastive import clip_contrastive_loss, siglip_loss
from clipft.models import EMA_KEY, ModelBundle, build_model, keep_in_eval
from clipft.models.layers import layer_decay_multipliers, tower_block_counts
from clipft.models.lora import adapters_disabled, has_lora

METHODS: dict[str, type["ContrastiveMethod"]] = {}


def register_method(name: str, config_class: type[MethodConfig] = MethodConfig) -> Callable[[type], type]:
    """Class decorator: make a method available as ``method.name: <name>`` in recipes."""

    def wrap(cls: type) -> type:
        METHODS[name] = cls
        register_method_config(name)(config_class)
        return cls

    return wrap


def method_class(name: str) -> type["ContrastiveMethod"]:
    if name not in METHODS:
        raise ValueError(f"method.name: unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm)
# open_clip's own towers, and timm/HF towers (pos_embed, cls_token, reg_token, attn_pool latent).
_EMBEDDING_NAMES = (
    "positional_embedding", "class_embedding", "token_embedding", "logit_scale", "logit_bias",
    "pos_embed", "cls_token", "reg_token", "latent", "position_embedding", "relative_position_bias_table",
    "learned_tokens",
)


def no_weight_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """True for parameters that weight decay should not shrink: biases and other 1-d
    parameters, normalisation layers, embeddings (token, position, class) and the logit
    scale/bias. ``module`` is the module that owns ``param`` directly."""
    leaf = name.rsplit(".", 1)[-1]
    return (
        param.ndim < 2
        or isinstance(module, (_NORM_TYPES + (nn.Embedding,)))
        or leaf.startswith("bias")
        or any(key in name for key in _EMBEDDING_NAMES)
    )


def _has_master_weight(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")  # DeepSpeed ZeRO-3 / ZeRO-1,2, bf16


def master_weight(param: nn.Parameter) -> Tensor:
    """The full fp32 value of a trainable parameter: under DeepSpeed, the optimizer's master
    copy gathered from the ranks' shards (a collective: every rank must call); otherwise the
    parameter itself."""
    if _has_master_weight(param):
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)
        if full is not None:
            return full
    return param.detach()


@torch.no_grad()
def clamp_parameter(param: nn.Parameter, low: float, high: float) -> None:
    """Clamp a parameter in place, and under DeepSpeed its fp32 master copy too (else the
    next optimizer step would copy the unclamped master back). Every rank must call."""
    param.data.clamp_(low, high)
    if not param.requires_grad or not _has_master_weight(param):
        return
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

    if hasattr(param, "ds_id"):  # ZeRO-3: element-wise, so each rank clamps its own shard
        param.ds_tensor.data.clamp_(low, high)
        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(low, high))
    else:
        full = master_weight(param)
        if full.min() < low or full.max() > high:
            safe_set_full_fp32_param(param, full.clamp(low, high))


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float, schedule: str) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine
    decay to ``min_ratio`` at ``total`` steps (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class BaseModelView:
    """The base model under LoRA adapters, used as a frozen teacher without a second copy:
    every call runs with the adapters switched off and in eval mode. Exact while the base
    weights stay frozen (pure LoRA), which is when :meth:`ContrastiveMethod.frozen_copy`
    makes one."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Tensor:
        training = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model):
                return getattr(self.model, method)(*args, **kwargs)
        finally:
            self.model.train(training)

    def encode_image(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._call("encode_image", *args, **kwargs)

    def encode_text(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._call("encode_text", *args, **kwargs)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.detach()

    def state_dict(self) -> dict[str, Tensor]:
        """The base weights (adapters left out)."""
        return {k: v for k, v in self.model.state_dict().items() if ".lora_" not in k}


class ContrastiveMethod(L.LightningModule):
    """Base LightningModule of every method; as a method itself it is plain CLIP training."""

    # The names of the terms ``loss_terms`` returns (checked against method.loss_weights).
    loss_term_names: tuple[str, ...] = ("contrastive",)
    # What ``clipft info --methods`` says of the method: one line, and the paper it implements.
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # For a method whose model has parameters open_clip has no place for (MMRL's tokens, a
    # classifier's head): ``clipft export`` calls export_writer(folder, checkpoint) to save them
    # beside the open_clip files (with --wise-ft, export_writer(folder, checkpoint, alpha)), and
    # ``clipft.load_exported`` export_loader(folder, open_clip model) to attach them.
    export_writer: ClassVar[Optional[Callable[[Path, Path], None]]] = None
    export_loader: ClassVar[Optional[Callable[[Path, nn.Module], nn.Module]]] = None

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__()
        # A plain dict, so checkpoints load under torch.load(weights_only=True).
        self.save_hyperparameters({"config": config})
        self.cfg: RunConfig = from_dict(config)
        unknown = set(self.cfg.method.loss_weights) - set(self.loss_term_names)
        if unknown:
            raise ConfigError(
                f"method.loss_weights names terms that method '{self.cfg.method.name}' does not compute: "
                f"{sorted(unknown)} (its terms: {', '.join(self.loss_term_names)})"
            )
        bundle = bundle if bundle is not None else build_model(self.cfg.model)
        self.model = bundle.model
        if self.cfg.trainer.exclude_frozen_parameters:
            if self.cfg.model.pretrained is None:
                raise ConfigError(
                    "trainer.exclude_frozen_parameters: checkpoints would lack the frozen weights, which only "
                    "model.pretrained can restore; it is null (random init)"
                )
            self.strict_loading = False  # frozen weights come from model.pretrained, not the checkpoint
        self.tokenizer = bundle.tokenizer
        self._frozen_modules: dict[str, nn.Module] = {}
        self._frozen_views: dict[str, BaseModelView] = {}
        self._optimizer_stepped = False
        self._checked_gradients = False
        self.step_terms: dict[str, Tensor] = {}  # the latest training step's loss terms, detached
        # The EMA of the model: fp32, frozen, outside the module tree (in a dict, which
        # nn.Module does not register) like a teacher, so that no strategy shards or casts it.
        self._ema: dict[str, nn.Module] = {}
        if self.cfg.method.ema_momentum is not None:
            shadow = copy.deepcopy(self.model).float().requires_grad_(False)
            keep_in_eval(shadow)
            self._ema["model"] = shadow

    def load_method_state(self, checkpoint: Path) -> None:
        """``clipft validate --ckpt``: the method's own weights beyond the open_clip model (a
        classifier's head) from a clipft checkpoint; the model's are loaded already. None here."""

    # ------------------------------------------------------------------ frozen copies

    def frozen_copy(self, name: str, module: nn.Module) -> Any:
        """A frozen snapshot of ``module`` (a teacher), kept as ``self.frozen_modules[name]``:
        a deep copy without gradients, in eval mode whatever ``train()`` is called on, in no
        parameter group and no state dict (it is not a submodule), and moved with the
        method (device, dtype).

        For a model with LoRA adapters whose other weights are all frozen, the snapshot is no
        copy but :class:`BaseModelView`: the same model with its adapters switched off, which
        is exactly the starting model for the whole run."""
        if module is self.model and has_lora(module) and not any(
            p.requires_grad for n, p in module.named_parameters() if ".lora_" not in n
        ):
            view = BaseModelView(module)
            self._frozen_views[name] = view
            return view
        snapshot = copy.deepcopy(module)
        snapshot.requires_grad_(False)
        keep_in_eval(snapshot)
        self._frozen_modules[name] = snapshot
        return snapshot

    @property
    def frozen_modules(self) -> dict[str, Any]:
        return {**self._frozen_modules, **self._frozen_views}

    @property
    def ema(self) -> Optional[nn.Module]:
        """The EMA of the model (``method.ema_momentum``), or None."""
        return self._ema.get("model")

    def _place_frozen_modules(self) -> None:
        # Strategies that place parameters themselves (FSDP, DeepSpeed) bypass ``_apply``.
        for module in self._frozen_modules.values():
            module.to(self.device)
        if self.ema is not None:
            self.ema.to(self.device)  # device only: the shadow stays fp32

    def on_fit_start(self) -> None:
        self._place_frozen_modules()

    def on_validation_start(self) -> None:
        self._place_frozen_modules()

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "ContrastiveMethod":
        # .to(device) / .half() / .cuda() reach the frozen copies, which are not submodules.
        super()._apply(fn, *args, **kwargs)
        for module in getattr(self, "_frozen_modules", {}).values():
            module._apply(fn, *args, **kwargs)
        return self

    def log_pair_geometry(self, image_features: Tensor, text_features: Tensor) -> None:
        """Log the batch's modality gap (distance between the centroids of the unit image and
        text embeddings) and mean distance between paired embeddings, on the steps that log."""
        if self._trainer is None or not self.logs_this_step():
            return
        with torch.no_grad():
            image_unit, text_unit = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
            gap = (image_unit.mean(0) - text_unit.mean(0)).norm()
            pair_distance = (image_unit - text_unit).norm(dim=-1).mean()
        self.log("train/gap", gap, batch_size=len(image_features))
        self.log("train/pair_distance", pair_distance, batch_size=len(image_features))

    # ------------------------------------------------------------------ features

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        features = self.model.encode_image(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: Tensor, normalize: bool = True) -> Tensor:
        features = self.model.encode_text(texts)
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    def world_and_rank(self) -> tuple[int, int]:
        """(number of devices, this device's rank); (1, 0) outside a Trainer."""
        return (self.trainer.world_size, self.global_rank) if self._trainer is not None else (1, 0)

    def gather(self, features: Tensor) -> Tensor:
        """Features of all devices, concatenated in rank order, with gradients flowing back
        to each device's own slice (so the loss over gathered features is exact)."""
        if self._trainer is None or self._trainer.world_size == 1:
            return features
        if features.dtype == torch.bool:  # masks: no gradients, and gloo gathers no bool
            return self.gather(features.to(torch.uint8)).bool()
        gathered = self.all_gather(features, sync_grads=features.is_floating_point())
        return gathered.reshape(-1, *features.shape[1:])

    def contrastive_loss(
        self, image_features: Tensor, text_features: Tensor, across_devices: bool = True, scale: Optional[Tensor] = None,
        positives: Optional[Tensor] = None,
    ) -> Tensor:
        """The model's pre-training loss for the local rows against the batch of every device
        (or of this device only): SigLIP's sigmoid loss for a model with a logit bias (SigLIP
        models), else CLIP's; with the model's logit scale unless ``scale`` is given.
        ``positives`` (:meth:`caption_positives`): the right answers of each row (both losses)."""
        rank = self.world_and_rank()[1] if across_devices else 0
        gather = self.gather if across_devices else (lambda features: features)
        offset = rank * image_features.shape[0]
        scale = self.logit_scale if scale is None else scale
        if getattr(self.model, "logit_bias", None) is not None:
            return siglip_loss(image_features, text_features, scale, self.model.logit_bias, gather(text_features), offset,
                               positives=positives)
        return clip_contrastive_loss(image_features, text_features, scale, gather(image_features), gather(text_features), offset,
                                     positives=positives)

    def caption_positives(self, batch: Batch) -> Optional[Tensor]:
        """With data.same_caption_positives: ``[B, N]``, pair i's caption equals pair j's (the
        token ids, over every device's batch) — several images of one concept that share its
        caption (two art styles of one emoji) are all right answers, not negatives. None otherwise."""
        if not self.cfg.data.same_caption_positives:
            return None
        tokens = batch.texts
        return (tokens[:, None, :] == self.gather(tokens)[None, :, :]).all(dim=-1)

    # ------------------------------------------------------------------ the hooks

    def encode_batch(self, batch: Batch) -> dict[str, Tensor]:
        """Features of the trained model that the loss needs, with gradients: tensors whose
        rows follow the batch's pairs, and where row i depends on pair i only (so a batch can
        be encoded in micro-batches)."""
        return {"image": self.encode_image(batch.images), "text": self.encode_text(batch.texts)}

    def frozen_features(self, batch: Batch) -> dict[str, Tensor]:
        """Row-wise features computed without gradients (a teacher's embeddings); none here."""
        return {}

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Named loss terms of a training batch from its features (``encode_batch`` and
        ``frozen_features`` merged); the base weights and sums them."""
        return {"contrastive": self.contrastive_loss(features["image"], features["text"], positives=self.caption_positives(batch))}

    def term_weights(self) -> dict[str, float]:
        """The weight of each loss term (1.0 for a term not named): ``method.loss_weights``."""
        return self.cfg.method.loss_weights

    def classify(self, images: Tensor, class_features: Tensor, seen: bool) -> Tensor:
        """Scores ``[N, C]`` of images against unit class text features ``[C, D]``. ``seen``:
        the classes were trained on (a method with a branch learned on them, as MMRL, uses it
        only then); here the cosine similarity either way."""
        return self.encode_image(images) @ class_features.T

    def batch_features(self, batch: Batch) -> dict[str, Tensor]:
        """``encode_batch`` and ``frozen_features`` of the whole batch.

        With ``trainer.micro_batch_size`` = m, the batch is encoded m pairs at a time, each
        micro-batch under activation checkpointing: its activations are dropped after the
        forward and recomputed during the backward, one micro-batch at a time. The loss then
        sees every feature of the batch, so its value and gradients are those of the whole
        batch at once (all its negatives), with the activation memory of m pairs. This is
        what open_clip's ``accum_freq`` computes (cached features, one micro-batch re-encoded
        with gradients at a time), as one backward pass: the parameters the loss uses
        directly (logit scale, bias) get their gradient once, not once per micro-batch.
        """
        size = self.cfg.trainer.micro_batch_size
        chunks = [batch] if size is None or size >= len(batch) else batch.chunks(size)
        parts = []
        for chunk in chunks:
            live = self.encode_batch(chunk) if len(chunks) == 1 else checkpoint(
                self.encode_batch, chunk, use_reentrant=False
            )
            with torch.no_grad():
                frozen = self.frozen_features(chunk)
            if set(live) & set(frozen):
                raise ValueError(f"encode_batch and frozen_features both return {sorted(set(live) & set(frozen))}")
            parts.append({**live, **frozen})
        if len(parts) == 1:
            return parts[0]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        terms = self.loss_terms(self.batch_features(batch), batch)
        weights = self.term_weights()
        unknown = {name for name, weight in weights.items() if weight != 0} - set(terms)  # a 0 may be skipped
        if unknown:
            raise ValueError(
                f"method.loss_weights names terms this method does not compute: {sorted(unknown)} "
                f"(its terms: {sorted(terms)})"
            )
        total = sum(weights.get(name, 1.0) * value for name, value in terms.items())
        batch_size = len(batch)
        # by logged name, for the divergence guard to name a term that goes non-finite
        self.step_terms = {f"train/{name}": value.detach() for name, value in terms.items()}
        if self.logs_this_step():
            # averaged over the devices (each computes the loss of its own rows against every
            # device's batch): the logged loss is the global batch's, as one device would log it
            for name, value in self.step_terms.items():
                self.log(name, value, batch_size=batch_size, sync_dist=True)
            self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size, sync_dist=True)
            self.log("train/logit_scale", self.logit_scale.detach(), batch_size=batch_size)
        return total

    def logs_this_step(self) -> bool:
        """Whether the loggers receive this training step's values: every trainer.log_every_n_steps
        steps (Lightning writes only those), the last step of the run or epoch, and outside a
        Trainer. Each ``self.log`` costs ~0.3 ms of host time, which the other steps skip (the
        progress bar shows the last logged loss)."""
        if self._trainer is None:
            return True
        trainer = self.trainer
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None or connector.should_update_logs:
            return True
        last_step = 0 < trainer.max_steps <= trainer.global_step + 1  # max_steps -1: none
        return last_step or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Validation loss, and the features the retrieval callback reuses."""
        image_features = self.encode_image(batch.images)
        text_features = self.encode_text(batch.texts)
        loss = self.contrastive_loss(image_features, text_features, across_devices=False)
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch))
        return {"image_features": image_features.detach(), "text_features": text_features.detach()}

    def on_after_backward(self) -> None:
        # A trainable parameter that the loss never uses gets no gradient. DDP (which does
        # not look for unused parameters) then never averages the bucket it sits in, and the
        # step silently uses one device's gradients: fail at once instead. (DeepSpeed keeps
        # gradients in its own buffers: nothing to check there.)
        if self._checked_gradients or self._trainer is None:
            return
        self._checked_gradients = True
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            return
        unused = [n for n, p in self.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise RuntimeError(
                f"method {self.cfg.method.name}: trainable parameters that the loss does not use: "
                f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}. Freeze them (requires_grad=False): "
                "under DDP they would leave gradients unsynchronised"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._optimizer_stepped:  # accumulating, or a step skipped for overflow
            return
        self._optimizer_stepped = False
        # open_clip clamps the learned temperature after every step: s = exp(t) <= max.
        clamp_parameter(self.model.logit_scale, 0.0, math.log(self.cfg.optim.logit_scale_max))
        if self.ema is not None:
            self.update_ema()

    # ------------------------------------------------------------------ EMA

    def _mark_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # A step without gradients changed nothing (the divergence guard dropped its update):
        # no clamp, no EMA tick. The first parameter with a gradient ends the search.
        self._optimizer_stepped = any(p.grad is not None for group in optimizer.param_groups for p in group["params"])

    @torch.no_grad()
    def update_ema(self) -> None:
        """θ_ema ← m·θ_ema + (1 − m)·θ for every trainable parameter, in fp32; buffers are
        copied (frozen parameters never change, so their shadow is their value).

        θ is the optimizer's fp32 master weight: under DeepSpeed it is gathered from the
        ranks' shards (every rank takes part, ZeRO-3 included), so every rank keeps the same
        full shadow, not a bf16-rounded one."""
        assert self.ema is not None
        momentum = self.cfg.method.ema_momentum
        shadow = dict(self.ema.named_parameters())
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                target = shadow[name]
                target.mul_(momentum).add_(master_weight(param).to(target), alpha=1.0 - momentum)
        for (_, target), (_, buffer) in zip(self.ema.named_buffers(), self.model.named_buffers()):
            target.copy_(buffer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint[EMA_KEY] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and EMA_KEY in checkpoint:
            self.ema.load_state_dict(checkpoint[EMA_KEY])

    # ------------------------------------------------------------------ optimizer

    def lr_multipliers(self) -> dict[int, float]:
        """The learning-rate multiplier of each trainable parameter (by ``id``): the layer-wise
        decay γ^(N+1−depth) of ``optim.layer_decay`` (:mod:`clipft.models.layers`) times the
        multiplier of the first ``optim.lr_multipliers`` pattern that the parameter's name
        matches (``re.search`` in the open_clip name, ``visual.conv1.weight``; a method's own
        parameters by their name in the method). A pattern that matches no trainable parameter
        is a mistake (a typo, a frozen tower): :class:`ConfigError` naming it."""
        optim = self.cfg.optim
        decay: dict[str, float] = {}
        if optim.layer_decay is not None:
            model_names = [name for name, _ in self.model.named_parameters()]
            if not any(tower_block_counts(model_names).values()):
                raise ConfigError(
                    f"optim.layer_decay={optim.layer_decay}: found no blocks (resblocks.<i>, blocks.<i>, layers.<i>) "
                    f"in model {self.cfg.model.name}; set optim.layer_decay=null or use optim.lr_multipliers"
                )
            decay = layer_decay_multipliers(model_names, optim.layer_decay)
        patterns = [(str(pattern), re.compile(str(pattern)), float(value)) for pattern, value in optim.lr_multipliers.items()]
        matched: set[str] = set()
        multipliers: dict[int, float] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            short = name[len("model."):] if name.startswith("model.") else name
            multiplier = decay.get(short, 1.0)
            for pattern, regex, value in patterns:
                if regex.search(short):
                    multiplier *= value
                    matched.add(pattern)
                    break
            multipliers[id(param)] = multiplier
        unmatched = [pattern for pattern, _, _ in patterns if pattern not in matched]
        if unmatched:
            example = next((n for n, p in self.model.named_parameters() if p.requires_grad), "none")
            raise ConfigError(
                f"optim.lr_multipliers: pattern {unmatched[0]!r} matches no trainable parameter of model "
                f"{self.cfg.model.name} (patterns are searched in open_clip names such as {example!r}; "
                "frozen towers are not trained); fix or remove it"
            )
        return multipliers

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: one per (lr multiplier, weight decay or not) pair, each with
        ``lr_scale`` (its multiplier of ``optim.lr``, see :meth:`lr_multipliers`) and a ``name``
        that the lr log keys use (``lr-AdamW/<name>``): ``decay`` and ``no_decay`` without lr
        multipliers, else ``decay_x<multiplier>`` and ``no_decay_x<multiplier>``, the largest
        multiplier first."""
        optim = self.cfg.optim
        multipliers = self.lr_multipliers()
        scaled = optim.layer_decay is not None or bool(optim.lr_multipliers)
        found: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for module_name, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                decayed = not no_weight_decay(module, full, param)
                found.setdefault((multipliers[id(param)], decayed), []).append(param)
        groups, names = [], set()
        for multiplier, decayed in sorted(found, key=lambda key: (-key[0], not key[1])):
            name = "decay" if decayed else "no_decay"
            if scaled:
                name = f"{name}_x{multiplier:.4g}"
            while name in names:  # two multipliers that print alike
                name += "'"
            names.add(name)
            groups.append({"params": found[(multiplier, decayed)], "weight_decay": optim.weight_decay if decayed else 0.0,
                           "lr_scale": multiplier, "name": name})
        return groups

    def configure_optimizers(self) -> Any:
        optim = self.cfg.optim
        groups = self.parameter_groups()
        if not any(g["params"] for g in groups):
            raise ValueError("no trainable parameters: check model.lock_image / model.lock_text")
        for group in groups:  # each group's own base lr, which the schedule below scales
            group["lr"] = optim.lr * group.get("lr_scale", 1.0)
        optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=optim.fused or None
        )
        # Runs only when the optimizer really steps: not while Lightning or DeepSpeed
        # accumulates, nor when AMP / DeepSpeed skip a step whose gradients overflowed.
        optimizer.register_step_post_hook(self._mark_optimizer_step)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_fraction * total)
        min_ratio = optim.min_lr / optim.lr if optim.lr > 0 else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warmup, min_ratio, optim.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_method(cfg: RunConfig, bundle: Optional[ModelBundle] = None) -> ContrastiveMethod:
    """The LightningModule of ``cfg.method.name``."""
    return method_class(cfg.method.name)(to_dict(cfg), bundle)
