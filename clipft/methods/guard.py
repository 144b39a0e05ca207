"""Divergence guard: a run whose loss or gradients go non-finite stops at that step (or skips
it) and never writes a checkpoint with non-finite weights, so ``checkpoints/last.ckpt`` keeps
the last good state to resume from (docs/divergence.md).

What is checked, and how every rank reaches the same decision without a collective per step:

* each loss term (``ContrastiveMethod.step_terms``) and the total, on the device, before each
  backward;
* the gradient norm before each optimizer step. Under DDP the gradients are all-reduced by
  then, so the norm, and its verdict, are the same on every rank: a NaN loss on one rank makes
  every rank's gradients NaN;
* under DeepSpeed ZeRO the gradients live inside the engine, whose reported norm cannot show a
  NaN (it masks each group's non-finite norm as -1), so the weights are checked after its
  step: replicated under ZeRO-1/2 (the same verdict on every rank), a rank's own shard under
  ZeRO-3 (agreed at the next validation or save). ``stop`` works under every stage; ``skip``
  cannot (the update is applied by then), and config validation refuses it;
* before a validation and before a checkpoint is written: every weight (a rank's shard under
  ZeRO-3), EMA weight and (for a save) optimizer state, agreed across ranks with one
  all-reduce (both are rare). This also catches a term that went non-finite on one rank only
  while the gradients stayed finite.

Cost per step: one pass over the gradients (DeepSpeed: the local weights) and a few scalar
kernels, no collective. In ``stop`` mode the verdict is copied to the host without blocking
and read at the next batch, validation or save (no host sync in the step); ``skip`` must know
before the optimizer step, so it reads the verdict at once (one host sync per step).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor

from clipft.config import PRECISION, RunConfig
from clipft.models import read_training_state

log = logging.getLogger("clipft")
LOSS = "train/loss"


class DivergenceError(RuntimeError):
    """Training went non-finite; the message names the step, the term, the checkpoint to
    resume from and what to change."""


@dataclass
class _Verdict:
    """One optimizer step's result, still on the device: whether to stop, and which loss terms
    were non-finite on this rank (read only when the step went wrong)."""

    step: int
    bad: Tensor
    terms: Tensor
    otherwise: str  # what went non-finite when no loss term did
    ready: Optional[torch.cuda.Event] = None  # the copy of ``bad`` to the host is done

    def is_bad(self) -> bool:
        if self.ready is not None:
            self.ready.synchronize()  # waits for the backward, not for the optimizer step
        return bool(self.bad)


class DivergenceGuard(L.Callback):
    """Stops (``on_nonfinite="stop"``) or drops the update of (``"skip"``, at most
    ``patience`` steps in a row) a step with a non-finite loss term or gradient norm, and
    refuses to save non-finite weights. ``last_checkpoint`` is the file a stopped run names
    to resume from; ``hint`` says what to change."""

    def __init__(self, on_nonfinite: str = "stop", patience: int = 5,
                 last_checkpoint: Optional[Path] = None, hint: str = "") -> None:
        self.on_nonfinite = on_nonfinite
        self.patience = patience
        self.last_checkpoint = last_checkpoint
        self.hint = hint
        self.skipped_steps = 0
        self._in_a_row = 0
        self._names: tuple[str, ...] = ()
        self._terms: Optional[Tensor] = None  # non-finite terms since the last optimizer step
        self._unseen: Optional[Tensor] = None  # a rank's own finding (a term, a ZeRO-3 shard) not agreed yet
        self._pending: Optional[_Verdict] = None
        self._host: Optional[Tensor] = None  # pinned buffer the verdict is copied into

    @classmethod
    def from_config(cls, cfg: RunConfig, last_checkpoint: Path) -> "DivergenceGuard":
        return cls(cfg.run.on_nonfinite, cfg.run.nonfinite_patience, last_checkpoint, divergence_hint(cfg))

    # ------------------------------------------------------------------ per step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._settle(trainer)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        terms = {**getattr(pl_module, "step_terms", {}), LOSS: loss}
        bad = ~torch.isfinite(torch.stack([value.detach().float().reshape(()) for value in terms.values()]))
        names = tuple(terms)
        # gradient accumulation: a term counts if it was non-finite in any micro-batch
        self._terms = bad if self._terms is None or names != self._names else self._terms | bad
        self._names = names

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            return  # the gradients are inside the engine: judged after its step
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # with fp16's loss scaler, overflowing gradients are routine: the scaler skips those steps
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        agreed = None if scaled or not grads else ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        verdict = self._verdict(trainer, agreed, trainer.global_step, "gradient norm")
        if self.on_nonfinite == "skip":
            self._skip_or_continue(trainer, verdict, optimizer)
        else:
            self._defer(verdict)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """DeepSpeed: judge the step by what it wrote. ZeRO's own gradient norm cannot tell (it
        masks each parameter group's non-finite norm as -1, and reports the norm of those), so
        look at the weights: after a ZeRO-1/2 step every rank holds all of them (the same
        verdict everywhere); under ZeRO-3 a rank holds its shard, and the ranks agree at the
        next validation or save."""
        if not isinstance(trainer.strategy, DeepSpeedStrategy) or self._terms is None:
            return
        nonfinite = ~_all_finite(list(_local_weights(pl_module)))
        step = trainer.global_step - 1  # the step just taken
        what = "the weights after the optimizer step"
        if trainer.strategy.zero_stage_3:
            self._defer(self._verdict(trainer, None, step, what, local=nonfinite))
        else:
            self._defer(self._verdict(trainer, nonfinite, step, what))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer)
        self._agree(trainer, pl_module, [], "at a validation")  # non-finite weights would fail there with a traceback

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer)

    def _verdict(
        self, trainer: L.Trainer, agreed: Optional[Tensor], step: int, otherwise: str, local: Optional[Tensor] = None
    ) -> _Verdict:
        """This step's verdict, on the device. Only what is the same on every rank decides
        (``agreed``: a non-finite all-reduced gradient norm, or replicated weights); a rank's
        own findings (its loss terms, its ZeRO-3 shard) decide on one process, and otherwise
        wait for the agreement at the next validation or save."""
        device = trainer.strategy.root_device
        terms = self._terms if self._terms is not None else torch.zeros(1, dtype=torch.bool, device=device)
        self._terms = None
        bad = agreed.to(device) if agreed is not None else torch.zeros((), dtype=torch.bool, device=device)
        own = terms.any() if local is None else terms.any() | local.to(device)
        if trainer.world_size == 1:
            bad = bad | own
        unseen = own & ~bad
        self._unseen = unseen if self._unseen is None else self._unseen | unseen
        return _Verdict(step, bad, terms, otherwise)

    def _defer(self, verdict: _Verdict) -> None:
        """Keep the verdict to read at the next batch, validation or save: the copy to the host
        runs behind the step instead of stopping it."""
        if verdict.bad.is_cuda:
            if self._host is None:
                self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(verdict.bad, non_blocking=True)
            verdict.ready = torch.cuda.Event()
            verdict.ready.record()
            verdict.bad = self._host
        self._pending = verdict

    def _settle(self, trainer: L.Trainer) -> None:
        verdict, self._pending = self._pending, None
        if verdict is not None and verdict.is_bad():
            self._fail(trainer, verdict.step, self._what(trainer, verdict))

    def _skip_or_continue(self, trainer: L.Trainer, verdict: _Verdict, optimizer: Any) -> None:
        """Drop the step's update (no gradients: the optimizer leaves every parameter and its
        state as they are), or stop after ``patience`` dropped steps in a row."""
        if not verdict.is_bad():  # the host sync that skipping costs
            self._in_a_row = 0
            return
        what = self._what(trainer, verdict)
        self._in_a_row += 1
        if self._in_a_row >= self.patience:
            detail = f" ({self._in_a_row} skipped steps in a row, run.nonfinite_patience={self.patience})"
            self._fail(trainer, verdict.step, what, detail)
        optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        log.warning("step %d: %s is not finite: update skipped (%d in a row; the run stops at %d)",
                    verdict.step, what, self._in_a_row, self.patience)

    def _what(self, trainer: L.Trainer, verdict: _Verdict) -> str:
        """The non-finite terms on any rank (a collective: called where every rank agrees that
        the step went wrong), else what the verdict looked at."""
        terms = verdict.terms
        if trainer.world_size > 1:
            terms = trainer.strategy.reduce(terms.float(), reduce_op="sum") > 0
        flagged = [name for name, bad in zip(self._names, terms.tolist()) if bad]
        named = [name for name in flagged if name != LOSS]  # a term explains the total
        return ", ".join(named or flagged) or verdict.otherwise

    # ------------------------------------------------------------------ saves

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to write non-finite weights. Raising here leaves the previous checkpoint file
        as it was."""
        self._settle(trainer)
        # the optimizer's state, not the callbacks': ±inf is a valid "no best score yet"
        zero3 = _zero3_optimizer(trainer)
        states = _zero3_states(zero3) if zero3 is not None else list(_tensors(checkpoint.get("optimizer_states", [])))
        self._agree(trainer, pl_module, states, "before a save")

    def _agree(self, trainer: L.Trainer, pl_module: L.LightningModule, extra: list[Tensor], where: str) -> None:
        """Stop if any rank holds a non-finite weight (its shard under ZeRO-3), EMA weight or
        ``extra`` tensor, or has seen a non-finite loss term the others have not: one
        all-reduce, where every rank takes part anyway (a save, a validation)."""
        ema = getattr(pl_module, "ema", None)
        tensors = [*_local_weights(pl_module), *(_local_weights(ema) if ema is not None else []), *extra]
        device = trainer.strategy.root_device
        unseen = self._unseen if self._unseen is not None else torch.zeros((), dtype=torch.bool)
        flags = torch.stack([~_all_finite(tensors).to(device), unseen.to(device)]).float()
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        weights, terms = (f > 0 for f in flags.tolist())
        if weights or terms:  # found after the latest step
            what = "a weight or optimizer state" if weights else "a loss term on one rank"
            self._fail(trainer, max(trainer.global_step - 1, 0), what, f" (found {where})")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "in_a_row": self._in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._in_a_row = int(state_dict.get("in_a_row", 0))

    # ------------------------------------------------------------------ the message

    def _fail(self, trainer: L.Trainer, step: int, what: str, detail: str = "") -> None:
        message = divergence_message(step, what + " is not finite" + detail, self.last_checkpoint, self.hint)
        log.error(message)
        raise DivergenceError(message)


