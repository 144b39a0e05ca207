"""Multi-node launch commands generated from the recipe, and resuming from SLURM's
pre-emption checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from clipft.cli import main
from clipft.config import load_config
from clipft.runner import resolve_resume

RECIPE = "recipes/clip_refine.yaml"
NODES = ["include=configs/trainer/ddp.yaml", "trainer.devices=4", "trainer.num_nodes=3"]


def test_slurm_script_counts_are_the_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", RECIPE, *NODES, "--launcher", "slurm"]) == 0
    script = capsys.readouterr().out
    assert re.search(r"^#SBATCH --nodes=3$", script, re.M) and re.search(r"^#SBATCH --ntasks-per-node=4$", script, re.M)
    assert re.search(r"^#SBATCH --gpus-per-node=4$", script, re.M) and "--signal=SIGUSR1@90" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun == f"srun clipft fit {RECIPE} {' '.join(NODES)} $RESUME"
    assert 'RESUME="run.resume=last"' in script  # a requeued job continues its run


def test_torchrun_command_and_unusable_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", RECIPE, *NODES, "--launcher", "torchrun"]) == 0
    command = capsys.readouterr().out
    assert "--nnodes=3" in command and "--nproc-per-node=4" in command and "--rdzv-backend=c10d" in command
    assert command.rstrip().endswith(f"-m clipft fit {RECIPE} {' '.join(NODES)}")  # tests/test_multinode.py runs this form
    assert main(["info", RECIPE, "include=configs/trainer/ddp.yaml", "--launcher", "slurm"]) == 2  # devices -1
    assert "trainer.devices=-1: a launcher needs the number of devices per node" in capsys.readouterr().err


def test_multinode_block_with_zero3_gives_a_matching_launcher(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = ["include=configs/trainer/deepspeed_zero3.yaml", "include=configs/trainer/multinode.yaml"]
    cfg = load_config(RECIPE, blocks)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 8, "deepspeed_stage_3")
    assert main(["info", RECIPE, *blocks, "--launcher", "slurm"]) == 0
    script = capsys.readouterr().out
    assert re.search(r"^#SBATCH --nodes=2$", script, re.M) and re.search(r"^#SBATCH --ntasks-per-node=8$", script, re.M)


@pytest.mark.parametrize("hpc_step,expected", [(15, "hpc_ckpt_2.ckpt"), (5, "last.ckpt")])
def test_resume_takes_the_preemption_checkpoint_when_it_is_further(tmp_path: Path, hpc_step: int, expected: str) -> None:
    run = tmp_path / "clip_refine" / "20261129-000000"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 10}, run / "checkpoints" / "last.ckpt")
    torch.save({"global_step": 3}, run / "hpc_ckpt_1.ckpt")
    torch.save({"global_step": hpc_step}, run / "hpc_ckpt_2.ckpt")
    cfg = load_config(RECIPE, [f"run.out_dir={tmp_path}", "run.resume=last"])
    run_dir, ckpt = resolve_resume(cfg)
    assert run_dir == run and ckpt is not None and ckpt.name == expected
