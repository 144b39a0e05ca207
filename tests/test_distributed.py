"""Every method's loss is exact across devices: one Lightning training step on 2 CPU processes
(DDP, gloo) with per-device batch B gives the loss and the parameter gradients of one process
with batch 2·B (tests/distributed_worker.py runs the step)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"


RUNS = {
    "finetune": ["method.name=finetune"],
    "clip_refine": ["method.name=clip_refine"],  # HyCD + RaFA, the default reading (raw_rafa: RaFA raw, HyCD on unit features)
    "clip_refine_raw_with_clip": ["method.name=clip_refine", "method.features=raw", "method.loss_weights.contrastive=1"],
    "finetune_siglip": ["method.name=finetune", "model.logit_scale=10", "model.logit_bias=-10"],
    # each device encodes its pairs 2 at a time (activation checkpointing inside DDP's backward)
    "negclip": ["method.name=negclip", "data.negatives.count=2"],
    "degla": ["method.name=degla", "data.negatives.count=2", "method.loss_weights.distill=1"],
    # every mixup term on, with partners and mixes across the devices' boundary
    "m3mix": ["method.name=mixup", "method.loss_weights.vv=0.05", "method.loss_weights.ll=0.05", "method.loss_weights.vl=0.1",
              "method.loss_weights.m2mix=0.5"],
    "finetune_lora": ["method.name=finetune", "model.lora.rank=4", "model.lora.targets=[q,k,v,out,c_fc,c_proj]"],
    "clip_refine_micro_batches": ["method.name=clip_refine", "method.loss_weights.contrastive=1", "trainer.micro_batch_size=2"],
}


def one_step_each(out: Path, devices: int) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(devices), json.dumps(list(RUNS.values()))],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: torch.load(f"{out}.{i}", weights_only=True) for i, name in enumerate(RUNS)}


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    singles = one_step_each(tmp_path / "one.pt", 1)
    doubles = one_step_each(tmp_path / "two.pt", 2)
    for name in RUNS:
        single, double = singles[name], doubles[name]
        assert double["loss"].item() == pytest.approx(single["loss"].item(), rel=1e-5), name
        assert set(double["grads"]) == set(single["grads"]) and len(single["grads"]) > 40
        largest = max(g.abs().max().item() for g in single["grads"].values())
        for param, grad in single["grads"].items():
            assert torch.allclose(double["grads"][param], grad, rtol=0, atol=1e-5 * largest), (name, param)
