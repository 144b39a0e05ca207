"""Memory per device for a recipe, estimated before a run (``clipft info``).

Nothing is loaded: the model and the method are built on the meta device (their structure,
no values), so ViT-bigG-14's 2.5B parameters are counted in seconds within the imports'
own memory. The estimate has three parts (docs/memory.md explains each formula):

* model states, by strategy, with Ψ the trained model's parameters, Ψt the trainable ones,
  L the largest layer's, N = devices × nodes. In 16-bit DeepSpeed (fp16/bf16) the formulas
  are DeepSpeed's own estimators' (``estimate_zero2/3_model_states_mem_needs``), which count
  every parameter as trainable; a frozen parameter keeps only its 16-bit weight:
  ZeRO-2 2Ψ + 18Ψt/N; ZeRO-2 + optimizer offload 2Ψ; ZeRO-3 4L + (18Ψt + 2(Ψ−Ψt))/N;
  ZeRO-3 + optimizer offload 4L + 2Ψ/N; ZeRO-3 + optimizer and parameter offload 4L.
  fp32 DeepSpeed has no 16-bit copy: weights 4, gradients 4, Adam 8 bytes. DDP and a single
  device (Lightning's mixed precision keeps fp32 weights): 4Ψ + 12Ψt; "-true" 16-bit: 2Ψ + 6Ψt.
* copies a method holds beside the model, on every device: a frozen teacher in the weights'
  precision, the EMA in fp32; LoRA's adapters-off teacher is the model itself (no copy).
* activations of one device's batch (or micro-batch), per transformer layer
  (18 + 4r)·s·b·h + 5·a·s²·b bytes in 16-bit (Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models", 2022, §4.1, with MLP ratio r; ×2 in fp32): s
  tokens, b samples, h width, a heads. With gradient checkpointing a layer keeps only its
  input, 2·s·b·h, and one layer is recomputed at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional

import open_clip
import torch

from clipft.config import RunConfig, TrainerConfig, lightning_precision

GiB = 2**30
_LADDER = ("ddp", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload")
_BLOCKS = {"ddp": "ddp", "deepspeed_stage_2": "deepspeed_zero2", "deepspeed_stage_2_offload": "deepspeed_zero2_offload",
           "deepspeed_stage_3": "deepspeed_zero3", "deepspeed_stage_3_offload": "deepspeed_zero3_offload"}


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a method as it would train, from its structure."""

    total: int  # the trained module: model + the method's own parameters
    trainable: int
    largest_layer: int  # the most parameters one module holds directly (ZeRO-3 gathers one at a time)
    teacher: int  # frozen copies held beside the model
    ema: int


@dataclass(frozen=True)
class Estimate:
    model_states: float  # bytes per device
    copies: float
    activations: Optional[float]  # None: the towers are not transformers clipft can count
    cpu: float  # bytes per node held in CPU memory by offload
    devices: int
    strategy: str
    precision: str
    batch: int

    @property
    def total(self) -> float:
        return self.model_states + self.copies + (self.activations or 0.0)


def count(cfg: RunConfig) -> Counts:
    """Counts of ``cfg``'s method built on the meta device (nothing allocated or loaded)."""
    from clipft.methods import build_method
    from clipft.models import build_model

    bundle = build_model(cfg.model, meta=True)
    with torch.device("meta"):
        return count_method(build_method(cfg, bundle))


def count_method(method: torch.nn.Module) -> Counts:
    """Counts of a built method (a ContrastiveMethod; on the meta device or not)."""
    params = list(method.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in method.modules()), default=0)
    return Counts(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        largest_layer=largest,
        teacher=sum(p.numel() for m in method._frozen_modules.values() for p in m.parameters()),
        ema=sum(p.numel() for p in method.ema.parameters()) if method.ema is not None else 0,
    )


def _sixteen_bit(precision: str) -> bool:
    return lightning_precision(precision).startswith(("16", "bf16"))


def model_state_bytes(counts: Counts, trainer: TrainerConfig, devices: int) -> tuple[float, float]:
    """(bytes per device, CPU bytes per node) of weights, gradients and optimizer states."""
    psi, trainable, frozen = counts.total, counts.trainable, counts.total - counts.trainable
    nodes, world = trainer.num_nodes, devices * trainer.num_nodes
    strategy, half = trainer.strategy, _sixteen_bit(trainer.precision)
    if not strategy.startswith("deepspeed"):
        if lightning_precision(trainer.precision).endswith("-true") and half:
            return 2 * psi + 6 * trainable, 0.0
        return 4 * psi + 12 * trainable, 0.0
    weight, state = (2, 18) if half else (4, 12)  # bytes of a weight; of its gradients and optimizer states
    offload_optimizer = strategy.endswith("offload")
    if strategy.startswith("deepspeed_stage_3"):
        largest = 4 * counts.largest_layer
        if strategy == "deepspeed_stage_3_offload":  # optimizer and parameters in CPU memory
            return largest, (state * trainable + weight * frozen) / nodes * 1.5
        return largest + (state * trainable + weight * frozen) / world, 0.0
    if offload_optimizer:
        return weight * psi, trainable * max(4 * world, 16) * 1.5
    return weight * psi + state * trainable / world, 0.0


