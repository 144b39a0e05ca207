"""Checks that need a CUDA GPU (skipped without one; see conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipft.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["amp_bf16", "fp32"])
def test_quickstart_learns_on_gpu(precision: str, fast_overrides: list[str]) -> None:
    args = [
        "fit", str(ROOT / "recipes" / "quickstart.yaml"), *fast_overrides, "trainer.accelerator=gpu",
        "trainer.devices=1", f"trainer.precision={precision}", "trainer.max_steps=60",
    ]
    assert main(args) == 0
    report = json.loads(next(Path(fast_overrides[-1].split("=", 1)[1]).glob("quickstart/*/report.json")).read_text())
    assert report["steps"] == 60
    assert report["metrics"]["val/loss"] < 3.0  # from log(32) = 3.47 at the start


@pytest.mark.gpu
@pytest.mark.parametrize("block", ["deepspeed_zero2", "deepspeed_zero3"])
def test_zero_on_gpu_with_teacher_ema_and_micro_batches(block: str, tmp_path: Path) -> None:
    """The CPU ZeRO test of tests/test_strategies.py on the GPUs of this machine (bf16)."""
    import torch

    from clipft.models import read_state_dict

    import subprocess
    import sys

    devices = min(2, torch.cuda.device_count())
    args = [  # a subprocess: Lightning starts the other ranks by re-running the command
        sys.executable, "-m", "clipft", "fit", str(ROOT / "recipes" / "clip_refine.yaml"), f"include=configs/trainer/{block}.yaml", f"trainer.devices={devices}",
        "data.batch_size=16", "data.synthetic.val_size=96", "eval.zeroshot=[]", "eval.compositional.source=null",
        "trainer.enable_progress_bar=false", "run.plot=false", "trainer.max_steps=4", "method.ema_momentum=0.9",
        "trainer.micro_batch_size=8", f"run.out_dir={tmp_path}",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(tmp_path.glob("clip_refine/*"))
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 4 and report["metrics"]["val/retrieval/mean_r1"] > 0.8
    ema = read_state_dict(run / "checkpoints" / "last.ckpt", ema=True)
    assert all(v.dtype == torch.float32 for v in ema.values())
