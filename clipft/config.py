"""Typed run configuration: recipe YAML + included building blocks + command-line overrides.

A recipe maps one-to-one onto :class:`RunConfig`. It may name building blocks to merge first
(``include: [../configs/model/tiny.yaml, ...]``); the recipe's own keys then win, and
``key=value`` overrides from the command line win over both. Everything is validated here,
before any model or data is built: an unknown key fails with the nearest valid names, a
value of the wrong type fails naming the key, a missing included file fails naming it.

This module imports no torch, so that the CLI can read a recipe (and set thread settings
that must be in the environment before torch starts) quickly.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import logging
import os
import re
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A recipe, an included file or an override is wrong; the message says where."""


# --------------------------------------------------------------------------- sections


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "runs"  # run folder: <out_dir>/<name>/<timestamp>/
    seed: int = 0
    # "last": continue the newest run of this name that has a last checkpoint;
    # or a run folder / a .ckpt path. null: start a new run.
    resume: Optional[str] = None
    # torch intra-op threads for CPU work; 0 = the cores this process may use.
    threads: int = 0
    # OpenMP waiting: PASSIVE avoids the 10x slowdown of spinning threads on a busy machine.
    # Applied by the CLI before torch is imported (an OMP_WAIT_POLICY already in the
    # environment wins).
    omp_wait_policy: str = "PASSIVE"
    checkpoint_every_n_steps: int = 200  # how often last.ckpt is refreshed (also at the end)
    monitor: str = "val/loss"  # metric that picks the best checkpoint
    monitor_mode: str = "min"  # min | max
    plot: bool = True  # training curves PNG in the run folder
    # Where metrics, the resolved recipe and the plots go (docs/logging.md): csv (metrics.csv,
    # always on: curves.png, the report and resume read it), tensorboard, mlflow (a SQLite store
    # in the run folder unless MLFLOW_TRACKING_URI is set) and wandb (offline unless logged in);
    # mlflow and wandb are extras: pip install 'clipft[mlflow]' / 'clipft[wandb]'.
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    # A non-finite loss term or gradient norm (docs/divergence.md): stop the run at that step
    # (last.ckpt keeps the last good state), or skip that step's update and stop only after
    # nonfinite_patience skipped steps in a row (not under DeepSpeed).
    on_nonfinite: str = "stop"  # stop | skip
    nonfinite_patience: int = 5
    # Load checkpoints that need classes beyond clipft's allowlist (or TorchScript archives)
    # with weights_only=False, which can run code from the file: only for files you trust
    # (docs/safety.md; also --trust-checkpoint on the CLI).
    trust_checkpoint: bool = False


@dataclass
class LoraSettings:
    """LoRA adapters through peft (clipft/models/lora.py); rank 0: none."""

    rank: int = 0
    alpha: float = 16.0  # the update is (alpha / rank)·B·A
    dropout: float = 0.0
    towers: str = "both"  # image | text | both
    # attention q, k, v, out and MLP c_fc, c_proj of every block of the chosen towers
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "out"])


@dataclass
class ModelConfig:
    # Any open_clip model name (ViT-B-32, RN50, ...) or one shipped by clipft (clipft-tiny-vit).
    name: str = "clipft-tiny-vit"
    # null (random init), an open_clip pretrained tag (openai, laion2b_s34b_b79k, ...),
    # or a local file: state dict (.pt/.bin/.safetensors), open_clip or clipft checkpoint.
    pretrained: Optional[str] = None
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    grad_checkpointing: bool = False
    # The temperature multiplier s = exp(logit_scale) to start from (null: the model's own,
    # 1/0.07 for a new model), and whether it stays fixed. Real CLIP ends pre-training at
    # s = 100; a high fixed s keeps a modality gap as large as real CLIP's (README: Models).
    logit_scale: Optional[float] = None
    lock_logit_scale: bool = False
    # A learned logit bias b, started at this value: the model is then trained with SigLIP's
    # sigmoid loss (SigLIP models have one already; open_clip's init for them: -10).
    logit_bias: Optional[float] = None
    # A fully locked Hugging Face text tower (e.g. clipft-lit-minilm): compute each caption's
    # pooled output once and reuse it (only the projection runs each step).
    cache_locked_text: bool = True
    cache_dir: Optional[str] = None  # where open_clip keeps downloaded weights
    # LoRA adapters; every other weight is then frozen (train the logit scale too with
    # lora_train_logit_scale).
    lora: LoraSettings = field(default_factory=LoraSettings)
    lora_train_logit_scale: bool = False


@dataclass
class SyntheticDataConfig:
    seed: int = 0
    train_size: int = 128_000  # samples per epoch (generated on the fly)
    val_size: int = 1000  # held-out scenes for the validation loss and retrieval
    image_size: int = 32
    two_object_fraction: float = 0.6


NEGATIVE_TYPES = ("swap_obj", "swap_att", "replace_obj", "replace_att", "replace_rel", "add_obj", "add_att")
# also allowed: ARO's order perturbation, which DeGLA trains on (then do not report ARO's Order scores)
NEGATIVE_TYPE_CHOICES = (*NEGATIVE_TYPES, "shuffle")


@dataclass
class NegativesConfig:
    """Negative captions per training pair (clipft/data/negatives.py), for NegCLIP/DeGLA."""

    count: int = 0  # K negatives per pair; 0: none
    # SugarCrepe types to draw from; a pair gets K of different types among those that apply
    types: list[str] = field(default_factory=lambda: list(NEGATIVE_TYPES))
    # csv source: read them from this column instead (a list per row, e.g. NegCLIP's
    # neg_caption); K of each row's list are drawn per pair
    column: Optional[str] = None


