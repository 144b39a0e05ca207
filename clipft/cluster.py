"""The processes of a run that a launcher started (torchrun, SLURM's srun): one process group
with a bounded collective timeout, and one run folder that rank 0 chooses for all of them.

Lightning creates the process group only inside ``Trainer.fit``, after the run folder, the
logger and the checkpoint callbacks exist. Each node choosing its own timestamped folder
would leave one folder per node (and ``run.resume=last`` could pick different runs on
different nodes), so under a launcher clipft starts the process group first, with the
backend Lightning would choose and ``trainer.collective_timeout_s``; Lightning and DeepSpeed
then use that group. Rank 0 chooses (or resumes) the run folder and sends its path to every
rank; every rank checks that it sees the folder, which needs ``run.out_dir`` on a filesystem
that all nodes share at the same path (docs/multinode.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment

from clipft.config import ConfigError, RunConfig

T = TypeVar("T")
# how long a rank waits for rank 0's new folder to appear (a shared filesystem's attribute cache)
VISIBLE_WAIT_S = 5.0


def launcher_environment() -> Optional[ClusterEnvironment]:
    """Lightning's cluster environment when a launcher started this process (torchrun before
    SLURM, as Lightning orders them), else None. SLURM's with ``auto_requeue=False``: Lightning's
    own handler would save a checkpoint inside the signal handler, at any point of a step;
    :mod:`clipft.preemption` saves at a step boundary instead."""
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect():
        try:
            return SLURMEnvironment(auto_requeue=False)
        except RuntimeError as err:  # e.g. --ntasks without --ntasks-per-node
            raise ConfigError(f"SLURM allocation: {err}") from err
    return None


def launcher_name(env: Optional[ClusterEnvironment]) -> Optional[str]:
    return {TorchElasticEnvironment: "torchrun", SLURMEnvironment: "slurm"}.get(type(env)) if env else None


def process_backend(cfg: RunConfig) -> str:
    """The backend Lightning's DDP and DeepSpeed strategies would use: gloo on a CPU, else NCCL."""
    return "gloo" if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available() else "nccl"


def collective_timeout(cfg: RunConfig) -> timedelta:
    return timedelta(seconds=cfg.trainer.collective_timeout_s)


def start_process_group(env: ClusterEnvironment, cfg: RunConfig) -> bool:
    """Check the recipe's counts against the launcher's and start the process group. False
    (nothing started) for a launcher with one process."""
    devices, nodes, world = cfg.trainer.devices, cfg.trainer.num_nodes, env.world_size()
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        try:
            env.validate_settings(num_devices=devices, num_nodes=nodes)
        except ValueError as err:
            raise ConfigError(f"trainer.devices={devices} trainer.num_nodes={nodes}: {err}") from err
        if world != devices * nodes:
            raise ConfigError(
                f"trainer.num_nodes={nodes} x trainer.devices={devices} processes, but the launcher started {world}; "
                "set them to the allocation"
            )
    if world <= 1 or dist.is_initialized():
        return False
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    dist.init_process_group(process_backend(cfg), rank=env.global_rank(), world_size=world, timeout=collective_timeout(cfg))
    return True


def agree(choose: Callable[[], T]) -> T:
    """Rank 0's ``choose()``, on every rank of the started process group; when it fails, every
    rank raises rank 0's error."""
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None  # objects travel on the CPU
    try:
        payload: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                payload = [("ok", choose())]
            except Exception as err:  # every rank fails with it, instead of waiting for rank 0
                payload = [("error", err)]
        dist.broadcast_object_list(payload, src=0, group=group)
        status, value = payload[0]
        if status == "error":
            raise value
        return value
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def check_visible(run_dir: Path, wait_s: float = VISIBLE_WAIT_S) -> None:
    """Every rank sees rank 0's run folder (after up to ``wait_s`` seconds), or every rank
    fails naming the ranks and hosts that do not."""
    deadline = time.monotonic() + wait_s
    while not run_dir.is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    mine = None if run_dir.is_dir() else f"rank {dist.get_rank()} on {socket.gethostname()} (working folder {os.getcwd()})"
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    try:
        missing: list[Optional[str]] = [None] * dist.get_world_size()
        dist.all_gather_object(missing, mine, group=group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    blind = [m for m in missing if m]
    if blind:
        raise ConfigError(
            f"run.out_dir: the run folder '{run_dir}' that rank 0 made is not visible to {', '.join(blind)}; "
            "every node must see run.out_dir at the same path (a shared filesystem, an absolute path): "
            "set run.out_dir to such a folder"
        )


class LostProcess(RuntimeError):
    """A collective failed because another process of the run died, hung past
    ``trainer.collective_timeout_s`` or became unreachable."""


# what gloo (CPU) and the c10d layer say when a peer is gone or a collective times out
_LOST = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def is_lost_process(err: BaseException) -> bool:
    return isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and any(marker in str(err) for marker in _LOST)
    )


@contextlib.contextmanager
def explain_lost_process(world_size: int, run_dir: Path, timeout_s: float) -> Iterator[None]:
    """Turn a failed collective of a multi-process run into one :class:`LostProcess` line:
    what happened, on which rank and host, and how to continue."""
    try:
        yield
    except Exception as err:
        if world_size <= 1 or not is_lost_process(err):
            raise
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        raise LostProcess(
            f"rank {rank} on {socket.gethostname()}: another process of the run stopped or did not answer within "
            f"trainer.collective_timeout_s={timeout_s:g} s ({first}); the run folder {run_dir} keeps the last "
            "checkpoint: relaunch every node with run.resume=last"
        ) from err
