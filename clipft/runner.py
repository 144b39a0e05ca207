"""Turn a RunConfig into a run: run folder, data, model, method, callbacks, Trainer.

The CLI verbs are thin wrappers around :func:`fit`, :func:`validate` and :func:`info`;
notebooks and tests call these directly.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import functools
import logging
import math
import os
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import lightning as L
import torch
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy

from clipft import cluster
from clipft.config import ConfigError, RunConfig, lightning_precision, to_dict, to_yaml
from clipft.data.datamodule import ImageTextDataModule
from clipft.data.sources import source
from clipft.eval.callbacks import BaseToNovelCallback, CompositionalCallback, GapCallback, RetrievalCallback, RunReport, ValidationFeatures, ZeroShotCallback
from clipft.eval.compositional import GROUPS, SUBSETS, load_benchmark, write_synthetic_benchmark
from clipft.eval.gap import GAP_METRICS
from clipft.eval.plots import plot_training_curves
from clipft.eval.sets import EvalSetsCallback, build_eval_set, set_metric_names
from clipft.eval.tasks import build_zeroshot_task
from clipft.loggers import (RecipeAsHyperparameters, TrackingRunsInCheckpoint, build_loggers, check_installed, log_plots,
                            progress_bar, quiet_lightning)
from clipft.loggers import close as close_loggers
from clipft.logs import LoggedRowsInCheckpoint, logged_rows
from clipft.methods import ContrastiveMethod, build_method
from clipft.methods.guard import DivergenceGuard
from clipft.preemption import Preempted, StopOnSignal
from clipft.strategies import build_strategy
from clipft.models import ModelBundle, build_model, count_parameters, labelled, load_pretrained_file, read_training_state
from clipft.models.checkpoint_io import trusting
from clipft.models.factory import compile_towers

log = logging.getLogger("clipft")
RUN_DIR_ENV = "CLIPFT_RUN_DIR"

# Lightning notices that are irrelevant for clipft runs (a resumed run reuses its folder).
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# a locked tower is in eval mode on purpose (dropout off)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# the training sampler itself resumes mid-epoch (datamodule.TrainingOrder), from the global step
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
# a shard stream's length is exact: every rank and worker follows one plan (data/shards.py)
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
quiet_lightning()  # Lightning's tips and notes nobody asked for (clipft/loggers.py)

def apply_threads(cfg: RunConfig) -> int:
    """torch intra-op threads for CPU work (``run.threads``; 0 = the cores this process may
    use, shared out between the processes of a multi-process CPU run)."""
    n = cfg.run.threads
    if n == 0:
        per_node = os.environ.get("LOCAL_WORLD_SIZE")
        if per_node is None and cfg.trainer.accelerator == "cpu" and isinstance(cfg.trainer.devices, int):
            per_node = str(cfg.trainer.devices)
        n = max(1, len(os.sched_getaffinity(0)) // max(1, int(per_node or 1)))
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------ run folder


def _checkpoint_step(ckpt: Optional[Path]) -> Optional[int]:
    if ckpt is None or Path(ckpt).suffix == ".safetensors":
        return None
    step = read_training_state(ckpt).get("global_step")  # a .ckpt file or a DeepSpeed folder
    return int(step) if step is not None else None


def _last_ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def resolve_resume(cfg: RunConfig) -> tuple[Optional[Path], Optional[Path]]:
    """(run folder to continue, checkpoint to resume from). The run folder is None for a new
    run, and for a checkpoint that does not sit in a clipft run folder: that one starts a new
    run folder (clipft writes only into run folders it made), which records where it resumed
    from."""
    resume = cfg.run.resume
    if not resume:
        return None, None
    if resume == "last":
        root = Path(cfg.run.out_dir) / cfg.run.name
        candidates = sorted((p for p in root.glob("*/checkpoints/last.ckpt")), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(
                f"run.resume=last: no run named '{cfg.run.name}' with a checkpoints/last.ckpt under {root}"
            )
        run_dir = candidates[-1].parent.parent
        return run_dir, _newest_checkpoint(run_dir)
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():
        if not _last_ckpt(path).exists():
            raise FileNotFoundError(f"run.resume: {path} has no checkpoints/last.ckpt")
        return path, _newest_checkpoint(path)
    if path.is_file() or (path / "latest").is_file():  # a checkpoint file or DeepSpeed folder
        return _run_dir_of(path), path
    if path.is_dir():
        raise FileNotFoundError(
            f"run.resume: '{resume}' is a folder but neither a run folder (with checkpoints/) nor a DeepSpeed "
            "checkpoint (with a 'latest' file)"
        )
    raise FileNotFoundError(f"run.resume: '{resume}' not found (give 'last', a run folder or a checkpoint)")


def _run_dir_of(checkpoint: Path) -> Optional[Path]:
    """The clipft run folder a checkpoint belongs to (``<run>/checkpoints/*.ckpt``, or the
    ``hpc_ckpt_*.ckpt`` Lightning writes into the run folder on pre-emption), or None."""
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        if folder.name != "checkpoints" and (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
            if checkpoint.parent.name == "checkpoints" or checkpoint.name.startswith("hpc_ckpt_"):
                return folder
    return None


def _newest_checkpoint(run_dir: Path) -> Path:
    """checkpoints/last.ckpt, or the checkpoint Lightning saved on SLURM's pre-emption signal
    (``hpc_ckpt_<n>.ckpt`` in the run folder) when that one is further on."""
    preempted = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    if not preempted:  # the usual case: no checkpoint to read
        return _last_ckpt(run_dir)
    return max([_last_ckpt(run_dir), *preempted], key=lambda c: _checkpoint_step(c) or -1)


def new_run_dir(cfg: RunConfig) -> Path:
    """A new folder ``out_dir/name/<time>``, created here: two runs started in the same second
    get ``<time>`` and ``<time>-1``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.out_dir) / cfg.run.name / stamp
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        run_dir, n = base, 1
        while True:
            try:
                run_dir.mkdir()  # atomic: fails if another process took the name first
                return run_dir
            except FileExistsError:
                run_dir, n = base.with_name(f"{stamp}-{n}"), n + 1
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(
            f"run.out_dir: cannot create the run folder under '{cfg.run.out_dir}' ({reason}); "
            "set run.out_dir to a folder you can write to"
        ) from err


def _remove_if_unused(run_dir: Path) -> None:
    """After a new run failed before its first checkpoint: remove its folder when nothing in it
    helps (no metrics logged), else keep it and say so. Only the process that made it does this."""
    if any((run_dir / "checkpoints").glob("*")) or not run_dir.is_dir():
        return
    metrics = run_dir / "metrics.csv"
    if metrics.is_file() and len(metrics.read_text().splitlines()) > 1:
        log.error("the run failed before its first checkpoint; its config and metrics are kept in %s", run_dir)
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _write_config(run_dir: Path, cfg: RunConfig, resumed: bool) -> None:
    """config.yaml of a new run; a resumed run keeps it, writes config.resumed.yaml and warns
    about what changed (a changed max_steps reshapes the learning-rate schedule)."""
    text = to_yaml(cfg)
    original = run_dir / "config.yaml"
    if not resumed or not original.is_file():
        original.write_text(text)
        return
    (run_dir / "config.resumed.yaml").write_text(text)
    from omegaconf import OmegaConf

    before = _flatten(OmegaConf.to_container(OmegaConf.load(original)))
    after = _flatten(to_dict(cfg))
    changed = sorted(k for k, v in after.items() if v != before.get(k) and k not in ("run.resume", "run.trust_checkpoint"))
    if changed:
        log.warning("resuming with a changed config (see config.resumed.yaml): %s", ", ".join(changed))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_monitor(cfg: RunConfig, method: ContrastiveMethod) -> None:
    """``run.monitor`` must name a metric the run logs (else Lightning fails after training)."""
    names = {"val/loss", "train/loss", "train/logit_scale"} | {f"train/{t}" for t in method.loss_term_names}
    if cfg.eval.retrieval.enabled:
        ks = cfg.eval.retrieval.ks
        names |= {f"val/retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in ks}
        names |= {"val/retrieval/mean_r1"} if 1 in ks else set()
    names |= {f"val/zeroshot/{t.name}/{m}" for t in cfg.eval.zeroshot for m in ("top1", "top5", "mean_per_class_recall")}
    if cfg.eval.gap:
        names |= {f"val/gap/{m}" for m in GAP_METRICS}
    names |= set_metric_names(cfg)
    if cfg.eval.compositional.source is not None:
        names |= {f"val/compositional/{m}" for m in (*SUBSETS, *GROUPS)}
    if cfg.eval.base_to_novel and source(cfg.data.source).has_classes(cfg.data):
        names |= {f"val/base_to_novel/{m}" for m in ("base", "novel", "hm")}
    if cfg.run.monitor not in names:
        close = difflib.get_close_matches(cfg.run.monitor, sorted(names), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"run.monitor: '{cfg.run.monitor}' is not a metric of this run{hint} (metrics: {', '.join(sorted(names))})")


# ------------------------------------------------------------------ assembling a run


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    bundle: ModelBundle
    datamodule: ImageTextDataModule
    method: ContrastiveMethod
    trainer: L.Trainer
    report: RunReport
    resume_from: Optional[Path] = None
    resume_step: int = 0
    made_run_dir: bool = False  # this process created the run folder (a new run)
    extra: dict[str, Any] = field(default_factory=dict)


class LoggerStepIsGlobalStep(L.Callback):
    """Logged rows carry the global step. Lightning keeps a separate logger-step counter that,
    restored from a checkpoint saved at the end of a validation, runs one ahead; keeping it
    equal to the global step makes a resumed run's metrics.csv continue the same step numbers."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


class StepTimes(L.Callback):
    """Where a run's time goes, for report.json's ``timing`` section: the wall time between
    consecutive optimizer steps (data wait included; the first step — warm-up, compilation —
    and evaluation left out), the share of it spent waiting for a batch, samples per second,
    the evaluation time, and the peak GPU memory. No device sync: on a GPU the host runs ahead
    by a bounded queue, so the intervals' median is the steady-state step time. The progress
    bar reads :attr:`samples_per_s`."""

    def __init__(self, report: RunReport) -> None:
        self.report = report
        self.last: Optional[float] = None  # end of the previous optimizer step (or of an evaluation)
        self.batch_end: Optional[float] = None
        self.step_at_last: Optional[int] = None  # the global step at the last optimizer step
        self.times: list[float] = []  # seconds per optimizer step
        self.waits: list[float] = []  # seconds waiting for batches, per optimizer step
        self.wait = 0.0
        self.samples = 0  # samples per optimizer step, all processes
        self.first_step_s: Optional[float] = None
        self.eval_s = 0.0
        self.eval_start: Optional[float] = None

    @property
    def samples_per_s(self) -> Optional[float]:
        recent = self.times[-20:]
        return self.samples * len(recent) / sum(recent) if recent and sum(recent) > 0 else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step_at_last = trainer.global_step  # a resumed run starts at its checkpoint's step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.last = now
        elif self.batch_end is not None:
            self.wait += now - self.batch_end  # fetching the batch happens between the hooks

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.batch_end = now
        if trainer.global_step == self.step_at_last:  # gradient accumulation: not an optimizer step yet
            return
        interval = now - (now if self.last is None else self.last)
        if self.first_step_s is None:
            self.first_step_s = interval
        else:
            self.times.append(interval)
            self.waits.append(self.wait)
        self.samples = len(batch.images) * trainer.world_size * trainer.accumulate_grad_batches
        self.step_at_last, self.last, self.wait = trainer.global_step, now, 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.eval_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        self.eval_s += now - (now if self.eval_start is None else self.eval_start)
        if self.last is not None:  # the next step is timed from here: evaluation is not a step
            self.last = self.batch_end = now

    def timing(self, train_s: float, steps: int, device: torch.device) -> dict[str, Any]:
        timing: dict[str, Any] = {"train_s": round(train_s, 2), "steps": steps, "eval_s": round(self.eval_s, 2)}
        if self.first_step_s is not None:
            timing["first_step_s"] = round(self.first_step_s, 4)
        if self.times:
            ordered = sorted(self.times)
            median = statistics.median(ordered)
            timing |= {
                "step_s_median": round(median, 4),
                "step_s_p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
                "samples_per_s": round(self.samples / median, 1) if median > 0 else None,
                "data_wait_fraction": round(sum(self.waits) / sum(self.times), 4) if sum(self.times) > 0 else None,
            }
        if device.type == "cuda":
            timing["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        return timing

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.times:
            self.report.extra["step_time_s"] = round(statistics.median(self.times), 4)
        device = trainer.strategy.root_device
        if device.type == "cuda":
            self.report.extra["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)


def build_callbacks(
    cfg: RunConfig, bundle: ModelBundle, run_dir: Optional[Path] = None, datamodule: Optional[ImageTextDataModule] = None
) -> list[L.Callback]:
    features = ValidationFeatures()  # one encoding pass, shared by retrieval and gap
    callbacks: list[L.Callback] = [features]
    if cfg.eval.retrieval.enabled:
        callbacks.append(RetrievalCallback(features, cfg.eval.retrieval.ks))
    if cfg.eval.gap:
        callbacks.append(GapCallback(features, run_dir / "gap.png" if run_dir else None, seed=cfg.run.seed))
    comp = cfg.eval.compositional
    if comp.source is not None:
        if comp.source == "synthetic":
            cache = Path(cfg.run.out_dir) / ".cache" / f"compositional-synthetic-{comp.size}-{cfg.run.seed}-{cfg.data.synthetic.image_size}"
            folder = write_synthetic_benchmark(cache, comp.size, cfg.run.seed, cfg.data.synthetic.image_size)
        else:
            folder = Path(comp.path or "")
        subsets = load_benchmark(folder, comp.image_root)
        callbacks.append(CompositionalCallback(subsets, bundle.preprocess_val, batch_size=cfg.eval.batch_size))
    if cfg.eval.zeroshot:
        image_size = cfg.data.synthetic.image_size
        tasks = [
            build_zeroshot_task(t, bundle.preprocess_val, cfg.run.seed, image_size, cfg.data.separator)
            for t in cfg.eval.zeroshot
        ]
        callbacks.append(ZeroShotCallback(tasks, batch_size=cfg.eval.batch_size))
    if cfg.eval.sets:
        sets = [build_eval_set(s, cfg.data, bundle.preprocess_val, cfg.run.seed) for s in cfg.eval.sets]
        callbacks.append(EvalSetsCallback(sets, cfg.eval.retrieval.ks, batch_size=cfg.eval.batch_size))
    if cfg.eval.base_to_novel and datamodule is not None and datamodule.classes is not None and datamodule.val_fetch:
        classes = datamodule.classes
        callbacks.append(BaseToNovelCallback(
            datamodule.class_validation_set(), classes.names, classes.templates, classes.base, classes.novel,
            datamodule.train_classes, batch_size=cfg.eval.batch_size,
        ))
    return callbacks


def build_run(cfg: RunConfig, stage: str = "fit", run_dir: Optional[Path] = None) -> Run:
    """Everything a run needs, with bad input failing first: data sources are read and
    checked before the model is built; the model before the Trainer."""
    check_installed(cfg)  # run.loggers' packages, before a folder or a model is made
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    apply_threads(cfg)
    launcher = cluster.launcher_environment()
    if launcher is not None and cluster.start_process_group(launcher, cfg):
        # torchrun / srun started every process: rank 0 chooses the folder, every rank checks it sees it
        run_dir, resume_ckpt, made = cluster.agree(lambda: _choose_run_dir(cfg, stage, run_dir))
        rank = launcher.global_rank()
        made = made and rank == 0
        try:
            cluster.check_visible(run_dir)
        except ConfigError:
            if made:
                _remove_if_unused(run_dir)
            raise
    else:
        resume_dir, resume_ckpt = resolve_resume(cfg) if stage == "fit" else (None, None)
        # Processes that Lightning starts for DDP re-run this command: they inherit the folder.
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        shared = os.environ.get(RUN_DIR_ENV) if rank != 0 else None
        made = not (run_dir or resume_dir or shared)
        run_dir = run_dir or resume_dir or (Path(shared) if shared else new_run_dir(cfg))
        os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        # continuing: a resume in its own run folder (a checkpoint from elsewhere starts a new one)
        run = _assemble_run(cfg, stage, run_dir, resume_ckpt, continuing=resume_ckpt is not None and not made,
                            rank_zero=rank == 0, launcher=launcher)
    except BaseException:
        if made:
            _remove_if_unused(run_dir)
        raise
    run.made_run_dir = made
    return run


def _choose_run_dir(cfg: RunConfig, stage: str, run_dir: Optional[Path]) -> tuple[Path, Optional[Path], bool]:
    """(run folder, checkpoint to resume from, whether the folder is new): the given folder,
    the run that run.resume names, or a new timestamped folder."""
    resume_dir, resume_ckpt = resolve_resume(cfg) if stage == "fit" else (None, None)
    chosen = run_dir or resume_dir
    return (chosen, resume_ckpt, False) if chosen else (new_run_dir(cfg), resume_ckpt, True)


def _assemble_run(
    cfg: RunConfig, stage: str, run_dir: Path, resume_ckpt: Optional[Path], continuing: bool = False,
    rank_zero: bool = True, launcher: Optional[ClusterEnvironment] = None,
) -> Run:
    launcher_name = cluster.launcher_name(launcher)
    bundle = build_model(cfg.model)
    datamodule = ImageTextDataModule(
        cfg.data, bundle.preprocess_train, bundle.preprocess_val, bundle.tokenizer, seed=cfg.run.seed
    )
    datamodule.prepare_sources()
    if stage == "fit" and cfg.data.hard_images > 0:
        model = bundle.model
        was_training = model.training
        model.eval()
        datamodule.hard_image_candidates(model.encode_image, cfg.data.hard_images, Path(cfg.run.out_dir) / ".cache",
                                         model_key=(cfg.model.name, cfg.model.pretrained))
        model.train(was_training)
    callbacks = build_callbacks(cfg, bundle, run_dir, datamodule)
    method = build_method(cfg, bundle)
    if stage == "fit":
        check_monitor(cfg, method)
        if cfg.trainer.compile:  # after the method took its frozen copies / EMA of the eager model
            log.info("trainer.compile: compiling %s", ", ".join(compile_towers(method.model)))

    with labelled("run.resume"):
        resume_state = read_training_state(resume_ckpt) if resume_ckpt is not None and resume_ckpt.suffix != ".safetensors" else {}
    resume_step = resume_state.get("global_step")
    datamodule.resume_batches = int(resume_step or 0) * cfg.trainer.accumulate_grad_batches
    position = (resume_state.get(type(datamodule).__qualname__) or {}).get("train_position")
    datamodule.resume_position = (int(position[0]), int(position[1])) if position is not None else None
    if rank_zero:  # the other ranks write nothing here (Lightning's loggers and checkpoints: rank 0 too)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, cfg, resumed=resume_ckpt is not None)
    report = RunReport(
        run_dir / "report.json",
        extra={
            "run_dir": str(run_dir),
            "method": cfg.method.name,
            "model": cfg.model.name,
            "parameters": count_parameters(bundle.model),
            # everything the optimizer trains, the method's own parameters (MMRL's tokens) included
            "trainable_parameters": sum(p.numel() for p in method.parameters() if p.requires_grad),
            "data": datamodule.summary(),
            "val_batch_size": cfg.data.val_batch_size or cfg.data.batch_size,
        },
    )
    ckpt_dir = run_dir / "checkpoints"
    if stage == "fit":
        callbacks += [
            DivergenceGuard.from_config(cfg, _last_ckpt(run_dir)),  # no non-finite step, no non-finite save
            # best.ckpt by run.monitor; last.ckpt after every validation and every
            # run.checkpoint_every_n_steps steps, saved inside the training loop so that a
            # resume continues exactly where it stopped.
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="best", monitor=cfg.run.monitor, mode=cfg.run.monitor_mode,
                save_top_k=1, save_last=True, enable_version_counter=False, auto_insert_metric_name=False,
            ),
            ModelCheckpoint(
                dirpath=ckpt_dir, every_n_train_steps=cfg.run.checkpoint_every_n_steps, save_top_k=0, save_last=True,
                enable_version_counter=False,
            ),
            LearningRateMonitor(logging_interval="step"),
            StopOnSignal(_last_ckpt(run_dir), requeue=cfg.trainer.slurm_requeue and launcher_name == "slurm"),
        ]
    callbacks += [report, LoggerStepIsGlobalStep(), LoggedRowsInCheckpoint(), TrackingRunsInCheckpoint(),
                  RecipeAsHyperparameters(cfg, log_now=not continuing)]
    times = StepTimes(report) if stage == "fit" else None
    callbacks += [times] if times else []
    callbacks += progress_bar(cfg, rate=(lambda: times.samples_per_s) if times else None)
    t = cfg.trainer
    optional = {
        k: v
        for k, v in dict(
            max_epochs=t.max_epochs, val_check_interval=t.val_check_interval,
            limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
            gradient_clip_val=t.gradient_clip_val,
        ).items()
        if v is not None
    }
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t),
        precision=lightning_precision(t.precision),  # type: ignore[arg-type]
        max_steps=t.max_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        num_sanity_val_steps=t.num_sanity_val_steps,
        log_every_n_steps=t.log_every_n_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=build_loggers(cfg, run_dir, continuing, resume_state, logged_rows(resume_state), resume_step),
        enable_autolog_hparams=False,  # the recipe is logged once per run (RecipeAsHyperparameters)
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        enable_model_summary=False,
        use_distributed_sampler=False,  # the data module shards per rank (ImageTextDataModule._loader)
        plugins=[launcher] if launcher is not None else None,  # SLURM's without Lightning's requeue handler
        **optional,
    )
    _bound_epochs_by_steps(trainer, cfg, datamodule, int(resume_state.get("epoch", 0)), int(resume_step or 0))
    report.extra.update(world_size=trainer.world_size, num_nodes=trainer.num_nodes, launcher=launcher_name)
    return Run(cfg, run_dir, bundle, datamodule, method, trainer, report, resume_from=resume_ckpt, resume_step=resume_step or 0)


def _bound_epochs_by_steps(
    trainer: L.Trainer, cfg: RunConfig, datamodule: ImageTextDataModule, start_epoch: int = 0, start_step: int = 0
) -> None:
    """With max_steps and no max_epochs, Lightning trains "forever" bounded by steps and
    shows "Epoch 0/-2". Set the number of epochs those steps take instead. The per-rank
    batch count is a lower bound (samples split over ranks, last batch dropped), so the
    epoch bound is never what stops the run. A resumed run counts from the epoch and step it
    resumes at, with one epoch to spare (it may re-enter mid-epoch, on another device count)."""
    t = cfg.trainer
    if t.max_steps <= 0 or t.max_epochs is not None or t.limit_train_batches is not None:
        return
    batches = datamodule.train_size() // (cfg.data.batch_size * trainer.world_size)
    if batches > 0:
        remaining = math.ceil(max(0, t.max_steps - start_step) * t.accumulate_grad_batches / batches)
        trainer.fit_loop.max_epochs = start_epoch + remaining + (1 if start_step else 0)


# ------------------------------------------------------------------ verbs

Verb = TypeVar("Verb", bound=Callable[..., Any])


def _reads_checkpoints(verb: Verb) -> Verb:
    """Every checkpoint the verb reads trusts as ``cfg.run.trust_checkpoint`` says, for this
    call only (docs/safety.md)."""

    @functools.wraps(verb)
    def run(cfg: RunConfig, *args: Any, **kwargs: Any) -> Any:
        with trusting(cfg.run.trust_checkpoint):
            return verb(cfg, *args, **kwargs)

    return run  # type: ignore[return-value]


@_reads_checkpoints
def fit(cfg: RunConfig) -> dict[str, Any]:
    """Train, validate at the end if the last step was not validated, save the last
    checkpoint, write report.json and the training curves. Returns the report."""
    run = build_run(cfg, "fit")
    with _removed_if_failed(run), cluster.explain_lost_process(run.trainer.world_size, run.run_dir, cfg.trainer.collective_timeout_s):
        return _fit(run)


@contextlib.contextmanager
def _removed_if_failed(run: Run) -> Iterator[None]:
    """A new run that fails before its first checkpoint leaves no empty folder behind."""
    try:
        yield
    except BaseException:
        if run.made_run_dir:
            _remove_if_unused(run.run_dir)
        raise


def _fit(run: Run) -> dict[str, Any]:
    cfg, trainer = run.cfg, run.trainer
    start = time.perf_counter()
    step_at_start = run.resume_step
    if run.resume_from is not None:
        log.info("resuming from %s", run.resume_from)
    try:
        trainer.fit(run.method, datamodule=run.datamodule, ckpt_path=str(run.resume_from) if run.resume_from else None,
                    weights_only=not cfg.run.trust_checkpoint)  # a .ckpt; DeepSpeed reads through clipft.strategies
    except Preempted as stop:  # checkpoint saved at a step boundary: no final validation, report and go
        run.report.extra.update(preempted={"signal": stop.signame, "step": stop.step}, steps=stop.step,
                                last_checkpoint=os.path.relpath(stop.checkpoint, run.run_dir),
                                resumed_from=str(run.resume_from) if run.resume_from else None)
        run.report.write(trainer)
        return _with_paths(run, {**run.report.extra, "metrics": run.report.metrics})
    train_time = time.perf_counter() - start
    validated = run.report.extra.get("global_step") != trainer.global_step
    last = _last_ckpt(run.run_dir)
    # DeepSpeed's validate() outside fit rebuilds the engine for inference, without the optimizer:
    # a checkpoint saved after it would lack the training state, so save before it there.
    inference_engine = validated and isinstance(trainer.strategy, DeepSpeedStrategy)
    if inference_engine and trainer.strategy.broadcast(_checkpoint_step(last if last.exists() else None) != trainer.global_step):
        trainer.save_checkpoint(last)
    if validated:
        trainer.validate(run.method, datamodule=run.datamodule, verbose=False)
    # saved again after a final validation too, so that it records the metrics rows logged
    stale = (validated and not inference_engine) or _checkpoint_step(last if last.exists() else None) != trainer.global_step
    if trainer.strategy.broadcast(stale):  # rank 0 decides; every rank joins the save
        trainer.save_checkpoint(last)  # the run ended between checkpoints (a full checkpoint: weights and training state)
    best = next((c.best_model_path for c in trainer.checkpoint_callbacks if c.monitor), "")  # type: ignore[attr-defined]
    run.report.extra.update(  # paths relative to the run folder
        best_checkpoint=os.path.relpath(best, run.run_dir) if best else None,
        last_checkpoint=os.path.relpath(last, run.run_dir),
        train_time_s=round(train_time, 1),
        steps=trainer.global_step,
        resumed_from=str(run.resume_from) if run.resume_from else None,
        threads=torch.get_num_threads(),
        nonfinite_skipped_steps=next(c.skipped_steps for c in trainer.callbacks if isinstance(c, DivergenceGuard)),
    )
    if run.datamodule.train_shards is not None:  # bad samples met while streaming, over all ranks
        skipped = trainer.strategy.reduce(torch.tensor(float(run.datamodule.skipped_samples), device=trainer.strategy.root_device), reduce_op="sum")
        run.report.extra["data"]["train_skipped_samples"] = int(skipped.item())
    if trainer.global_step > step_at_start and train_time > 0:
        run.report.extra["steps_per_s"] = round((trainer.global_step - step_at_start) / train_time, 2)
    times = next(c for c in trainer.callbacks if isinstance(c, StepTimes))
    run.report.extra["timing"] = times.timing(train_time, trainer.global_step - step_at_start, trainer.strategy.root_device)
    run.report.write(trainer)
    curves = None
    if cfg.run.plot and trainer.is_global_zero:
        curves = plot_training_curves(run.run_dir / "metrics.csv", run.run_dir / "curves.png", title=f"{cfg.run.name}")
    log_plots(trainer, {"curves": curves, "gap": run.run_dir / "gap.png"})
    close_loggers(trainer)
    return _with_paths(run, {**run.report.extra, "metrics": run.report.metrics})


def _with_paths(run: Run, report: dict[str, Any]) -> dict[str, Any]:
    """The report as returned to a caller: its checkpoint paths joined with the run folder
    (report.json keeps them relative, so a moved run folder stays consistent)."""
    for key in ("best_checkpoint", "last_checkpoint"):
        if report.get(key):
            report[key] = str(run.run_dir / report[key])
    return report


@_reads_checkpoints
def validate(cfg: RunConfig, ckpt: Optional[str] = None) -> dict[str, Any]:
    """Evaluate the recipe's model (``model.pretrained``), or a clipft checkpoint, with the
    recipe's evaluation; writes report.json in a new run folder."""
    if ckpt and not Path(ckpt).exists():  # a file, or a DeepSpeed checkpoint folder
        raise FileNotFoundError(f"--ckpt: checkpoint '{ckpt}' not found")
    run = build_run(cfg, "validate")
    with _removed_if_failed(run):
        return _validate(run, ckpt)


def _validate(run: Run, ckpt: Optional[str]) -> dict[str, Any]:
    cfg = run.cfg
    label = f"{cfg.model.name} ({cfg.model.pretrained or 'random init'})"
    if ckpt:
        load_pretrained_file(run.method.model, ckpt, label="--ckpt")  # names missing / mismatched keys
        run.method.load_method_state(Path(ckpt))  # a classifier's head
        step = _checkpoint_step(Path(ckpt))
        run.report.extra.update(checkpoint=str(ckpt), checkpoint_step=step)
        label = f"checkpoint, step {step}" if step is not None else "checkpoint"
    for callback in run.trainer.callbacks:
        if isinstance(callback, GapCallback):
            callback.label = label
    run.trainer.validate(run.method, datamodule=run.datamodule, verbose=False)
    run.report.extra.pop("epoch", None)
    run.report.extra["global_step"] = run.report.extra.get("checkpoint_step") or 0  # the model's, not this run's
    run.report.write(run.trainer)
    log_plots(run.trainer, {"gap": run.run_dir / "gap.png"})
    close_loggers(run.trainer)
    return {**run.report.extra, "metrics": run.report.metrics}


def info(cfg: RunConfig, gpu_memory: Optional[float] = None) -> dict[str, Any]:
    """Resolved config, parameter counts (the model's, as the method trains it, and the
    method's own) and the memory estimate per device, from the model's structure on the meta
    device: no weights are allocated or loaded, no data is read."""
    from clipft.memory import count_method, report_lines

    bundle = build_model(cfg.model, meta=True)
    with torch.device("meta"):
        method = build_method(cfg, bundle)
    counts = count_parameters(bundle.model)
    own = [p for n, p in method.named_parameters() if not n.startswith("model.")]
    if own:
        counts["method"] = {"total": sum(p.numel() for p in own), "trainable": sum(p.numel() for p in own if p.requires_grad)}
    return {"config": to_dict(cfg), "parameters": counts, "memory": report_lines(cfg, count_method(method), gpu_memory)}
