"""Trainer building blocks: strategies from configs/trainer/*.yaml, and real DeepSpeed ZeRO runs
on CPU (2 processes, gloo) of a method with a frozen teacher."""

from __future__ import annotations

import csv
from datetime import timedelta
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from clipft.cli import main
from clipft.config import load_config
from clipft.models import build_model, read_state_dict
from clipft.config import lightning_precision
from clipft.strategies import CPUDeepSpeedStrategy, build_strategy

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "name,stage,offload_optimizer,offload_params",
    [("deepspeed_zero2", 2, False, False), ("deepspeed_zero2_offload", 2, True, False),
     ("deepspeed_zero3", 3, False, False), ("deepspeed_zero3_offload", 3, True, True)],
)
def test_deepspeed_configs_build_the_expected_strategy(name: str, stage: int, offload_optimizer: bool, offload_params: bool) -> None:
    cfg = load_config(None, [f"include=configs/trainer/{name}.yaml"])
    assert cfg.trainer.strategy.startswith(f"deepspeed_stage_{stage}") and cfg.trainer.precision == "amp_bf16"
    gpu = build_strategy(cfg.trainer)
    assert not isinstance(gpu, CPUDeepSpeedStrategy)
    cpu_cfg = load_config(None, [f"include=configs/trainer/{name}.yaml", "trainer.accelerator=cpu", "trainer.devices=1"])
    strategy = build_strategy(cpu_cfg.trainer)
    assert isinstance(strategy, CPUDeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero and zero["offload_optimizer"]["device"] == "cpu") == offload_optimizer
    assert ("offload_param" in zero and zero["offload_param"]["device"] == "cpu") == offload_params
    # open_clip's amp_bf16 becomes DeepSpeed's bf16 mode (weights and inputs in bf16)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision=lightning_precision("amp_bf16"),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy._format_config()
    assert trainer.strategy.config["bf16"] == {"enabled": True}


def test_ddp_and_deepspeed_get_the_collective_timeout_and_other_names_pass_through() -> None:
    cfg = load_config(None, ["include=configs/trainer/ddp.yaml", "trainer.collective_timeout_s=90"])
    ddp = build_strategy(cfg.trainer)
    assert isinstance(ddp, DDPStrategy) and ddp._timeout == timedelta(seconds=90) and cfg.trainer.devices == -1
    zero = build_strategy(load_config(None, ["include=configs/trainer/deepspeed_zero3.yaml"]).trainer)
    assert zero._timeout == timedelta(seconds=1800)  # the default: torch's and Lightning's
    assert build_strategy(load_config(None, ["trainer.strategy=fsdp"]).trainer) == "fsdp"


RECIPE = "recipes/clip_refine.yaml"
_ARGS = [
    "include=configs/trainer/deepspeed_zero3.yaml", "trainer.accelerator=cpu", "trainer.precision=fp32",
    "trainer.devices=2", "data.batch_size=16", "data.synthetic.val_size=96", "eval.zeroshot=[]",
    "eval.compositional.source=null", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
    "data.num_workers=0", "run.plot=false", "trainer.log_every_n_steps=1",
    # an EMA of the student beside the frozen teacher; each device's 8 pairs encoded 4 at a
    # time; a clamp below the start's temperature (exp(logit_scale) = 200) that must hold
    "method.ema_momentum=0.9", "trainer.micro_batch_size=4", "optim.logit_scale_max=100", "optim.lr=1e-4",
]


