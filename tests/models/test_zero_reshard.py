"""clipft.models.zero_checkpoint gathers the Adam moments of a ZeRO folder written by 2 ranks
into full tensors by parameter name: what a resume on another number of devices writes into the
new partitions (clipft.strategies, SafeDeepSpeedStrategy._load_resharded). With 2 ranks, ZeRO-2
cuts each group's flat vector in the middle of a parameter and pads its end, and ZeRO-3 cuts
every parameter and pads the pieces (the 1-element logit scale: rank 1's piece is all padding).

The check is AdamW's first step, element by element, which needs no second run to compare with
(a 1-rank run sums the gradients in another order, and the attention's key bias, whose gradient
is rounding noise, then differs by Adam's whole step): after one step from w0 with gradient g,
exp_avg = (1 - b1)·g, exp_avg_sq = (1 - b2)·g² and w1 = w0 - lr·m̂ / (sqrt(v̂) + eps). A moment
gathered from the wrong offset breaks these by the size of the moments themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from clipft.config import load_config
from clipft.models import build_model
from clipft.models.zero_checkpoint import consolidate, consolidate_optimizer, saved_world_size

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/quickstart.yaml"
LR = 1e-3


def _one_step_on_two_ranks(out: Path, config: str) -> Path:
    command = [sys.executable, "-m", "clipft", "fit", RECIPE, f"include=configs/trainer/{config}.yaml",
               "trainer.accelerator=cpu", "trainer.precision=fp32", "trainer.devices=2", "data.batch_size=8",
               "data.synthetic.train_size=64", "eval.zeroshot=[]", "eval.compositional.source=null",
               "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "run.plot=false",
               "data.num_workers=0", "trainer.max_steps=1", f"optim.lr={LR}", "optim.warmup_fraction=0",
               "optim.weight_decay=0", f"run.out_dir={out}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return next(out.glob("quickstart/*/checkpoints/last.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3"])
def test_two_rank_moments_gather_to_each_parameters_own_first_adam_step(config: str, tmp_path: Path) -> None:
    folder = _one_step_on_two_ranks(tmp_path, config)
    assert saved_world_size(folder) == 2
    weights = consolidate(folder)  # equal to DeepSpeed's converter bit for bit (test_checkpoint_io.py)
    (moments, step) = consolidate_optimizer(folder)
    assert step == 1 and set(moments) == {"exp_avg", "exp_avg_sq"}
    optim = load_config(RECIPE, []).optim
    (b1, b2), eps = optim.betas, optim.eps
    L.seed_everything(0, workers=True, verbose=False)  # the run's seed: its starting weights
    start = build_model(load_config(RECIPE, []).model).model.state_dict()
    m, v = moments["exp_avg"], moments["exp_avg_sq"]
    assert list(m) == list(v) and "model.logit_scale" in m and "model.ln_final.weight" in m and len(m) > 30
    for name in m:
        w0, w1 = start[name.removeprefix("model.")], weights[name]
        assert m[name].shape == v[name].shape == w1.shape == w0.shape, name
        assert m[name].abs().max() > 0, name  # every trained parameter has its moments
        # exp_avg_sq = (1 - b2) / (1 - b1)^2 · exp_avg^2, element by element
        torch.testing.assert_close(v[name], (1 - b2) / (1 - b1) ** 2 * m[name] ** 2, rtol=1e-5, atol=1e-20, msg=name)
        # the step each element took, from its own moments (bias-corrected at step 1)
        update = LR * (m[name] / (1 - b1)) / ((v[name] / (1 - b2)).sqrt() + eps)
        torch.testing.assert_close(w1, w0 - update, rtol=0, atol=1e-3 * LR, msg=name)  # a wrong offset: ~LR
