"""report.json's timing section: step times between optimizer steps, data wait, evaluation left
out, samples per second."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

from clipft import runner
from clipft.cli import main
from clipft.runner import StepTimes

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_step_times_leave_out_the_first_step_and_evaluation_and_count_the_data_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(runner.time, "perf_counter", clock)
    times = StepTimes(report=SimpleNamespace(extra={}))
    trainer = SimpleNamespace(global_step=0, world_size=2, accumulate_grad_batches=2, training=True)
    batch = SimpleNamespace(images=torch.zeros(8, 3, 4, 4))
    times.on_train_start(trainer, None)

    def batch_of(wait: float, compute: float, steps: bool) -> None:
        clock.now += wait
        times.on_train_batch_start(trainer, None, batch, 0)
        clock.now += compute
        trainer.global_step += int(steps)
        times.on_train_batch_end(trainer, None, None, batch, 0)

    batch_of(0.0, 5.0, steps=False)  # the first optimizer step (warm-up): 5 + 1 + 4 s
    batch_of(1.0, 4.0, steps=True)
    for wait, compute in [(0.5, 1.0), (0.5, 1.0), (1.0, 2.0)]:  # accumulation: two batches per step
        batch_of(wait, compute / 2, steps=False)
        batch_of(0.0, compute / 2, steps=True)
    times.on_validation_start(trainer, None)
    clock.now += 100.0
    times.on_validation_end(trainer, None)
    batch_of(0.5, 1.0, steps=False)  # timed from the end of the evaluation, not through it
    batch_of(0.0, 1.0, steps=True)
    timing = times.timing(train_s=200.0, steps=trainer.global_step, device=torch.device("cpu"))
    assert timing["first_step_s"] == 10.0
    assert times.times == [1.5, 1.5, 3.0, 2.5]
    assert timing["step_s_median"] == 2.0 and timing["step_s_p90"] == 3.0
    assert timing["data_wait_fraction"] == pytest.approx((0.5 + 0.5 + 1.0 + 0.5) / 8.5, abs=1e-4)
    assert timing["samples_per_s"] == 8 * 2 * 2 / 2.0
    assert timing["eval_s"] == 100.0 and timing["steps"] == 5
    assert times.samples_per_s == pytest.approx(32 * 4 / 8.5)


def test_a_run_reports_its_timing(fast_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[int] = []  # the global step of every training-step self.log("train/loss")
    log = L.LightningModule.log

    def spy(self: L.LightningModule, name: str, *args: Any, **kwargs: Any) -> None:
        if name == "train/loss":
            logged.append(self.trainer.global_step)
        log(self, name, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", spy)
    assert main(["fit", str(ROOT / "recipes" / "quickstart.yaml"), *fast_overrides, "trainer.max_steps=12",
                 "trainer.val_check_interval=6", "trainer.log_every_n_steps=5"]) == 0
    run_dir = next(Path(fast_overrides[-1].split("=", 1)[1]).glob("quickstart/*"))
    # self.log only where the loggers write (every 5th step, as before) and at the last step (the
    # trainer's callback_metrics end with the run's last loss)
    assert logged == [4, 9, 11]
    with (run_dir / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")] == [4, 9]
    report = json.loads((run_dir / "report.json").read_text())
    timing = report["timing"]
    assert timing["steps"] == 12 and timing["eval_s"] > 0 and timing["train_s"] >= timing["eval_s"]
    assert 0 < timing["step_s_median"] <= timing["step_s_p90"]
    assert timing["samples_per_s"] == pytest.approx(32 / timing["step_s_median"], rel=0.01)
    assert 0 <= timing["data_wait_fraction"] < 1
    # eleven timed steps (the first left out) and two evaluations inside fit plus none after
    assert timing["step_s_median"] * 11 < timing["train_s"]