def _fit(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "clipft", "fit", RECIPE, *_ARGS, f"run.out_dir={out}", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _train_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_zero3_on_two_cpu_processes_with_a_teacher_and_an_ema_trains_saves_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CLIP-Refine under ZeRO-3 on 2 processes: the frozen teacher and the fp32 EMA live outside
    the module tree (never partitioned); the checkpoint is a DeepSpeed folder; a run stopped
    after 4 steps and resumed to 6 continues the uninterrupted 6-step run exactly (same
    batches, same losses, same EMA), and the folder consolidates to the live weights."""
    result = _fit(tmp_path / "once", "trainer.max_steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    result = _fit(tmp_path, "trainer.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(tmp_path.glob("clip_refine/*"))
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "latest").is_file()
    first = json.loads((run / "report.json").read_text())
    assert first["steps"] == 4 and first["world_size"] == 2
    assert first["metrics"]["val/retrieval/mean_r1"] > 0.8  # the pre-trained start is intact
    result = _fit(tmp_path, "trainer.max_steps=6", "run.resume=last")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((run / "report.json").read_text())
    assert resumed["steps"] == 6 and resumed["resumed_from"].endswith("last.ckpt")
    assert list(run.parent.iterdir()) == [run]

    once = next((tmp_path / "once").glob("clip_refine/*"))
    assert sorted(_train_losses(run)) == list(range(6))
    assert _train_losses(run) == pytest.approx(_train_losses(once), rel=1e-6, abs=1e-7)
    ema, ema_once = read_state_dict(last, ema=True), read_state_dict(once / "checkpoints" / "last.ckpt", ema=True)
    start = build_model(load_config(RECIPE, []).model).model.state_dict()
    assert all(v.dtype == torch.float32 for v in ema.values())
    for name, value in ema.items():
        torch.testing.assert_close(value, ema_once[name], rtol=0, atol=1e-7)
    assert not torch.equal(ema["visual.proj"], start["visual.proj"])  # the EMA moved

    # the sharded folder consolidates to the live weights: one process re-validates them
    state = read_state_dict(last)
    assert len(state) == len(start)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert state["logit_scale"].exp().item() <= 100.0 + 1e-4  # clamped in DeepSpeed's fp32 master copy too
    capsys.readouterr()
    plain = [a for a in _ARGS if not a.startswith(("include=", "trainer.", "method.ema"))]
    assert main(["validate", RECIPE, *plain, f"run.out_dir={tmp_path / 'check'}", "--ckpt", str(last)]) == 0
    checked = json.loads(Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"]).read_text())
    for key in ("val/retrieval/mean_r1", "val/gap/centroid_distance", "val/loss"):
        assert checked["metrics"][key] == pytest.approx(resumed["metrics"][key], abs=1e-4), key


def test_lora_under_zero3_saves_only_the_adapters_and_resumes(tmp_path: Path) -> None:
    """trainer.exclude_frozen_parameters: the DeepSpeed folder holds the adapters only (the
    base comes back from model.pretrained on resume and on reading), and reads as the full,
    merged open_clip model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    args = [a for a in _ARGS if not a.startswith(("trainer.devices", "method.ema", "trainer.micro", "optim."))]
    lora = ["trainer.devices=1", "model.lora.rank=4", "trainer.exclude_frozen_parameters=true", "optim.lr=1e-3"]

    def fit(*extra: str) -> None:
        command = [sys.executable, "-m", "clipft", "fit", RECIPE, *args, *lora, f"run.out_dir={tmp_path}", *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]

    fit("trainer.max_steps=2")
    fit("trainer.max_steps=4", "run.resume=last")
    last = next(tmp_path.glob("clip_refine/*")) / "checkpoints" / "last.ckpt"
    saved = get_fp32_state_dict_from_zero_checkpoint(str(last))
    assert saved and all(".lora_" in k for k in saved)  # adapters only
    state = read_state_dict(last)
    start = build_model(load_config(RECIPE, []).model).model.state_dict()
    assert state.keys() == start.keys()
    assert torch.equal(state["visual.conv1.weight"], start["visual.conv1.weight"])
    assert not torch.equal(state["transformer.resblocks.0.attn.in_proj_weight"],
                           start["transformer.resblocks.0.attn.in_proj_weight"])


@pytest.mark.slow
@pytest.mark.parametrize("zero,devices", [("deepspeed_zero2", 2), ("deepspeed_zero3", 2)])
def test_lr_groups_survive_zero_and_are_logged(tmp_path: Path, zero: str, devices: int) -> None:
    """optim.layer_decay + optim.lr_multipliers under ZeRO on CPU: one AdamW step (no weight
    decay) moves each parameter by its own learning rate, read back from the sharded folder,
    and each group's lr is logged under its name (lr-AdamW/<group>)."""
    import lightning as L

    args = [f"include=configs/trainer/{zero}.yaml", "trainer.accelerator=cpu", "trainer.precision=fp32",
            f"trainer.devices={devices}", "data.batch_size=16", "eval.zeroshot=[]", "eval.compositional.source=null",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "data.num_workers=0", "run.plot=false",
            "trainer.log_every_n_steps=1", "trainer.max_steps=1", "optim.lr=1e-2", "optim.weight_decay=0",
            "optim.layer_decay=0.5", "optim.warmup_fraction=0", "optim.schedule=constant",
            "optim.lr_multipliers={logit_scale: 0.1}", f"run.out_dir={tmp_path}"]
    result = subprocess.run([sys.executable, "-m", "clipft", "fit", "recipes/quickstart.yaml", *args],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(tmp_path.glob("quickstart/*"))
    L.seed_everything(0, workers=True, verbose=False)  # the run's seed: its starting weights
    start = build_model(load_config("recipes/quickstart.yaml", []).model).model.state_dict()
    state = read_state_dict(run / "checkpoints" / "last.ckpt")
    depth = {"visual.conv1.weight": 0, "token_embedding.weight": 0, "visual.transformer.resblocks.0.attn.in_proj_weight": 1,
             "transformer.resblocks.1.mlp.c_fc.weight": 2, "visual.proj": 3, "ln_final.weight": 3}
    for name, d in depth.items():
        moved = (state[name] - start[name]).abs().max().item()
        assert moved == pytest.approx(1e-2 * 0.5 ** (3 - d), rel=1e-3), name
    assert (state["logit_scale"] - start["logit_scale"]).abs().item() == pytest.approx(1e-3, rel=1e-3)
    with open(run / "metrics.csv") as f:
        logged = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if k.startswith("lr-") and v}
    assert logged == pytest.approx({"lr-AdamW/decay_x1": 1e-2, "lr-AdamW/no_decay_x1": 1e-2, "lr-AdamW/decay_x0.5": 5e-3,
                                    "lr-AdamW/no_decay_x0.5": 5e-3, "lr-AdamW/decay_x0.25": 2.5e-3,
                                    "lr-AdamW/no_decay_x0.25": 2.5e-3, "lr-AdamW/decay_x0.125": 1.25e-3,
                                    "lr-AdamW/no_decay_x0.125": 1.25e-3, "lr-AdamW/no_decay_x0.1": 1e-3})


def _resume_args(strategy: str, devices: int, steps: int, out: Path) -> list[str]:
    include = [] if strategy == "ddp" else [f"include=configs/trainer/{strategy}.yaml"]
    return [*include, f"trainer.strategy={'ddp' if strategy == 'ddp' else 'deepspeed_stage_' + strategy[-1]}",
            "trainer.accelerator=cpu", "trainer.precision=fp32", f"trainer.devices={devices}",
            # the same 16 pairs per step on 1 or 2 devices, so both runs can be compared exactly
            f"data.batch_size={16 // devices}", "data.synthetic.train_size=256", "eval.zeroshot=[]",
            "eval.compositional.source=null", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
            "data.num_workers=0", "run.plot=false", "trainer.log_every_n_steps=1", f"trainer.max_steps={steps}",
            # a constant lr: a cosine schedule is laid over trainer.max_steps, so a first run of
            # 2 steps decays faster (step 1 at 0.5·lr, not the 4-step run's 0.85·lr) and no resume
            # could give the 4-step run's weights (measured: 13-54 % of each weight's movement)
            "optim.lr=1e-3", "optim.warmup_fraction=0", "optim.schedule=constant", f"run.out_dir={out}"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,before,after", [
    ("deepspeed_zero2", 2, 1), ("deepspeed_zero3", 1, 2), ("ddp", 2, 1),
])
def test_resume_on_another_number_of_devices_continues_the_run(tmp_path: Path, strategy: str, before: int, after: int) -> None:
    """A run stopped after 2 steps on `before` devices and resumed to 4 on `after` (same 16
    pairs per step) continues the uninterrupted 4-step run: the same losses at steps 2 and 3 (the
    same samples, none of the interrupted epoch repeated) and every weight within 1 % of its
    movement (measured: at most 0.03 %, float rounding of the other split of the batch), so the
    optimizer state came back (ZeRO: resharded, docs/scale.md). A resume that left the Adam
    moments at zero ends 65-75 % of each weight's movement away (measured, ZeRO-2 2 -> 1)."""
    def fit(devices: int, steps: int, out: Path, *extra: str) -> Path:
        command = [sys.executable, "-m", "clipft", "fit", "recipes/quickstart.yaml",
                   *_resume_args(strategy, devices, steps, out), *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        return next(out.glob("quickstart/*"))

    once = fit(before, 4, tmp_path / "once")
    fit(before, 2, tmp_path / "split")
    split = fit(after, 4, tmp_path / "split", "run.resume=last")
    assert json.loads((split / "report.json").read_text())["world_size"] == after
    assert sorted(_train_losses(split)) == [0, 1, 2, 3]
    assert _train_losses(split) == pytest.approx(_train_losses(once), rel=1e-5)
    final, resumed = (read_state_dict(run / "checkpoints" / "last.ckpt") for run in (once, split))
    L.seed_everything(0, workers=True, verbose=False)  # the run's seed: its starting weights
    start = build_model(load_config("recipes/quickstart.yaml", []).model).model.state_dict()
    assert resumed.keys() == final.keys() == start.keys()
    for name in ("visual.conv1.weight", "transformer.resblocks.1.mlp.c_fc.weight", "visual.proj", "ln_final.weight"):
        assert (final[name] - start[name]).abs().max().item() > 3e-3, name  # 4 Adam steps at lr 1e-3
    for name, value in final.items():
        if value.is_floating_point():
            moved = (value - start[name]).abs().max().item()
            assert (resumed[name] - value).abs().max().item() <= 0.01 * moved, name