def activation_bytes(cfg: RunConfig, batch: int) -> Optional[float]:
    """Activations of ``batch`` pairs through both towers (see the module docstring), or None
    when a tower is not an open_clip transformer (ResNet, ConvNeXt, Hugging Face text)."""
    config = open_clip.get_model_config(cfg.model.name)
    if config is None:
        return None
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)) or "hf_model_name" in text:
        return None
    size = vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    images = batch * (2 if cfg.data.hard_images > 0 else 1)  # each pair's hard image joins the batch
    texts = batch * (1 + cfg.data.negatives.count)  # and its negative captions
    towers = [
        ((size // vision["patch_size"]) ** 2 + 1, vision["width"], vision["width"] // vision.get("head_width", 64),
         vision["layers"], vision.get("mlp_ratio", 4.0), images),
        (text.get("context_length", 77), text.get("width", 512), text.get("heads", 8), text.get("layers", 12),
         text.get("mlp_ratio", 4.0), texts),
    ]
    scale = 1 if _sixteen_bit(cfg.trainer.precision) else 2
    total = 0.0
    for s, h, a, layers, r, b in towers:
        per_layer = (18 + 4 * r) * s * b * h + 5 * a * s * s * b
        if cfg.model.grad_checkpointing:
            total += 2 * s * b * h * layers + per_layer
        else:
            total += per_layer * layers
    return total * scale


def _devices(trainer: TrainerConfig) -> int:
    return trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1


def estimate(cfg: RunConfig, counts: Optional[Counts] = None) -> Estimate:
    counts = counts or count(cfg)
    devices = _devices(cfg.trainer)
    states, cpu = model_state_bytes(counts, cfg.trainer, devices)
    weight = 2 if _sixteen_bit(cfg.trainer.precision) and cfg.trainer.strategy.startswith("deepspeed") else 4
    copies = weight * counts.teacher + 4 * counts.ema
    batch = min(cfg.data.batch_size, cfg.trainer.micro_batch_size or cfg.data.batch_size)
    return Estimate(states, copies, activation_bytes(cfg, batch), cpu, devices, cfg.trainer.strategy,
                    cfg.trainer.precision, batch)


def parse_size(text: str) -> float:
    """'80GB' (10⁹ bytes), '80GiB' (2³⁰), '80G' (as GiB) → bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|G|MiB|MB|M|TB|TiB)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu-memory {text!r}: give a size such as 80GB or 141GiB")
    units = {"gb": 1e9, "gib": GiB, "g": GiB, "mb": 1e6, "mib": 2**20, "m": 2**20, "tb": 1e12, "tib": 2**40}
    return float(match.group(1)) * units[(match.group(2) or "GiB").lower()]


def suggest(cfg: RunConfig, budget: float, counts: Counts) -> Optional[str]:
    """The least change that fits ``budget``: the recipe's strategy or the next one up the
    ladder DDP → ZeRO-2 → ZeRO-2 offload → ZeRO-3 → ZeRO-3 offload, then smaller micro-batches,
    then gradient checkpointing. None when nothing does."""
    start = _LADDER.index(cfg.trainer.strategy) if cfg.trainer.strategy in _LADDER else 0
    batch = cfg.data.batch_size
    micros = [None] + [m for m in (128, 64, 32, 16, 8, 4, 2, 1) if m < batch]
    for checkpointing in (cfg.model.grad_checkpointing, True):
        for micro in micros:
            for strategy in _LADDER[start:]:
                trial = replace(cfg, trainer=replace(cfg.trainer, strategy=strategy, micro_batch_size=micro),
                                model=replace(cfg.model, grad_checkpointing=checkpointing))
                if estimate(trial, counts).total <= budget:
                    changes = [] if strategy == cfg.trainer.strategy else [f"include=configs/trainer/{_BLOCKS[strategy]}.yaml"]
                    changes += [f"trainer.micro_batch_size={micro}"] if micro else []
                    changes += ["model.grad_checkpointing=true"] if checkpointing and not cfg.model.grad_checkpointing else []
                    return " ".join(changes) or None
    return None


def report_lines(cfg: RunConfig, counts: Counts, gpu_memory: Optional[float] = None) -> list[str]:
    """What ``clipft info`` prints under the parameter counts."""
    est = estimate(cfg, counts)
    nodes = cfg.trainer.num_nodes
    dev = cfg.trainer.devices
    assumed = "" if isinstance(dev, int) and dev > 0 else f" (trainer.devices={dev}: assuming 1; set it to count)"
    lines = [
        f"memory per device, estimated (docs/memory.md): {est.strategy}, {est.devices} device(s) x {nodes} node(s)"
        f"{assumed}, precision {est.precision}, {est.batch} pairs per forward",
        f"  model states   {est.model_states / GiB:9.2f} GiB   weights, gradients, optimizer states",
        f"  copies         {est.copies / GiB:9.2f} GiB   teacher {counts.teacher:,} / EMA {counts.ema:,} parameters",
        f"  activations    {est.activations / GiB:9.2f} GiB" if est.activations is not None else
        "  activations          n/a   (not an open_clip transformer tower: not estimated)",
        f"  total          {est.total / GiB:9.2f} GiB   (+ CUDA context and allocator slack, ~1-2 GiB)",
    ]
    if est.cpu:
        lines.append(f"  CPU per node   {est.cpu / GiB:9.2f} GiB   offloaded states (DeepSpeed's estimate, x1.5 buffers)")
    if gpu_memory is not None and est.total > gpu_memory:
        fix = suggest(cfg, gpu_memory, counts)
        lines.append(
            f"warning: the estimate {est.total / GiB:.1f} GiB exceeds the GPU's {gpu_memory / GiB:.1f} GiB (--gpu-memory); "
            + (f"this would fit: {fix}" if fix else "no strategy, micro-batch or checkpointing here fits: more devices, or a smaller model")
        )
    return lines