@dataclass
class ClassesConfig:
    """Class-labelled data for few-shot methods (MMRL): each pair's caption is its class
    prompt and the batch carries the labels (clipft/data/classes.py)."""

    enabled: bool = False  # always on for data.source=folder
    task: str = "object"  # synthetic: shape | colour | object (its held-out combinations left out)
    label_key: str = "label"  # csv: the column of class labels
    names: Optional[str] = None  # JSON file {label or folder name: class name}; null: the labels
    shots: Optional[int] = None  # k training images per class, drawn with run.seed; null: all
    # base: train on the first half of the sorted classes (CoOp's base-to-novel protocol);
    # all: on every class
    train_classes: str = "base"
    # prompt templates with {} for the class name (several: their embeddings are averaged),
    # or template_set: a CoOp data set's prompt (oxford_pets, dtd, eurosat, imagenet, ...).
    # null: synthetic "a large {}"; tables "a photo of a {}."
    templates: Optional[list[str]] = None
    template_set: Optional[str] = None


@dataclass
class WebDatasetConfig:
    """``data.source: webdataset``: tar shards (clipft/data/shards.py, README: WebDataset shards)."""

    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])  # first present wins
    caption_key: str = "txt"
    # samples per epoch (every device yields epoch_samples // (devices x batch_size) batches);
    # null: the sum of the shards' entries in the sizes.json next to them
    epoch_samples: Optional[int] = None
    # draw shards with replacement (an endless stream cut into epochs of epoch_samples)
    resampled: bool = False
    # resampled: one weight per '::'-separated source; each shard of source i is drawn
    # weights[i] times as often (open_clip_train's upsampling factors). null: all 1.
    weights: Optional[list[float]] = None
    shuffle_buffer: int = 1000  # samples (undecoded) per worker; 0: shard order


@dataclass
class DataConfig:
    # synthetic | csv (also .tsv and .jsonl files) | folder (one sub-folder of images per class) |
    # webdataset (tar shards)
    source: str = "synthetic"
    # csv: table of image paths and captions, or a list of tables (concatenated); folder: the
    # image folder; webdataset: shards, brace-expanded ('data/shard-{000000..000099}.tar', a
    # folder of .tar files, URLs; sources joined with '::')
    train: Any = None
    val: Optional[str] = None  # the same kind as train (webdataset: local shards, or a table)
    image_key: str = "filepath"  # column holding the image path (relative to the table)
    caption_key: str = "title"  # column holding the caption
    # csv: a JSON file {split name: [ids]} choosing the rows of each table (relative to the
    # table's folder, so each of several tables reads its own), e.g. splits.json
    split_file: Optional[str] = None
    split_key: Optional[str] = None  # the column whose values split_file lists; null: data.image_key
    train_split: Optional[str] = None  # with split_file: the split of data.train (e.g. train)
    val_split: Optional[str] = None  # with split_file: the split of data.val (e.g. test)
    separator: Optional[str] = None  # null: from the extension (.csv ",", .tsv tab)
    # error | skip (skipped rows/samples are counted and reported). null: error for tables
    # (checked before training), skip for shards (read while training; the count is logged)
    on_bad_sample: Optional[str] = None
    batch_size: int = 128
    val_batch_size: Optional[int] = None  # null: same as batch_size
    num_workers: int = 0
    pin_memory: Optional[bool] = None  # null: on when training on a GPU
    # train: the model's training preprocess (open_clip: random resized crop 0.9-1.0);
    # val: its evaluation preprocess (no augmentation);
    # scale_shift: random scale 0.85-1.1 and shift up to 8 %, no flips or colour changes,
    # then the evaluation preprocess (pad_fill fills the uncovered border);
    # style: scale_shift plus stroke width, blur, brightness / contrast / saturation and
    # grayscale (no hue change, no flips), for styles of drawing not seen in training
    train_transform: str = "train"
    pad_fill: int = 0
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    webdataset: WebDatasetConfig = field(default_factory=WebDatasetConfig)
    # NegCLIP's hard images: every training pair brings one of its image's k nearest
    # neighbours (starting model's embedding, computed once and cached) as an extra pair, so a
    # batch holds 2 x data.batch_size pairs. 0: off (NegCLIP: 3).
    hard_images: int = 0
    # Pairs with the same caption are positives of one another in the CLIP loss (UniCL's
    # multi-positive target) or SigLIP's (label +1), not negatives: for data with several images
    # of one caption, such as one concept drawn in several styles (methods that use the base
    # loss: finetune / FLYP). With CLIP's loss and a deterministic text tower it changes nothing
    # (equal captions, equal features: docs/data.md)
    same_caption_positives: bool = False
    classes: ClassesConfig = field(default_factory=ClassesConfig)


@dataclass
class MethodConfig:
    """Base of every method's config; a method registers a subclass with its own fields."""

    name: str = "finetune"
    # Weight of each named loss term; a term the method computes but that is not listed
    # has weight 1.0.
    loss_weights: dict[str, float] = field(default_factory=dict)
    # Keep an exponential moving average of the model, θ_ema <- m·θ_ema + (1-m)·θ after every
    # optimizer step that stepped (fp32, in the checkpoint; DeGLA's teacher). null: none.
    ema_momentum: Optional[float] = None

    def check(self, run: "RunConfig") -> None:
        """The method's own checks of its settings (and of what it needs from the rest of the
        run), when a recipe is composed: before any model, data or download is touched. Raise
        :class:`ConfigError` naming the key, the value and what is allowed (:func:`not_one_of`)."""


