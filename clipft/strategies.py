"""Lightning strategies from ``trainer.strategy``: the usual names, with DeepSpeed ZeRO also on CPU.

Lightning's DeepSpeed strategy refuses a CPU accelerator, yet DeepSpeed itself runs ZeRO-2/3
on CPU with gloo (docs/scale.md, "DeepSpeed on a CPU"). :class:`CPUDeepSpeedStrategy` removes
the three CUDA-only steps, so DeepSpeed runs are tested on a laptop / in CI with 1 or 2 processes.
Both read a checkpoint on resume through :mod:`clipft.models.checkpoint_io`
(:class:`SafeDeepSpeedStrategy`), never with DeepSpeed's ``weights_only=False``.
"""

from __future__ import annotations

import argparse
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Union

import torch

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from clipft.config import TrainerConfig
from clipft.models import checkpoint_io, zero_checkpoint
from clipft.models.errors import ModelError
from clipft.models.factory import read_training_state

log = logging.getLogger(__name__)
# what DeepSpeed keeps for itself in a model-states file; the rest is Lightning's client state
_DEEPSPEED_KEYS = ("module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                   "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                   "checkpoint_parallel_dimensions", "ds_config", "ds_version")

# trainer.strategy -> DeepSpeedStrategy arguments (Lightning's registry names)
DEEPSPEED_STRATEGIES: dict[str, dict[str, Any]] = {
    "deepspeed_stage_1": {"stage": 1},
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}


class SafeCheckpointEngine:
    """A DeepSpeed checkpoint engine whose ``load`` is :func:`clipft.models.checkpoint_io.load`;
    saving and everything else go to the engine it wraps. DeepSpeed's ``TorchCheckpointEngine``
    unpickles each rank's model and optimizer states with ``weights_only=False``, and the
    DeepSpeed engine reads every file of a resume through its checkpoint engine, so swapping
    this one object makes a resume as safe as ``clipft export`` (chosen over checking each
    file before DeepSpeed reads it: nothing could read a file between the check and the load)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return checkpoint_io.load(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class SafeDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, loading a checkpoint through :class:`SafeCheckpointEngine`."""

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Any = None) -> dict[str, Any]:
        engine = self.deepspeed_engine
        if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
            engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
        if Path(checkpoint_path).is_dir() and zero_checkpoint.saved_world_size(checkpoint_path) != self.world_size:
            return self._load_resharded(Path(checkpoint_path))
        return super().load_checkpoint(checkpoint_path, weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options)
        # A folder written before by more ranks (a run resumed on fewer devices) keeps their
        # shard files: remove them, so that the folder holds one consistent checkpoint.
        if self.is_global_zero and Path(filepath).is_dir():
            folder = zero_checkpoint.tag_folder(filepath)
            for stale in folder.glob("zero_pp_rank_*_mp_rank_*.pt"):
                rank = re.match(r"zero_pp_rank_(\d+)_", stale.name)
                if rank is not None and int(rank.group(1)) >= self.world_size:
                    stale.unlink()
        self.barrier("clipft_zero_cleanup")

    def _load_resharded(self, path: Path) -> dict[str, Any]:
        """A ZeRO folder written by another number of ranks (DeepSpeed refuses: "The checkpoint
        being loaded used a DP world size of 2 but the current world size is 1"): every rank
        gathers the full fp32 weights and Adam moments from all the saved shards (through the
        safe loader, :mod:`clipft.models.zero_checkpoint`) and writes them into its own
        partitions with DeepSpeed's ``safe_set_full_*`` functions, then the optimizer's step
        count; Lightning's state (loops, scheduler, callbacks) comes from rank 0's model-states
        file as usual."""
        saved = zero_checkpoint.saved_world_size(path)
        log.info("resuming a ZeRO checkpoint written by %d ranks on %d: resharding its weights and optimizer state",
                 saved, self.world_size)
        weights = zero_checkpoint.consolidate(path)
        moments, step = zero_checkpoint.consolidate_optimizer(path)
        _create_optimizer_states(self.deepspeed_engine.optimizer, step, tuple(moments))
        module = self.lightning_module
        missing = []
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name not in weights:
                    missing.append(name)
                    continue
                value = weights[name].to(param.device)
                if hasattr(param, "ds_id"):  # ZeRO-3: the partitioned low-precision copy
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                        param.data.copy_(value.to(param.dtype))
                else:
                    param.data.copy_(value.to(param.dtype))
                if param.requires_grad:
                    _set_full_fp32_state(param, value.float())
                    for key, by_name in moments.items():
                        _set_full_fp32_state(param, by_name[name].to(param.device).float(), key)
            for name, buffer in module.named_buffers():
                if name in weights:
                    buffer.copy_(weights[name].to(buffer))
        if missing and module.strict_loading:
            raise ModelError(f"DeepSpeed checkpoint '{path}' lacks {len(missing)} weights of the model, e.g. {missing[0]}")
        self.deepspeed_engine.global_steps = step
        client = dict(read_training_state(path))
        for key in _DEEPSPEED_KEYS:
            client.pop(key, None)
        return client


