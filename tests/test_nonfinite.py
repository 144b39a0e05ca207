"""A diverging run keeps its last good state (clipft/methods/guard.py, docs/divergence.md): it
stops at the step that went non-finite with one line naming the step, the term, the checkpoint
to resume from and what to change; or skips such steps; and never writes non-finite weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from clipft.cli import main
from clipft.config import ConfigError, load_config
from clipft.methods import build_method
from clipft.methods.base import ContrastiveMethod
from clipft.methods.guard import DivergenceError, DivergenceGuard
from clipft.models import read_state_dict, read_training_state
from conftest import FAST_OVERRIDES
from nonfinite_worker import poisoned_loss_terms

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("clipft: error:")]
    assert lines, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _last_checkpoint(out: Path) -> Path:
    (run,) = out.glob("quickstart/*")
    return run / "checkpoints" / "last.ckpt"


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_nan_loss_stops_at_its_step_and_last_ckpt_keeps_the_good_state(
    fast_overrides: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN at step 9: the optimizer step makes the weights NaN, and the checkpoint due after it
    (global step 10) is refused, so last.ckpt stays the one of step 5."""
    monkeypatch.setattr(ContrastiveMethod, "loss_terms", poisoned_loss_terms({9}))
    argv = ["fit", QUICKSTART, *fast_overrides, "trainer.max_steps=14", "run.checkpoint_every_n_steps=5"]
    assert main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    last = _last_checkpoint(Path(fast_overrides[-1].split("=", 1)[1]))
    assert line.startswith("clipft: error: training diverged at step 9: train/contrastive is not finite")
    assert f"{last} (step 5): resume with run.resume={last}" in line
    assert "optim.lr (now 0.001)" in line and "trainer.gradient_clip_val" in line
    assert read_training_state(last)["global_step"] == 5
    assert _all_finite(read_state_dict(last))