def setting_help(cls: type) -> dict[str, str]:
    """The comments of a settings dataclass, by field: the comment lines just above a field
    and the comment at the end of its line, as written in the code (what ``clipft info
    --methods`` prints, so the help cannot drift from the code). Inherited fields take the
    help of the class that declares them."""
    help_of: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        above: list[str] = []
        for number, line in enumerate(source.splitlines(), start=1):
            match = re.match(r"\s+(\w+)\s*:", line)
            if line.strip().startswith("#"):
                above.append(comments[number])
            elif match and not line.lstrip().startswith("def "):
                text = " ".join(above + ([comments[number]] if number in comments else []))
                if text:
                    help_of[match.group(1)] = text
                above = []
            else:
                above = []
    return help_of


def not_one_of(key: str, value: Any, allowed: Sequence[Any]) -> ConfigError:
    """``method.x='spere' is not one of: sphere, gaussian; did you mean sphere?``"""
    names = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{key}={value!r} is not one of: {', '.join(names)}{hint}")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # torch's fused AdamW kernel (CPU and CUDA): on the quickstart model the optimizer step
    # takes 5 ms instead of 27 ms; set false for parameters it does not support.
    fused: bool = True
    warmup_steps: Optional[int] = None  # null: warmup_fraction of the total steps
    warmup_fraction: float = 0.0
    schedule: str = "cosine"  # cosine | constant (after warm-up)
    min_lr: float = 0.0
    logit_scale_max: float = 100.0  # clamp of exp(logit_scale) after each step, as open_clip
    # Layer-wise lr decay γ (BEiT / FT-CLIP: 0.6-0.75): a parameter at depth d of a tower gets
    # lr·γ^(N+1−d): embeddings d=0, block i d=i+1, projections / final norm / logit scale the top
    # N+1 (lr itself); N = the deeper tower's blocks, the other tower's depths scaled onto it
    # (docs/finetuning.md). null: off.
    layer_decay: Optional[float] = None
    # lr multipliers by parameter-name pattern (a regular expression searched in the open_clip
    # name, e.g. {visual: 1.0, transformer: 0.5, logit_scale: 0.1}): the first pattern that
    # matches, in the order written, sets the multiplier (times layer_decay's); no match: 1.0.
    lr_multipliers: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    # auto | ddp | deepspeed_stage_1 | deepspeed_stage_2 | deepspeed_stage_2_offload | deepspeed_stage_3 |
    # deepspeed_stage_3_offload (DeepSpeed ZeRO also on CPU, with gloo) | any Lightning strategy name
    strategy: str = "auto"
    # DeepSpeed: save only trainable weights (LoRA adapters; the base comes from model.pretrained)
    exclude_frozen_parameters: bool = False
    # open_clip names (fp32, amp, amp_bf16, pure_bf16, pure_fp16) or Lightning names (32-true, ...)
    precision: str = "fp32"
    max_steps: int = -1
    max_epochs: Optional[int] = None
    val_check_interval: Optional[Any] = None  # int: every n steps; float: fraction of an epoch
    check_val_every_n_epoch: Optional[int] = 1
    limit_train_batches: Optional[Any] = None
    limit_val_batches: Optional[Any] = None
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1  # gradient accumulation: each batch its own negatives
    # Encode each device's batch in micro-batches of this many pairs: activation memory of a
    # micro-batch, while every loss still sees the whole batch (all its negatives) and the
    # gradient is the whole batch's (open_clip's accum_freq = data.batch_size / this). null: off.
    micro_batch_size: Optional[int] = None
    enable_progress_bar: bool = True
    deterministic: bool = False
    # torch.compile the trained model's towers in place (state dict keys unchanged); the first
    # step compiles (~1 min for the tiny model on 2 CPU cores), evaluation compiles once more
    compile: bool = False
    # Seconds a collective (all-reduce, gather, barrier) waits for the other processes before
    # it fails, e.g. when a node dies without closing its connections (docs/multinode.md).
    collective_timeout_s: float = 1800
    # SLURM: after the checkpoint a pre-emption signal triggers, rank 0 runs `scontrol requeue`
    slurm_requeue: bool = True


@dataclass
class ZeroShotTaskConfig:
    name: str = "zeroshot"
    # synthetic: a built-in task of the synthetic data set; csv: a table of images and labels;
    # folder: an image folder with one sub-folder per class (class name = folder name)
    source: str = "synthetic"
    task: str = "shape"  # synthetic: shape | colour | object
    # synthetic: val (seen combinations) | novel (held-out combinations); csv with split_file:
    # the split whose rows are scored (e.g. test)
    split: str = "val"
    size: int = 600  # synthetic: number of one-object images
    data: Optional[str] = None  # csv: path of the table; folder: the image folder
    image_key: str = "filepath"
    label_key: str = "label"
    # csv: a JSON file {split name: [ids]} (relative to the table's folder); rows of `split` only
    split_file: Optional[str] = None
    split_key: Optional[str] = None  # the column whose values split_file lists; null: image_key
    classnames: Optional[list[str]] = None  # csv: null = the sorted distinct labels
    # csv/folder: a JSON file of readable class names (relative to the table's folder): {label:
    # name}, or a data set's classes.json (lists of {key, text} objects); null: the labels
    names: Optional[str] = None
    # score only these labels: images of other classes are left out and the classifier holds
    # only these classes (as ImageNet-R scores 200 of ImageNet's 1000). null: every class
    subset: Optional[list[str]] = None
    # csv/folder: format strings with {} for the class name, or a named set in template_set
    # (single: "a photo of a {}."; openai_imagenet: OpenAI's 80; simple_imagenet: 7).
    # Synthetic tasks always use every caption of the data that describes the class.
    templates: Optional[list[str]] = None
    template_set: Optional[str] = None
    ensemble: str = "mean"  # mean (OpenAI) | max (max score over templates)
    # csv/folder: score each class by the best of its subclasses' prompts (CHiLS, Novack et al.
    # 2023: classify into the finer label set, report the coarse class): the name of a list in
    # the `names` file whose items are {key, text, <label_key>: the class} (classes.json's
    # subgroups, with label_key: group), or a JSON file {label: [subclass name, ...]} (relative
    # to the table's folder). null: the classes' own names
    subclasses: Optional[str] = None


