"""metrics.csv across a kill and a resume: each (step, metric) once, the same rows as a run that
was never interrupted; the resumed run's epochs are bounded (no "Epoch 0/-2" progress bar)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipft.config import load_config
from clipft.runner import build_run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
# 20 batches an epoch; last.ckpt every 10 steps; validation every 20 (after the step-20 save)
RUN = ["trainer.max_steps=40", "run.checkpoint_every_n_steps=10", "trainer.log_every_n_steps=1",
       "eval.compositional.source=null"]

# Runs the CLI and dies (no clean-up, no flush) when the training step KILL_AT starts.
KILLED_FIT = """
import os, sys
import clipft.methods.base as base
kill_at, original = int(os.environ["KILL_AT"]), base.ContrastiveMethod.training_step
def training_step(self, batch, batch_idx):
    if self.global_step == kill_at:
        os._exit(9)
    return original(self, batch, batch_idx)
base.ContrastiveMethod.training_step = training_step
from clipft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _fit(overrides: list[str], kill_at: int = 10**9) -> int:
    env = {**os.environ, "KILL_AT": str(kill_at), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", KILLED_FIT, "fit", QUICKSTART, *overrides]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=300).returncode


def _cells(metrics_csv: Path) -> list[tuple[int, str, str]]:
    """(step, metric, value) of every value in the file; the learning rate and train rows
    are exact replays after a resume, validation rows too."""
    with metrics_csv.open() as f:
        return [(int(r["step"]), k, v) for r in csv.DictReader(f) for k, v in r.items() if v and k not in ("step", "epoch")]


def test_a_killed_run_resumed_logs_each_step_once_and_as_the_uninterrupted_run(fast_overrides: list[str]) -> None:
    out = fast_overrides[-1]
    assert _fit([*fast_overrides, *RUN, "run.name=whole"]) == 0
    # killed at step 25: after the step-20 checkpoint, with steps 20-24 already logged
    assert _fit([*fast_overrides, *RUN, "run.name=killed"], kill_at=25) == 9
    killed = next(Path(out.split("=", 1)[1]).glob("killed/*"))
    assert max(step for step, _, _ in _cells(killed / "metrics.csv")) >= 24
    assert _fit([*fast_overrides, *RUN, "run.name=killed", "run.resume=last"]) == 0

    whole = next(Path(out.split("=", 1)[1]).glob("whole/*"))
    resumed = _cells(killed / "metrics.csv")
    keys = [(step, name) for step, name, _ in resumed]
    assert len(keys) == len(set(keys)), "a (step, metric) logged twice"
    expected = _cells(whole / "metrics.csv")
    assert sorted(keys) == sorted((step, name) for step, name, _ in expected)
    values = {(step, name): float(v) for step, name, v in resumed}
    for step, name, value in expected:  # the same training, replayed exactly
        assert values[(step, name)] == pytest.approx(float(value), rel=1e-4, abs=1e-5), (step, name)


def test_a_resumed_run_bounds_its_epochs(fast_overrides: list[str]) -> None:
    assert _fit([*fast_overrides, *RUN, "trainer.max_steps=30"]) == 0
    cfg = load_config(QUICKSTART, [*fast_overrides, *RUN, "trainer.max_steps=50", "run.resume=last"])
    run = build_run(cfg, "fit")
    # resumed at step 30 (epoch 1, batch 10 of 20; the checkpoint may count epoch 1 as ended):
    # the rest of epoch 1 and epoch 2 finish the 50 steps; before, max_epochs was -1 ("Epoch 0/-2")
    assert run.resume_step == 30
    assert 3 <= run.trainer.max_epochs <= 4
    run.trainer.fit(run.method, datamodule=run.datamodule, ckpt_path=str(run.resume_from))
    assert run.trainer.global_step == 50  # the bound is not what stops it
