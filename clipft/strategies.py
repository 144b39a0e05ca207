"""Lightning strategies from ``trainer.strategy``: the usual names, with DeepSpeed ZeRO also on CPU.

Lightning's DeepSpeed strategy refuses a CPU accelerator, yet DeepSpeed itself runs ZeRO-2/3
on CPU with gloo (docs/scale.md, "DeepSpeed on a CPU"). :class:`CPUDeepSpeedStrategy` removes
the three CUDA-only steps, so DeepSpeed runs are tested on a laptop / in CI with 1 or 2 processes.
Both read a checkpoint on resume through :mod:`clipft.models.checkpoint_io`
(:class:`SafeDeepSpeedStrategy`), never with DeepSpeed's ``weights_only=False``.
"""

from __future__ import annotations

import argparse
from typing import Any, Union

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from clipft.config import TrainerConfig
from clipft.models import checkpoint_io

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
        return super().load_checkpoint(checkpoint_path, weights_only)


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
    """The strategy of ``trainer.strategy``: a Lightning name (auto, ddp, ...) as it is, or a
    DeepSpeed ZeRO strategy (on CPU, :class:`CPUDeepSpeedStrategy` with gloo)."""
    if cfg.strategy not in DEEPSPEED_STRATEGIES:
        return cfg.strategy
    kwargs = dict(DEEPSPEED_STRATEGIES[cfg.strategy], exclude_frozen_parameters=cfg.exclude_frozen_parameters)
    if cfg.accelerator == "cpu":
        return CPUDeepSpeedStrategy(**kwargs, process_group_backend="gloo")
    return SafeDeepSpeedStrategy(**kwargs)
