"""Stop a training run cleanly on the signal a scheduler sends before it stops the job.

SLURM sends SIGUSR1 some seconds before a time limit when the job asks for it
(``#SBATCH --signal=SIGUSR1@90``), and SIGTERM when it cancels or pre-empts a job; torchrun and
container runtimes forward SIGTERM. On either signal, :class:`StopOnSignal` lets the current
step finish; at the step boundary every rank learns whether any rank received one (one
all-reduce of a flag per step), all ranks save ``checkpoints/last.ckpt`` together (ZeRO's
shards included), rank 0 asks SLURM to requeue the job (``trainer.slurm_requeue``), and the run
ends with :class:`Preempted` before the next batch: ``clipft fit`` exits with status 0 and ``run.resume=last``
continues from that step exactly. A second signal of the same kind while the first is pending
stops the process at once (the default action).

Lightning's own SLURM handler is switched off (:func:`clipft.cluster.launcher_environment`):
it saves from inside the signal handler, at whatever point of a step the signal lands, and
a collective there can interleave with the step's own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist

log = logging.getLogger("clipft")
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """The run stopped on a signal after saving ``checkpoint`` at ``step``."""

    def __init__(self, signame: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signame} at step {step}; saved {checkpoint}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


class StopOnSignal(L.Callback):
    """SIGUSR1 / SIGTERM -> at the next step boundary, on every rank: save, (requeue), stop."""

    def __init__(self, checkpoint: Path, requeue: bool = False) -> None:
        self.checkpoint = Path(checkpoint)
        self.requeue = requeue
        self.received = 0  # the signal number, 0 for none
        self.stop: Optional[Preempted] = None  # saved: stop before the next batch
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received == signum:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum  # only a flag here: saving waits for the step boundary

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning installed its handlers (it restores the ones it found on teardown)
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        signum = self.received
        if self.stop is not None:
            return
        if trainer.world_size > 1 and dist.is_initialized():  # every rank stops at the same step
            flag = torch.tensor([signum], dtype=torch.int64, device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if not signum:
            return
        name = signal.Signals(signum).name
        log.warning("%s received: saving %s at step %d and stopping", name, self.checkpoint, trainer.global_step)
        trainer.save_checkpoint(self.checkpoint)  # every rank joins (ZeRO writes one shard per rank), then waits
        if self.requeue and trainer.is_global_zero:
            requeue_slurm_job()
        self.stop = Preempted(name, trainer.global_step, self.checkpoint)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # stop here rather than right after the save: Lightning logs the saved step's train
        # metrics after on_train_batch_end, and metrics.csv must keep that row
        if self.stop is not None:
            self._restore()
            raise self.stop


def requeue_slurm_job() -> None:
    """``scontrol requeue`` of this SLURM job (array task included); a failure is logged, not
    raised: the checkpoint is safe either way."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s (%s): resubmit it with run.resume=last", job, err)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.warning("scontrol requeue %s failed (%s): resubmit it with run.resume=last", job, result.stderr.strip())