@dataclass
class RetrievalEvalConfig:
    enabled: bool = True
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class CompositionalEvalConfig:
    # null: off; synthetic: a SugarCrepe-format folder written for held-out synthetic scenes;
    # folder: a SugarCrepe download (<subset>.json files) at `path`, images in `image_root`
    source: Optional[str] = None
    path: Optional[str] = None
    image_root: Optional[str] = None  # null: <path>/images
    size: int = 500  # synthetic: number of scenes


@dataclass
class EvalSetConfig:
    """A named evaluation set (``eval.sets``): a table (optionally one split of it), scored by
    retrieval on its pairs and by its zero-shot tasks, logged as ``val/sets/<name>/...``."""

    name: str = ""
    data: Optional[str] = None  # a table of image paths and captions (data.source csv's format)
    image_key: Optional[str] = None  # null: data.image_key
    caption_key: Optional[str] = None  # null: data.caption_key
    split_file: Optional[str] = None  # JSON {split name: [ids]}, relative to the table's folder
    split_key: Optional[str] = None  # null: the image column
    split: Optional[str] = None  # with split_file: the split to evaluate (e.g. test)
    shifted: bool = False  # a distribution-shift set (WiSE-FT's y axis); false: in-domain
    retrieval: bool = True  # image<->text R@K on the set's pairs (eval.retrieval.ks)
    # zero-shot tasks on the set's images: a task's data / split / image key are the set's; it
    # gives name, label_key, names, classnames, subset, templates / template_set, ensemble,
    # subclasses
    zeroshot: list[ZeroShotTaskConfig] = field(default_factory=list)


@dataclass
class EvalConfig:
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    # modality gap, alignment, uniformity of the validation pairs, and gap.png
    gap: bool = True
    compositional: CompositionalEvalConfig = field(default_factory=CompositionalEvalConfig)
    zeroshot: list[ZeroShotTaskConfig] = field(default_factory=list)
    # named evaluation sets (in-domain and shifted), each with retrieval and zero-shot tasks,
    # logged as val/sets/<name>/... and their mean as val/sets/mean/...
    sets: list[EvalSetConfig] = field(default_factory=list)
    # class-based data (data.classes): accuracy on the validation images of the base classes
    # (among base classes), of the novel classes (among novel classes) and their harmonic mean
    base_to_novel: bool = True
    batch_size: int = 256


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# open_clip's precision names -> Lightning's (Lightning's own names pass through).
PRECISION = {
    "fp32": "32-true",
    "amp": "16-mixed",
    "amp_bf16": "bf16-mixed",
    "amp_bfloat16": "bf16-mixed",
    "pure_bf16": "bf16-true",
    "pure_fp16": "16-true",
}
LIGHTNING_PRECISION = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")

LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")  # run.loggers

CHOICES: dict[str, tuple[str, ...]] = {
    "run.monitor_mode": ("min", "max"),
    "run.omp_wait_policy": ("PASSIVE", "ACTIVE"),
    "run.on_nonfinite": ("stop", "skip"),
    "data.classes.task": ("shape", "colour", "object"),
    "data.classes.train_classes": ("base", "all"),
    "data.on_bad_sample": (None, "error", "skip"),
    "data.train_transform": ("train", "val", "scale_shift", "style"),
    "optim.schedule": ("cosine", "constant"),
    "eval.zeroshot.template_set": (None, "single", "openai_imagenet", "simple_imagenet"),
    "eval.compositional.source": (None, "synthetic", "folder"),
    "eval.zeroshot.task": ("shape", "colour", "object"),
    "eval.zeroshot.split": ("val", "novel"),
    "eval.zeroshot.ensemble": ("mean", "max"),
}

# --------------------------------------------------------------------------- method registry

_METHOD_CONFIGS: dict[str, type[MethodConfig]] = {"finetune": MethodConfig}


def lightning_precision(name: str) -> str:
    """Lightning's name for an open_clip (or Lightning) precision name; validated in config."""
    return PRECISION.get(name, name)


def register_method_config(name: str) -> Callable[[type[MethodConfig]], type[MethodConfig]]:
    """Class decorator: the config dataclass used when ``method.name == name``."""

    def wrap(cls: type[MethodConfig]) -> type[MethodConfig]:
        if not (dataclasses.is_dataclass(cls) and issubclass(cls, MethodConfig)):
            raise TypeError(f"{cls!r} must be a dataclass subclass of MethodConfig")
        _METHOD_CONFIGS[name] = cls
        return cls

    return wrap


def method_names() -> list[str]:
    return sorted(_METHOD_CONFIGS)


# --------------------------------------------------------------------------- data-source registry

# name -> clipft.data.sources.DataSource. The sources register here when clipft.data is imported
# (as the methods register their settings above), so that a recipe's data.source, and what that
# source needs from the recipe, are checked here without importing clipft.data (which imports config).
_DATA_SOURCES: dict[str, Any] = {}


def register_data_source(name: str, source: Any) -> None:
    """Called by :func:`clipft.data.sources.register_source`."""
    _DATA_SOURCES[name] = source


def data_source_names(labelled: bool = False) -> list[str]:
    """The registered sources, in registration order; ``labelled``: those that can give
    class-labelled images (data.classes, eval.zeroshot)."""
    return [name for name, source in _DATA_SOURCES.items() if source.labelled or not labelled]