def divergence_hint(cfg: RunConfig) -> str:
    """What to change before training again, from the run's own settings."""
    t = cfg.trainer
    fixes = [f"lower optim.lr (now {cfg.optim.lr:g})"]
    if t.gradient_clip_val:
        fixes.append(f"lower trainer.gradient_clip_val (now {t.gradient_clip_val:g})")
    else:
        fixes.append("set trainer.gradient_clip_val (e.g. 1.0)")
    if PRECISION.get(t.precision, t.precision).startswith("16"):
        fixes.append(f"train in fp32 or amp_bf16 instead of trainer.precision={t.precision}")
    return ", ".join(fixes[:-1]) + " or " + fixes[-1]


def divergence_message(step: int, what: str, last_checkpoint: Optional[Path], hint: str) -> str:
    """One line: the step, what went wrong, the checkpoint to resume from, what to change."""
    if last_checkpoint is not None and last_checkpoint.exists():
        shown = _shown(last_checkpoint)
        saved = _saved_step(last_checkpoint)
        at = f" (step {saved})" if saved is not None else ""
        resume = f"the last good checkpoint is {shown}{at}: resume with run.resume={shown}"
    else:
        resume = "no checkpoint yet: start again"
    return f"training diverged at step {step}: {what}; {resume} after you {hint}"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(absolute)


