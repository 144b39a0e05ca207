"""CLIP-Refine post-pre-training (Yamaguchi et al., CVPR 2025; arXiv 2504.12717).

A short continuation of a pre-trained CLIP on a small caption set that narrows the modality
gap without losing zero-shot accuracy. Both towers train; a frozen snapshot of the starting
model is the teacher. The loss (paper Eq. 9) is

    L = λ_clip·L_CLIP + λ_rafa·L_RaFA + λ_kd·L_HyCD,

with the official defaults λ_clip = 0, λ_rafa = 1, λ_kd = 1, α = 0.5 (``method.loss_weights``
names the terms ``contrastive``, ``rafa`` and ``hycd``); see ``clipft/losses/refine.py`` for
RaFA and HyCD. Optimizer of the official recipe: AdamW, constant lr 1e-6, weight decay 0.1,
one epoch (``recipes/clip_refine.yaml``).

Three readings of the losses (docs/methods/clip_refine.md#paper-and-official-code-three-readings):

* ``features: raw_rafa`` (the default) — RaFA as the official code, on the un-normalised
  projected features with Gaussian references N(0, I) reduced as ``code``; HyCD on the
  logit-scaled cosine similarities (the official code's HyCD on raw dot products is what costs
  zero-shot accuracy here: benchmarks/results/clip_refine_tradeoff.md).
* ``features: raw`` — the official code: RaFA and HyCD on the un-normalised projected
  features, Gaussian references N(0, I), HyCD on raw dot products without the logit scale
  (``hycd_logit_scale: false``), RaFA reduced as ``code`` (element-wise mean) or ``paper``.
* ``features: normalized`` — unit features, references normalised onto the sphere
  (``rafa_prior: sphere``), HyCD on the logit-scaled cosine similarities. Its RaFA has no
  expected gradient (tested): in expectation this reading is HyCD alone.

Which one is the default, and why, is in docs/methods/clip_refine.md (measured by ``benchmarks/clip_refine.py``).

The teacher is never in the optimizer or the checkpoint's state dict: it is rebuilt from
``model.pretrained`` when a run resumes, and stored once beside the state dict
(``clip_refine_teacher``) only when the start cannot be rebuilt (a random initialisation).
With LoRA adapters (``model.lora.*``) the teacher is the student's own base model with the
adapters switched off: no second copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clipft.config import ConfigError, MethodConfig, RunConfig, not_one_of
from clipft.data.batch import Batch
from clipft.losses.refine import RAFA_PRIORS, RAFA_REDUCTIONS, hycd, rafa, sample_references
from clipft.methods.base import BaseModelView, ContrastiveMethod, register_method
from clipft.models import ModelBundle

TEACHER_KEY = "clip_refine_teacher"
FINGERPRINT_KEY = "clip_refine_teacher_sha256"


@dataclass
class ClipRefineConfig(MethodConfig):
    name: str = "clip_refine"
    loss_weights: dict[str, float] = field(default_factory=lambda: {"contrastive": 0.0, "rafa": 1.0, "hycd": 1.0})
    # What RaFA and HyCD see: raw_rafa (RaFA on raw features as the official code, HyCD on unit
    # features with the logit scales), raw (raw features for both, the official code) or
    # normalized (unit features for both; its RaFA is noise in expectation);
    # docs/methods/clip_refine.md. The three options below default (null) to the chosen
    # reading's values: raw_rafa -> gaussian, code, true; raw -> gaussian, code, false;
    # normalized -> sphere, paper, true.
    features: str = "raw_rafa"
    rafa_prior: Optional[str] = None  # gaussian | uniform | sphere
    rafa_mean: float = 0.0  # μ of the prior N(μ·1, σ²I)
    rafa_std: float = 1.0  # σ
    rafa_reduction: Optional[str] = None  # paper (½·mean ‖·‖²) | code (element-wise mean, modalities summed)
    hycd_alpha: float = 0.5  # weight of the ground-truth pairs in the hybrid targets
    hycd_temperature: float = 1.0  # τ of the softmax of the teacher's and the student's similarities in HyCD
    hycd_logit_scale: Optional[bool] = None  # multiply the similarities by each model's logit scale

    def check(self, run: RunConfig) -> None:
        if self.features not in READINGS:
            raise not_one_of("method.features", self.features, list(READINGS))
        for key, allowed in (("rafa_prior", RAFA_PRIORS), ("rafa_reduction", RAFA_REDUCTIONS)):
            if getattr(self, key) is not None and getattr(self, key) not in allowed:
                raise not_one_of(f"method.{key}", getattr(self, key), allowed)
        if not 0.0 <= self.hycd_alpha <= 1.0:
            raise ConfigError(f"method.hycd_alpha={self.hycd_alpha} must be in [0, 1]")
        if self.hycd_temperature <= 0 or self.rafa_std < 0:
            raise ConfigError("method.hycd_temperature must be > 0 and method.rafa_std >= 0")


READINGS: dict[str, dict[str, Any]] = {
    "normalized": {"rafa_prior": "sphere", "rafa_reduction": "paper", "hycd_logit_scale": True},
    "raw": {"rafa_prior": "gaussian", "rafa_reduction": "code", "hycd_logit_scale": False},
    "raw_rafa": {"rafa_prior": "gaussian", "rafa_reduction": "code", "hycd_logit_scale": True},
}
HYCD_ON_UNIT = ("normalized", "raw_rafa")  # readings whose HyCD compares unit features


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if not tensor.is_meta:  # a structure-only model (clipft info) has no values
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@register_method("clip_refine", ClipRefineConfig)
class ClipRefine(ContrastiveMethod):
    """RaFA + HyCD against a frozen teacher (see the module docstring)."""

    summary = "post-pre-training that narrows the modality gap: RaFA + HyCD against the frozen start"
    paper = 'Yamaguchi et al., "Post-pre-training for modality alignment in vision-language foundation models", CVPR 2025'

    loss_term_names = ("contrastive", "rafa", "hycd")

    def __init__(self, config: dict[str, Any], bundle: Optional[ModelBundle] = None) -> None:
        super().__init__(config, bundle)
        opts: ClipRefineConfig = self.cfg.method  # type: ignore[assignment]  (checked: ClipRefineConfig.check)
        # the options of this run, with the reading's values where the recipe left them null
        self.options = dataclasses.replace(
            opts, **{k: v for k, v in READINGS[opts.features].items() if getattr(opts, k) is None}
        )
        if not self.options.hycd_logit_scale and self.cfg.method.loss_weights.get("contrastive", 1.0) == 0:
            self.model.logit_scale.requires_grad_(False)  # no term uses it (raw reading without CLIP)
        # The starting weights: the student is built from model.pretrained, so at this point it
        # is the start (a resumed run loads its own weights into the student afterwards).
        self.frozen_copy("teacher", self.model)
        self.teacher_fingerprint = fingerprint(self.teacher)

    @property
    def teacher(self) -> torch.nn.Module:
        return self.frozen_modules["teacher"]

    @property
    def teacher_is_rebuildable(self) -> bool:
        """Rebuilt from model.pretrained, or the base weights under LoRA (in the state dict)."""
        return self.cfg.model.pretrained is not None or isinstance(self.teacher, BaseModelView)

    def encode_batch(self, batch: Batch) -> dict[str, Tensor]:
        normalize = self.options.features == "normalized"
        return {
            "image": self.encode_image(batch.images, normalize=normalize),
            "text": self.encode_text(batch.texts, normalize=normalize),
        }

    def frozen_features(self, batch: Batch) -> dict[str, Tensor]:
        normalize = self.options.features == "normalized"
        return {
            "teacher_image": self.teacher.encode_image(batch.images, normalize=normalize),
            "teacher_text": self.teacher.encode_text(batch.texts, normalize=normalize),
        }

    def loss_terms(self, features: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        opts = self.options
        normalize = opts.features == "normalized"
        image_features, text_features = features["image"], features["text"]
        teacher_image, teacher_text = features["teacher_image"], features["teacher_text"]
        self.log_pair_geometry(image_features, text_features)

        world, rank = self.world_and_rank()
        batch_size, dim = image_features.shape
        # References for the global batch from a generator seeded by (run.seed, step), this
        # rank's slice: the same draws on any number of devices, and after a resume.
        generator = torch.Generator(device=image_features.device)
        generator.manual_seed(self.cfg.run.seed * 1_000_003 + self.global_step)
        references = sample_references(
            world * batch_size, dim, prior=opts.rafa_prior, mean=opts.rafa_mean, std=opts.rafa_std,
            device=image_features.device, dtype=torch.float32, generator=generator,
        )[rank * batch_size:(rank + 1) * batch_size]
        scaled = opts.hycd_logit_scale
        if not normalize and opts.features in HYCD_ON_UNIT:  # raw_rafa: RaFA saw raw features, HyCD sees unit ones
            image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
            teacher_image, teacher_text = F.normalize(teacher_image, dim=-1), F.normalize(teacher_text, dim=-1)
        distill = hycd(
            image_features, text_features, teacher_image, teacher_text,
            alpha=opts.hycd_alpha, temperature=opts.hycd_temperature,
            logit_scale=self.logit_scale if scaled else None,
            teacher_logit_scale=self.teacher.logit_scale.exp() if scaled else None,
            all_image_features=self.gather(image_features), all_text_features=self.gather(text_features),
            all_teacher_image_features=self.gather(teacher_image), all_teacher_text_features=self.gather(teacher_text),
            offset=rank * batch_size,
        )
        unit_image = image_features if normalize else F.normalize(image_features, dim=-1)
        unit_text = text_features if normalize else F.normalize(text_features, dim=-1)
        if self.cfg.method.loss_weights.get("contrastive", 1.0) != 0:
            contrastive = self.contrastive_loss(unit_image, unit_text)
        else:  # weight 0 (the default): logged only, on this device's batch
            with torch.no_grad():
                contrastive = self.contrastive_loss(unit_image, unit_text, across_devices=False)
        return {
            "contrastive": contrastive,
            "rafa": rafa(features["image"], features["text"], references, opts.rafa_reduction),
            "hycd": distill,
        }

    # The teacher is not a submodule, so it is in no state dict. A checkpoint stores its
    # fingerprint, and its weights only when model.pretrained cannot rebuild it.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[FINGERPRINT_KEY] = self.teacher_fingerprint
        if not self.teacher_is_rebuildable:
            checkpoint[TEACHER_KEY] = self.teacher.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if TEACHER_KEY in checkpoint:
            self.teacher.load_state_dict(checkpoint[TEACHER_KEY])
            self.teacher_fingerprint = fingerprint(self.teacher)
        elif checkpoint.get(FINGERPRINT_KEY, self.teacher_fingerprint) != self.teacher_fingerprint:
            raise ValueError(
                f"model.pretrained={self.cfg.model.pretrained} no longer holds the weights this run started from "
                "(the teacher rebuilt from it differs from the one in the checkpoint's run): restore that file, "
                "or start a new run"
            )
