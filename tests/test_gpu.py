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
