"""``ContrastiveMethod``: what every adaptation method shares.

A method subclasses :class:`ContrastiveMethod`, registers itself with
:func:`register_method`, and overrides one hook, :meth:`ContrastiveMethod.loss_terms`, that
returns named loss terms for a batch. The base does the rest once: encoding, gathering
features across devices with gradients, the weighted sum of the terms (each logged as
``train/<term>``), AdamW parameter groups without weight decay on biases, norms, the logit
scale and embeddings, linear warm-up + cosine schedule, and the logit-scale clamp after
each optimizer step (as open_clip's training loop).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipft.config import ConfigError, MethodConfig, RunConfig, from_dict, register_method_config, to_dict
from clipft.data.datamodule import Batch
from clipft.losses.contrastive import clip_contrastive_loss, siglip_loss
from clipft.models import ModelBundle, build_model, keep_in_eval

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


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float, schedule: str) -> float:
    """LR multiplier: linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine
    decay to ``min_ratio`` at ``total`` steps (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ContrastiveMethod(L.LightningModule):
    """Base LightningModule of every method; as a method itself it is plain CLIP training."""

    # The names of the terms ``loss_terms`` returns (checked against method.loss_weights).
    loss_term_names: tuple[str, ...] = ("contrastive",)

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
        self.tokenizer = bundle.tokenizer
        self._frozen_modules: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ frozen copies

    def frozen_copy(self, name: str, module: nn.Module) -> nn.Module:
        """A frozen snapshot of ``module`` (a teacher), kept as ``self.frozen_modules[name]``:
        a deep copy without gradients, in eval mode whatever ``train()`` is called on, in no
        parameter group and no state dict (it is not a submodule), and moved with the
        method (device, dtype)."""
        snapshot = copy.deepcopy(module)
        snapshot.requires_grad_(False)
        keep_in_eval(snapshot)
        self._frozen_modules[name] = snapshot
        return snapshot

    @property
    def frozen_modules(self) -> dict[str, nn.Module]:
        return self._frozen_modules

    def _place_frozen_modules(self) -> None:
        # Strategies that place parameters themselves (FSDP) bypass ``_apply``.
        for module in self._frozen_modules.values():
            module.to(self.device)

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
        text embeddings) and mean distance between paired embeddings."""
        if self._trainer is None:
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

    def gather(self, features: Tensor) -> Tensor:
        """Features of all devices, concatenated in rank order, with gradients flowing back
        to each device's own slice (so the loss over gathered features is exact)."""
        if self._trainer is None or self._trainer.world_size == 1:
            return features
        gathered = self.all_gather(features, sync_grads=True)
        return gathered.reshape(-1, *features.shape[1:])

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor, across_devices: bool = True) -> Tensor:
        """The model's pre-training loss for the local rows against the batch of every device
        (or of this device only): SigLIP's sigmoid loss for a model with a logit bias (SigLIP
        models), else CLIP's."""
        rank = self.global_rank if self._trainer is not None and across_devices else 0
        gather = self.gather if across_devices else (lambda features: features)
        offset = rank * image_features.shape[0]
        if getattr(self.model, "logit_bias", None) is not None:
            return siglip_loss(
                image_features, text_features, self.logit_scale, self.model.logit_bias, gather(text_features), offset
            )
        return clip_contrastive_loss(
            image_features, text_features, self.logit_scale, gather(image_features), gather(text_features), offset
        )

    # ------------------------------------------------------------------ the hook

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """Named loss terms of a training batch; the base weights and sums them."""
        image_features = self.encode_image(batch.images)
        text_features = self.encode_text(batch.texts)
        return {"contrastive": self.contrastive_loss(image_features, text_features)}

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        terms = self.loss_terms(batch)
        weights = self.cfg.method.loss_weights
        unknown = set(weights) - set(terms)
        if unknown:
            raise ValueError(
                f"method.loss_weights names terms this method does not compute: {sorted(unknown)} "
                f"(its terms: {sorted(terms)})"
            )
        total = sum(weights.get(name, 1.0) * value for name, value in terms.items())
        batch_size = len(batch)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/logit_scale", self.logit_scale.detach(), batch_size=batch_size)
        return total

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Validation loss, and the features the retrieval callback reuses."""
        image_features = self.encode_image(batch.images)
        text_features = self.encode_text(batch.texts)
        loss = self.contrastive_loss(image_features, text_features, across_devices=False)
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch))
        return {"image_features": image_features.detach(), "text_features": text_features.detach()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # open_clip clamps the learned temperature after every step: s = exp(t) <= max.
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.cfg.optim.logit_scale_max))

    # ------------------------------------------------------------------ optimizer

    def parameter_groups(self) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for module_name, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                full = f"{module_name}.{name}" if module_name else name
                (no_decay if no_weight_decay(module, full, param) else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.cfg.optim.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        optim = self.cfg.optim
        groups = self.parameter_groups()
        if not any(g["params"] for g in groups):
            raise ValueError("no trainable parameters: check model.lock_image / model.lock_text")
        optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=optim.fused or None
        )
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