def _set_full_fp32_state(param: torch.nn.Parameter, value: torch.Tensor, key: Optional[str] = None) -> None:
    """Write this rank's part of a full fp32 tensor (the master weight, or Adam moment ``key``)
    into the ZeRO optimizer's partition of ``param``. ZeRO-1/2: DeepSpeed's own
    ``safe_set_full_*``. ZeRO-3: each rank holds ``ceil(numel / ranks)`` elements of every
    parameter, the last rank's end padded; DeepSpeed 0.19.7's ``set_full_hp_param`` cuts the
    value without that padding and fails on any parameter whose size the ranks do not divide
    ("start (1) + length (1) exceeds dimension size (1)" for the logit scale on 2 ranks), so the
    padded piece is cut here and written with ``safe_set_local_*``."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state, safe_set_local_fp32_param,
                                 safe_set_local_optimizer_state)

    if not hasattr(param, "ds_id"):
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    group = getattr(param, "ds_process_group", None)
    ranks, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    size = param.ds_tensor.numel()
    padded = value.new_zeros(size * ranks)
    padded[:value.numel()] = value.flatten()
    piece = padded.narrow(0, size * rank, size)
    if key is None:
        safe_set_local_fp32_param(param, piece)
    else:
        safe_set_local_optimizer_state(param, piece, key)


def _create_optimizer_states(zero_optimizer: Any, step: int, keys: tuple[str, ...]) -> None:
    """Adam's state for each flat fp32 partition of a fresh ZeRO optimizer (DeepSpeed makes it
    at the first step), at ``step``, so that ``safe_set_full_optimizer_state`` has a place to
    write the resharded moments into; ZeRO-1/2 then link each parameter to its fragment."""
    inner = zero_optimizer.optimizer  # the wrapped torch optimizer
    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = zero_optimizer.fp32_partitioned_groups_flat  # ZeRO-3
    fused = any(group.get("fused") or group.get("capturable") for group in inner.param_groups)
    for flat in flats:
        state = inner.state[flat]
        for key in keys:
            state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(float(step), device=flat.device if fused else "cpu")
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


class CPUDeepSpeedStrategy(SafeDeepSpeedStrategy):
    """DeepSpeed ZeRO with the CPU accelerator and gloo (for tests and laptops; GPUs use the
    stock strategy). DeepSpeed's shared-memory communication op, compiled with g++ on first
    use (30-60 s), is switched off: gloo carries everything."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skip the "only CUDA GPUs" check

    def setup_distributed(self) -> None:
        import deepspeed.ops
        from lightning.fabric.utilities.seed import reset_seed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        reset_seed()
        self.set_world_ranks()  # no CUDA device index to validate on a CPU
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        import deepspeed

        # Lightning passes device_rank = root_device.index, which is None on a CPU
        params = filter(lambda p: p.requires_grad, model.parameters())
        engine, optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=params, optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, optimizer

    def _initialize_deepspeed_inference(self, model: Any) -> None:
        # A validation outside fit (the runner's final one) builds an inference engine with
        # device_rank = root_device.index as well: None on a CPU, where DeepSpeed wants an int.
        import deepspeed

        initialize = deepspeed.initialize

        def with_device_rank(*args: Any, **kwargs: Any) -> Any:
            if getattr(kwargs.get("args"), "device_rank", 0) is None:
                kwargs["args"].device_rank = self.local_rank
            return initialize(*args, **kwargs)

        deepspeed.initialize = with_device_rank
        try:
            super()._initialize_deepspeed_inference(model)
        finally:
            deepspeed.initialize = initialize


def build_strategy(cfg: TrainerConfig) -> Union[str, Strategy]:
    """The strategy of ``trainer.strategy``: DDP or a DeepSpeed ZeRO strategy (on CPU,
    :class:`CPUDeepSpeedStrategy` with gloo) whose collectives fail after
    ``trainer.collective_timeout_s``; any other Lightning name (auto, fsdp, ...) as it is."""
    timeout = timedelta(seconds=cfg.collective_timeout_s)
    if cfg.strategy == "ddp":
        return DDPStrategy(timeout=timeout)
    if cfg.strategy not in DEEPSPEED_STRATEGIES:
        return cfg.strategy
    kwargs = dict(DEEPSPEED_STRATEGIES[cfg.strategy], exclude_frozen_parameters=cfg.exclude_frozen_parameters,
                  timeout=timeout)
    if cfg.accelerator == "cpu":
        return CPUDeepSpeedStrategy(**kwargs, process_group_backend="gloo")
    return SafeDeepSpeedStrategy(**kwargs)