def test_a_too_high_learning_rate_stops_before_any_checkpoint(
    fast_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fit", QUICKSTART, *fast_overrides, "optim.lr=1e4", "trainer.max_steps=30", "trainer.precision=amp"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "diverged at step" in line and "no checkpoint yet: start again" in line
    assert "lower optim.lr (now 10000)" in line and "instead of trainer.precision=amp" in line
    # it failed before its first checkpoint, with nothing logged: its run folder is removed
    assert not list(Path(fast_overrides[-1].split("=", 1)[1]).glob("quickstart/*"))


class _Weights:
    """The trained weights at the start and end of every step."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(self, method: ContrastiveMethod) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        end = ContrastiveMethod.on_train_batch_end

        def on_train_batch_start(method: ContrastiveMethod, batch: Any, batch_idx: int) -> None:
            self.before[method.trainer.global_step] = self.snapshot(method)

        def on_train_batch_end(method: ContrastiveMethod, outputs: Any, batch: Any, batch_idx: int) -> None:
            end(method, outputs, batch, batch_idx)
            self.after[method.trainer.global_step - 1] = self.snapshot(method)

        monkeypatch.setattr(ContrastiveMethod, "on_train_batch_start", on_train_batch_start, raising=False)
        monkeypatch.setattr(ContrastiveMethod, "on_train_batch_end", on_train_batch_end)


def test_skip_drops_isolated_nonfinite_steps_and_counts_them(
    fast_overrides: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ContrastiveMethod, "loss_terms", poisoned_loss_terms({3, 6}))
    weights = _Weights()
    weights.patch(monkeypatch)
    argv = ["fit", QUICKSTART, *fast_overrides, "trainer.max_steps=10", "run.on_nonfinite=skip", "method.ema_momentum=0.9"]
    assert main(argv) == 0
    report = json.loads(Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["report"]).read_text())
    assert report["steps"] == 10 and report["nonfinite_skipped_steps"] == 2
    for step in (3, 6):  # a skipped step changes no weight
        for name, value in weights.before[step].items():
            assert torch.equal(value, weights.after[step][name]), (step, name)
    assert not torch.equal(weights.before[4]["model.visual.proj"], weights.after[4]["model.visual.proj"])
    last = _last_checkpoint(Path(fast_overrides[-1].split("=", 1)[1]))
    assert _all_finite(read_state_dict(last)) and _all_finite(read_state_dict(last, ema=True))


def test_skip_stops_after_patience_steps_in_a_row(
    fast_overrides: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ContrastiveMethod, "loss_terms", poisoned_loss_terms({2, 3, 4}))
    argv = ["fit", QUICKSTART, *fast_overrides, "trainer.max_steps=10", "run.on_nonfinite=skip", "run.nonfinite_patience=3"]
    assert main(argv) == 2
    line = _error_line(capsys.readouterr().err)
    assert "diverged at step 4: train/contrastive is not finite (3 skipped steps in a row, run.nonfinite_patience=3); " in line


def test_a_checkpoint_with_nonfinite_weights_is_refused_and_the_previous_one_kept(tmp_path: Path) -> None:
    """What every save goes through (ModelCheckpoint's, and runner.fit's end-of-run save)."""
    path = tmp_path / "last.ckpt"
    method = build_method(load_config(None, ["method.ema_momentum=0.9"]))
    guard = DivergenceGuard(last_checkpoint=path, hint="lower optim.lr")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0, callbacks=[guard])
    trainer.strategy.connect(method)
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    with torch.no_grad():
        method.model.visual.proj[0, 0] = float("nan")
    expected = (f"training diverged at step 0: a weight or optimizer state is not finite (found before a save); the last good checkpoint is "
                f"{path} (step 0): resume with run.resume={path} after you lower optim.lr")
    with pytest.raises(DivergenceError, match=f"^{re.escape(expected)}$"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert _all_finite(torch.load(path, weights_only=True)["state_dict"])
    method.model.visual.proj.data[0, 0] = 0.0
    method.ema.visual.proj.data[0, 0] = float("inf")  # the EMA is checked too
    with pytest.raises(DivergenceError):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before


def test_on_nonfinite_choices_and_deepspeed_refuses_skip() -> None:
    assert load_config(None, []).run.on_nonfinite == "stop"
    with pytest.raises(ConfigError, match=r"run\.on_nonfinite='retry' is not one of: stop, skip"):
        load_config(None, ["run.on_nonfinite=retry"])
    with pytest.raises(ConfigError, match=r"run\.nonfinite_patience: must be > 0"):
        load_config(None, ["run.nonfinite_patience=0"])
    with pytest.raises(ConfigError, match=r"run\.on_nonfinite: skip is not supported with trainer\.strategy=deepspeed_stage_2"):
        load_config(None, ["include=configs/trainer/deepspeed_zero2.yaml", "run.on_nonfinite=skip"])


def _worker(out: Path, nan_rank: str, *overrides: str) -> subprocess.CompletedProcess:
    """tests/nonfinite_worker.py: a fit whose contrastive term is NaN at step 4 (on one rank)."""
    command = [
        sys.executable, str(ROOT / "tests" / "nonfinite_worker.py"), "fit", QUICKSTART, *FAST_OVERRIDES,
        f"run.out_dir={out}", "trainer.max_steps=12", "run.checkpoint_every_n_steps=3", "trainer.accelerator=cpu", *overrides,
    ]
    env = {**os.environ, "NAN_STEPS": "4", "NAN_RANK": nan_rank}
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


def _rank_errors(result: subprocess.CompletedProcess) -> list[str]:
    """Each rank's error line (two ranks may write theirs onto one line of the shared stderr)."""
    assert result.returncode == 2, result.stderr[-3000:]
    return re.findall(r"clipft: error: (.*?\(e\.g\. 1\.0\))", result.stderr)


def _stopped_at_step_4(result: subprocess.CompletedProcess, out: Path, ranks: int) -> Path:
    last = _last_checkpoint(out)
    errors = _rank_errors(result)
    assert len(errors) == ranks, result.stderr[-3000:]  # every rank stopped, with the same line
    for error in errors:
        assert error.startswith("training diverged at step 4: train/contrastive is not finite")
        assert f"{last} (step 3)" in error
    assert read_training_state(last)["global_step"] == 3
    assert _all_finite(read_state_dict(last))
    return last


def test_two_process_ddp_nan_on_one_rank_stops_both(tmp_path: Path) -> None:
    """Rank 1's NaN reaches rank 0 through the all-reduced gradients: both decide at the same
    step without a collective of their own, and agree on the term's name (no hang: timeout)."""
    result = _worker(tmp_path, "1", "trainer.devices=2", "trainer.strategy=ddp")
    _stopped_at_step_4(result, tmp_path, ranks=2)


def test_deepspeed_zero2_nan_on_one_rank_stops_both(tmp_path: Path) -> None:
    """Under ZeRO-2 every rank holds all the weights after the engine's step: the NaN update
    that rank 1's loss caused shows on both at the same step."""
    result = _worker(tmp_path, "1", "include=configs/trainer/deepspeed_zero2.yaml", "trainer.accelerator=cpu",
                     "trainer.devices=2", "trainer.precision=fp32")
    assert _stopped_at_step_4(result, tmp_path, ranks=2).is_dir()  # a DeepSpeed checkpoint folder


@pytest.mark.slow
def test_deepspeed_zero3_nan_on_one_rank_stops_both_at_the_next_validation(tmp_path: Path) -> None:
    """Under ZeRO-3 a rank holds its shard of the weights only: the ranks agree at the next
    validation (after step 5 here), before any checkpoint holds the NaN update of step 4."""
    result = _worker(tmp_path, "1", "include=configs/trainer/deepspeed_zero3.yaml", "trainer.accelerator=cpu",
                     "trainer.devices=2", "trainer.precision=fp32", "trainer.val_check_interval=5")
    errors = _rank_errors(result)
    assert len(errors) == 2 and all("step 4: a weight or optimizer state is not finite (found at a validation)" in e
                                    for e in errors), result.stderr[-3000:]
    last = _last_checkpoint(tmp_path)
    assert read_training_state(last)["global_step"] == 3 and _all_finite(read_state_dict(last))


@pytest.mark.gpu
def test_on_a_gpu_the_verdict_is_read_one_step_later_without_a_sync(
    fast_overrides: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CUDA path of ``stop``: pinned copy + event, read at the next batch."""
    monkeypatch.setattr(ContrastiveMethod, "loss_terms", poisoned_loss_terms({2}))
    argv = ["fit", QUICKSTART, *fast_overrides, "trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_steps=6"]
    assert main(argv) == 2
    assert "training diverged at step 2: train/contrastive is not finite" in _error_line(capsys.readouterr().err)