def data_source(name: str, key: str = "data.source", labelled: bool = False) -> Any:
    """The source registered as ``name``; a ConfigError naming ``key`` and the allowed names otherwise."""
    if not _DATA_SOURCES:
        raise ConfigError(f"{key}: no data sources registered: import clipft.data first, as the CLI does")
    allowed = data_source_names(labelled)
    if name not in allowed:
        raise not_one_of(key, name, allowed)
    return _DATA_SOURCES[name]


# --------------------------------------------------------------------------- loading

INCLUDE_KEY = "include"


def shipped_root() -> Path:
    """The folder holding the recipes/ and configs/ that ship with clipft: inside the installed
    package (a wheel maps the repository's top-level recipes/ and configs/ there, see
    pyproject.toml), or the repository root in a source checkout (an editable install)."""
    package = Path(__file__).resolve().parent
    return package if (package / "recipes").is_dir() else package.parent


def find_recipe(recipe: str | Path) -> Path:
    """A recipe path as given when it exists (a path wins over a name); otherwise a shipped
    recipe: a bare name (``quickstart`` or ``quickstart.yaml``) from the shipped recipes/, a
    relative path (``recipes/quickstart.yaml``) from the shipped root."""
    path = Path(os.path.expanduser(str(recipe)))
    if path.is_file() or path.is_absolute():
        return path
    shipped = shipped_root()
    named = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    candidates = [shipped / "recipes" / named] if len(path.parts) == 1 else [shipped / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if len(path.parts) == 1 and path.suffix not in (".yaml", ".yml"):
        names = sorted(p.stem for p in (shipped / "recipes").glob("*.yaml"))
        close = difflib.get_close_matches(path.name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"recipe '{recipe}' not found: no such file and no shipped recipe of that name; "
                          f"{hint}`clipft recipes` lists the shipped ones")
    return path


def _resolve_include(entry: str, including_file: Path) -> Path:
    """An include is looked up next to the including file, then in its parent folders, then
    in the working directory, then among the shipped configs, so ``configs/model/tiny.yaml``
    works from ``recipes/x.yaml`` and from a recipe copied anywhere."""
    candidate = Path(os.path.expanduser(entry))
    if candidate.is_absolute():
        if candidate.is_file():
            return candidate
        searched = [candidate]
    else:
        searched = [d / candidate for d in [including_file.parent, *including_file.parent.parents]]
        searched += [Path.cwd() / candidate, shipped_root() / candidate]
        for path in searched:
            if path.is_file():
                return path
    raise ConfigError(
        f"{including_file}: included file '{entry}' not found (looked in: "
        + ", ".join(str(p.parent) for p in searched[:3])
        + (", ..." if len(searched) > 3 else "")
        + ")"
    )


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """Return the (source name, config) layers of a file: its includes first, then itself."""
    if not path.is_file():
        raise ConfigError(f"recipe file '{path}' not found")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: include cycle: " + " -> ".join(str(p) for p in chain))
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if loaded is None:
        loaded = OmegaConf.create({})
    if isinstance(loaded, DictConfig) and len(loaded) == 0 and not chain:
        raise ConfigError(
            f"{path}: the recipe is empty (no keys), so it would train the defaults; copy a recipe from recipes/ "
            "(recipes/quickstart.yaml is the smallest) and edit it"
        )
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got a list")
    layers: list[tuple[str, DictConfig]] = []
    includes = loaded.pop(INCLUDE_KEY, None)
    if includes is not None:
        if isinstance(includes, str):
            includes = [includes]
        if not isinstance(includes, ListConfig):
            raise ConfigError(f"{path}: '{INCLUDE_KEY}' must be a list of file paths")
        for entry in includes:
            included = _resolve_include(str(entry), path)
            layers.extend(_read_yaml(included, chain + (path.resolve(),)))
    layers.append((str(path), loaded))
    return layers


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' must have the form key=value (for example optim.lr=1e-4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as err:  # YAML: a bad escape in a "quoted" value
        first = str(err).splitlines()[0]
        raise ConfigError(f"could not parse overrides {overrides}: {first} (in YAML, quote a backslash with '...')") from err


def _check_keys(data: Any, schema: Any, prefix: str, source: str) -> None:
    """Walk a user mapping against the schema dataclass; name unknown keys with the nearest
    valid ones (OmegaConf's own message gives neither the file nor suggestions)."""
    if not dataclasses.is_dataclass(schema) or not isinstance(data, DictConfig):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in data.keys():
        key = str(key)
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            valid = ", ".join(sorted(fields))
            where = f" under '{prefix[:-1]}'" if prefix else ""
            raise ConfigError(f"{source}: unknown key '{full}'{hint} (valid keys{where}: {valid})")
        value = getattr(schema, key)
        child = data._get_node(key)
        if dataclasses.is_dataclass(value):
            _check_keys(child, value, full + ".", source)
        elif isinstance(value, list) and isinstance(child, ListConfig):
            item_schema = _list_item_schema(schema, key)
            if item_schema is not None:
                for i, item in enumerate(child):
                    _check_keys(item, item_schema(), f"{full}[{i}].", source)


def _list_item_schema(schema: Any, key: str) -> Optional[type]:
    if (type(schema) is EvalConfig and key == "zeroshot") or (type(schema) is EvalSetConfig and key == "zeroshot"):
        return ZeroShotTaskConfig
    if type(schema) is EvalConfig and key == "sets":
        return EvalSetConfig
    return None


def _unknown_key(full: str, name: str, valid: list[str], where: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    prefix = where + "." if where else ""
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    under = f" under '{where}'" if where else ""
    return ConfigError(f"{source}: unknown key '{full}'{hint} (valid keys{under}: {', '.join(sorted(valid))})")


def _check_path(key: str, schema: Any, source: str) -> None:
    """Check a dotted override key (``a.b``, ``list[0].c`` or ``list.0.c``) against the schema."""
    node: Any = schema
    done: list[str] = []
    for part in key.split("."):
        where = ".".join(done)
        if isinstance(node, type) and dataclasses.is_dataclass(node):  # a list's item type
            if not part.isdigit():
                raise ConfigError(f"{source}: '{key}': '{where}' is a list; use an index such as {where}[0]")
            node = node()
        elif dataclasses.is_dataclass(node):
            fields = [f.name for f in dataclasses.fields(node)]
            if part not in fields:
                raise _unknown_key(key, part, fields, where, source)
            child = getattr(node, part)
            item = _list_item_schema(node, part)
            node = item if item is not None else child
        else:
            return  # free-form mapping (method.loss_weights) or a leaf
        done.append(part)


def _apply_override(cfg: DictConfig, schema: Any, item: str) -> None:
    key, raw = item.split("=", 1)
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    source = "command-line override"
    _check_path(key, schema, source)
    if not any(part.isdigit() for part in key.split(".")):  # keys inside a mapping or list value
        _check_keys(OmegaConf.from_dotlist([item]), schema, "", source)
    try:
        value = OmegaConf.from_dotlist([f"value={raw}"])["value"]
        OmegaConf.update(cfg, key, value, merge=True)
    except (OmegaConfBaseException, TypeError, ValueError, IndexError) as err:
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{source}: bad value for '{item.split('=', 1)[0]}': {msg}") from err


def _check_values(cfg: DictConfig) -> None:
    """Ranges and formats that types alone do not catch."""
    checks = [
        (cfg.trainer.precision in PRECISION or cfg.trainer.precision in LIGHTNING_PRECISION, "trainer.precision",
         f"unknown precision (open_clip names: {', '.join(PRECISION)}; Lightning names: {', '.join(LIGHTNING_PRECISION)})"),
        (cfg.data.batch_size > 0, "data.batch_size", "must be > 0"),
        (cfg.data.negatives.count >= 0, "data.negatives.count", "must be >= 0"),
        (cfg.data.hard_images >= 0, "data.hard_images", "must be >= 0 (0: off)"),
        (all(t in NEGATIVE_TYPE_CHOICES for t in cfg.data.negatives.types) and len(cfg.data.negatives.types) > 0,
         "data.negatives.types", f"choose from {', '.join(NEGATIVE_TYPE_CHOICES)}"),
        (cfg.trainer.micro_batch_size is None or cfg.trainer.micro_batch_size > 0, "trainer.micro_batch_size",
         "must be > 0 (null: encode the batch at once)"),
        (cfg.method.get("ema_momentum") is None or 0 <= cfg.method.ema_momentum < 1, "method.ema_momentum",
         "must be in [0, 1) (null: no EMA)"),
        (cfg.data.val_batch_size is None or cfg.data.val_batch_size > 0, "data.val_batch_size", "must be > 0"),
        (cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (cfg.data.webdataset.epoch_samples is None or cfg.data.webdataset.epoch_samples > 0,
         "data.webdataset.epoch_samples", "must be > 0 (null: from sizes.json)"),
        (cfg.data.webdataset.shuffle_buffer >= 0, "data.webdataset.shuffle_buffer", "must be >= 0"),
        (len(cfg.data.webdataset.image_keys) > 0, "data.webdataset.image_keys", "name at least one image extension"),
        (cfg.data.webdataset.weights is None or all(w > 0 for w in cfg.data.webdataset.weights),
         "data.webdataset.weights", "must be > 0"),
        (cfg.data.synthetic.train_size > 0 and cfg.data.synthetic.val_size > 0, "data.synthetic", "sizes must be > 0"),
        (cfg.run.threads >= 0, "run.threads", "must be >= 0 (0 = the cores this process may use)"),
        (cfg.run.checkpoint_every_n_steps > 0, "run.checkpoint_every_n_steps", "must be > 0"),
        (cfg.trainer.collective_timeout_s > 0, "trainer.collective_timeout_s", "must be > 0 (seconds)"),
        (cfg.run.nonfinite_patience > 0, "run.nonfinite_patience", "must be > 0"),
        (cfg.run.on_nonfinite != "skip" or not str(cfg.trainer.strategy).startswith("deepspeed"), "run.on_nonfinite",
         f"skip is not supported with trainer.strategy={cfg.trainer.strategy}: ZeRO applies the update inside its own "
         "step, before the gradient norm is known; use stop"),
        (cfg.optim.lr >= 0, "optim.lr", "must be >= 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (0 <= cfg.optim.warmup_fraction <= 1, "optim.warmup_fraction", "must be in [0, 1]"),
        (cfg.optim.warmup_steps is None or cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", "must be two values in [0, 1)"),
        (cfg.optim.logit_scale_max > 0, "optim.logit_scale_max", "must be > 0"),
        (cfg.optim.layer_decay is None or 0 < cfg.optim.layer_decay <= 1, "optim.layer_decay",
         "must be in (0, 1] (null: off)"),
        (all(v >= 0 for v in cfg.optim.lr_multipliers.values()), "optim.lr_multipliers", "multipliers must be >= 0"),
        (cfg.model.logit_scale is None or 0 < cfg.model.logit_scale <= cfg.optim.logit_scale_max, "model.logit_scale",
         "must be in (0, optim.logit_scale_max]"),
        (len(cfg.eval.retrieval.ks) > 0 and all(k > 0 for k in cfg.eval.retrieval.ks), "eval.retrieval.ks", "must be positive"),
    ]
    for where, task in _zeroshot_tasks(cfg):
        checks.append((task.size > 0, f"{where}.size", "must be > 0"))
        for template in task.templates or []:
            checks.append(("{}" in template, f"{where}.templates", f"template {template!r} has no {{}} for the class name"))
        checks.append((task.subclasses is None or task.source != "synthetic" or where.startswith("eval.sets"), f"{where}.subclasses",
                       "works on tables and image folders (source csv / folder), not on the synthetic tasks"))
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message} (got {OmegaConf.select(cfg, key.split('[')[0])!r})")
    for pattern in cfg.optim.lr_multipliers:
        try:
            re.compile(str(pattern))
        except re.error as err:
            raise ConfigError(f"optim.lr_multipliers: pattern {pattern!r} is not a regular expression ({err}); "
                              "escape special characters, e.g. 'visual\\.proj'") from err


def _check_choices(cfg: DictConfig) -> None:
    for dotted, allowed in CHOICES.items():
        section, _, leaf = dotted.rpartition(".")
        if section == "eval.zeroshot":
            # a table's split is a name of its split file; the synthetic tasks' splits are fixed
            nodes = [(where, t.get(leaf)) for where, t in _zeroshot_tasks(cfg)
                     if leaf not in ("split", "task") or t.source == "synthetic"]
            nodes = [(f"{where}.{leaf}", value) for where, value in nodes]
        else:
            nodes = [(dotted, OmegaConf.select(cfg, dotted))]
        for where, value in nodes:
            if value not in allowed:
                names = ", ".join("null" if a is None else str(a) for a in allowed)
                raise ConfigError(f"{where}={value!r} is not one of: {names}")


def _zeroshot_tasks(cfg: DictConfig) -> list[tuple[str, Any]]:
    """Every zero-shot task of a run with where it is: eval.zeroshot[i], eval.sets[j].zeroshot[k]."""
    tasks = [(f"eval.zeroshot[{i}]", t) for i, t in enumerate(cfg.eval.zeroshot)]
    for j, s in enumerate(cfg.eval.sets):
        tasks += [(f"eval.sets[{j}].zeroshot[{k}]", t) for k, t in enumerate(s.zeroshot)]
    return tasks


def _check_sets(cfg: DictConfig) -> None:
    """eval.sets: distinct names (not 'mean'), a table each, a split named with a split file."""
    seen: set[str] = set()
    for j, s in enumerate(cfg.eval.sets):
        where = f"eval.sets[{j}]"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name or "") or s.name == "mean":
            raise ConfigError(f"{where}.name={s.name!r}: give each set a name of letters, digits, '_', '-' or '.' "
                              "(not 'mean', which holds the sets' mean)")
        if s.name in seen:
            raise ConfigError(f"{where}.name={s.name!r}: two sets have this name; names must be distinct")
        seen.add(s.name)
        if not s.data:
            raise ConfigError(f"{where}.data: the set's table of image paths and captions is required")
        if bool(s.split_file) != bool(s.split):
            raise ConfigError(f"{where}: give split_file and split together (the split file, and the split to evaluate)")
        names = [t.name for t in s.zeroshot]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.zeroshot: task names must be distinct, got {names}")
        if not s.zeroshot and not s.retrieval:
            raise ConfigError(f"{where}: evaluates nothing; give zero-shot tasks or leave retrieval on")


def _method_name(layers: list[tuple[str, DictConfig]]) -> str:
    name = "finetune"
    for _, layer in layers:
        value = OmegaConf.select(layer, "method.name", default=None)
        if value is not None:
            name = str(value)
    return name


def _without_method_keys(layer: DictConfig, file_method: str, schema: RunConfig) -> DictConfig:
    """``layer`` without the ``method`` keys of the recipe's own method (``file_method``) that
    the method chosen on the command line does not have: running a recipe with another
    method (``method.name=finetune`` as its baseline) keeps everything else."""
    section = layer.get("method") if isinstance(layer, DictConfig) else None
    if not isinstance(section, DictConfig):
        return layer
    known = {f.name for f in dataclasses.fields(schema.method)}
    dropped = sorted(str(k) for k in section if k not in known)
    if not dropped:
        return layer
    logging.getLogger(__name__).info("method.name overridden: leaving out method %s's keys %s", file_method, dropped)
    layer = layer.copy()
    for key in dropped:
        del layer.method[key]
    return layer


def compose(recipe: Optional[str | Path], overrides: Optional[list[str]] = None, check_data: bool = True) -> DictConfig:
    """Merge defaults, the recipe with its includes, and the overrides into a validated
    (structured, typed) OmegaConf config. ``check_data=False``: the data tables a run needs
    may be unset (``clipft info`` reads none)."""
    layers: list[tuple[str, DictConfig]] = []
    if recipe is not None:
        layers.extend(_read_yaml(find_recipe(recipe)))
    # include=FILE on the command line: a building block merged after the recipe, before the
    # key=value overrides (e.g. include=configs/trainer/deepspeed_zero3.yaml)
    for item in [o for o in overrides or [] if o.startswith(f"{INCLUDE_KEY}=")]:
        including = Path.cwd() / "command line"
        layers.extend(_read_yaml(_resolve_include(item.split("=", 1)[1], including), (including,)))
    overrides = [o for o in overrides or [] if not o.startswith(f"{INCLUDE_KEY}=")]
    if overrides:
        layers.append(("command-line override", _parse_overrides(overrides)))

    method = _method_name(layers)
    schema = RunConfig(method=_method_config(method)(name=method))
    cfg = OmegaConf.structured(schema)
    file_layers = layers[:-1] if overrides else layers
    file_method = _method_name(file_layers)
    if file_method != method:  # method.name changed on the command line: a baseline of the same recipe
        file_layers = [(source, _without_method_keys(layer, file_method, schema)) for source, layer in file_layers]
    for source, layer in file_layers:
        _check_keys(layer, schema, "", source)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            msg = str(err).splitlines()[0]
            raise ConfigError(f"{source}: bad value for '{key}': {msg}") from err
    for item in overrides or []:
        _apply_override(cfg, schema, item)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"could not resolve interpolation: {err}") from err
    _check_choices(cfg)
    _check_values(cfg)
    for name in cfg.run.loggers:
        if name not in LOGGERS:
            raise not_one_of("run.loggers", name, LOGGERS)
    classes = cfg.data.classes
    # The sources register when clipft.data is imported (the CLI, the runner and clipft.methods
    # do); a script that composes without it gets these checks from the data module instead.
    source = data_source(cfg.data.source) if _DATA_SOURCES else None
    for i, task in enumerate(cfg.eval.zeroshot if _DATA_SOURCES else []):
        data_source(task.source, f"eval.zeroshot[{i}].source", labelled=True)
    if classes.enabled and source is not None and not source.labelled:
        *others, last = data_source_names(labelled=True)
        raise ConfigError(f"data.classes: class-labelled data comes from {', '.join(others)} or {last} sources, "
                          f"not {cfg.data.source}")
    if classes.templates and classes.template_set:
        raise ConfigError("data.classes: give templates or template_set, not both")
    if classes.shots is not None and classes.shots < 1:
        raise ConfigError(f"data.classes.shots: must be >= 1 (or null for all images), got {classes.shots}")
    for where, task in _zeroshot_tasks(cfg):
        if task.templates and task.template_set:
            raise ConfigError(f"{where}: give templates or template_set, not both")
    _check_sets(cfg)
    if check_data and _DATA_SOURCES:
        _check_data_given(cfg)
    return cfg


def _check_data_given(cfg: DictConfig) -> None:
    """The data a run reads is named (tables, folders, shards)."""
    source = data_source(cfg.data.source)
    source.check(cfg.data)
    for i, task in enumerate(cfg.eval.zeroshot):
        if data_source(task.source).file_backed and not task.data:
            raise ConfigError(f"eval.zeroshot[{i}].data: a table or image folder is required for source={task.source}")
        if task.split_file and task.source != "synthetic":
            data_source("csv").check_split(f"eval.zeroshot[{i}].split", task.data, task.split_file, task.split,
                                           f"eval.zeroshot[{i}].split_file")
    for j, s in enumerate(cfg.eval.sets):
        if s.split_file:
            data_source("csv").check_split(f"eval.sets[{j}].split", s.data, s.split_file, s.split,
                                           f"eval.sets[{j}].split_file")
    if cfg.eval.compositional.source == "folder" and not cfg.eval.compositional.path:
        raise ConfigError("eval.compositional.path: the folder of <subset>.json files is required for source=folder")
    if source.file_backed and not cfg.data.val and (cfg.eval.zeroshot or cfg.eval.compositional.source):
        raise ConfigError(
            "eval.zeroshot / eval.compositional run in the validation loop, which needs validation pairs: "
            "set data.val (a table like data.train)"
        )
    if cfg.run.monitor.startswith("val/") and source.file_backed and not cfg.data.val:
        raise ConfigError(
            f"run.monitor={cfg.run.monitor} needs validation data: set data.val (a table like data.train), "
            "or monitor a train/ metric"
        )


def load_config(recipe: Optional[str | Path], overrides: Optional[list[str]] = None, check_data: bool = True) -> RunConfig:
    """The typed :class:`RunConfig` of a recipe plus overrides (see :func:`compose`)."""
    return to_object(compose(recipe, overrides, check_data))


def to_object(cfg: DictConfig) -> RunConfig:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (set it in the recipe or as key=value)")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RunConfig)
    obj.method.check(obj)
    return obj


def to_dict(cfg: RunConfig | DictConfig) -> dict[str, Any]:
    """Plain-Python dict (no OmegaConf objects): safe to store in a checkpoint that
    ``torch.load(weights_only=True)`` reads."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    container = OmegaConf.to_container(node, resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from :func:`to_dict` output (for example from a checkpoint)."""
    overrides_free = OmegaConf.create(data)
    method = str(OmegaConf.select(overrides_free, "method.name", default="finetune"))
    schema = OmegaConf.structured(RunConfig(method=_method_config(method)(name=method)))
    return to_object(OmegaConf.merge(schema, overrides_free))


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """The model section of a :func:`to_dict` config (a checkpoint's), whatever its method."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), data.get("model") or {})
    model = OmegaConf.to_object(merged)
    assert isinstance(model, ModelConfig)
    return model


def _method_config(name: str) -> type[MethodConfig]:
    """The settings class a method registered (the methods register when ``clipft.methods``
    is imported, which the CLI and the runner do before composing)."""
    if name not in _METHOD_CONFIGS:
        close = difflib.get_close_matches(name, list(_METHOD_CONFIGS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = ", ".join(method_names()) or "none registered: import clipft.methods first, as the CLI does"
        raise ConfigError(f"method.name: unknown method '{name}'{hint} (known: {known})")
    return _METHOD_CONFIGS[name]


def to_yaml(cfg: RunConfig | DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def peek(recipe: Optional[str | Path], overrides: list[str], key: str, default: Any = None) -> Any:
    """Read one value from recipe + overrides without validation or torch (used by the CLI
    for settings that must be applied before torch is imported). Errors are left to
    :func:`compose`."""
    value = default
    try:
        layers = _read_yaml(find_recipe(recipe)) if recipe is not None else []
        layers.append(("overrides", _parse_overrides(overrides)))
    except ConfigError:
        return default
    for _, layer in layers:
        found = OmegaConf.select(layer, key, default=None)
        if found is not None:
            value = found
    return value