def _saved_step(path: Path) -> Optional[int]:
    try:
        step = read_training_state(path).get("global_step")
    except Exception:  # an unreadable file is still worth naming
        return None
    return int(step) if step is not None else None


def _local_weights(module: torch.nn.Module) -> Iterator[Tensor]:
    """The parameters as this rank holds them: its shard under ZeRO-3 (without the padding),
    else the whole tensor."""
    for param in module.parameters():
        shard = getattr(param, "ds_tensor", None)
        yield param.detach() if shard is None else shard.detach()[: _shard_elements(param)]


def _shard_elements(param: Tensor) -> int:
    """How many elements of this rank's ZeRO-3 shard belong to the parameter. A shard holds
    ceil(numel / world) elements; past the parameter's end it is padding that DeepSpeed leaves
    uninitialised (a NaN there is no divergence: a 1-element logit scale on 2 ranks is all
    padding on rank 1)."""
    size = param.ds_tensor.numel()  # type: ignore[attr-defined]
    rank = torch.distributed.get_rank(param.ds_process_group) if torch.distributed.is_initialized() else 0  # type: ignore[attr-defined]
    return max(0, min(size, param.ds_numel - rank * size))  # type: ignore[attr-defined]


def _zero3_optimizer(trainer: L.Trainer) -> Any:
    """DeepSpeed's ZeRO-3 optimizer of the run (also after a validation outside fit, whose
    engine has none), or None."""
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    candidates = [getattr(engine, "optimizer", None), *trainer.optimizers]
    return next((o for o in candidates if hasattr(o, "fp32_partitioned_groups_flat")), None)


def _zero3_states(optimizer: Any) -> list[Tensor]:
    """This rank's fp32 master partitions and their optimizer states (Adam's moments) under
    ZeRO-3, without the padding: each flat partition is its sub-group's parameter shards end
    to end."""
    out: list[Tensor] = []
    for flat, params in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_groups):
        keep = torch.cat([torch.arange(p.ds_tensor.numel()) < _shard_elements(p) for p in params])
        states = [t for t in optimizer.optimizer.state.get(flat, {}).values() if isinstance(t, Tensor)]
        out += [t[keep.to(t.device)] for t in (flat, *states) if t.shape == keep.shape]
    return out


def _tensors(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def _all_finite(tensors: list[Tensor]) -> Tensor:
    """One boolean: no NaN or inf in any floating-point tensor (the max-abs norm propagates
    both)."""
    floats = [t for t in tensors if t.is_floating_point() and t.numel() > 0]
    if not floats:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(floats, norm_type=math.inf))
