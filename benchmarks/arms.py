"""What the method benchmarks share: run one arm (a fit, or the start validated), print a
markdown table of chosen metrics, one row per arm, and the command line of a benchmark that
runs every arm of one recipe with the same steps and learning rate."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clipft.config import load_config  # noqa: E402
from clipft.runner import fit, validate  # noqa: E402


def run_arm(recipe: str, overrides: list[str], arm: Optional[list[str]], out: Path) -> dict[str, float]:
    """Final validation metrics of a fit with ``arm`` overrides, or of the start (arm None)."""
    quiet = ["trainer.enable_progress_bar=false", f"run.out_dir={out}"]
    if arm is None:
        return validate(load_config(recipe, [*overrides, *quiet]))["metrics"]
    return fit(load_config(recipe, [*overrides, *arm, *quiet]))["metrics"]


def table(title: str, columns: list[tuple[str, str]], results: dict[str, dict[str, float]]) -> str:
    """``columns``: (header, metric key) pairs; a missing metric shows as –."""
    lines = [f"### {title}", "", "| run | " + " | ".join(c for c, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for arm, metrics in results.items():
        cells = [f"{metrics[key]:.3f}" if key in metrics else "–" for _, key in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(
    description: str, name: str, recipe: str, arms: dict[str, Optional[list[str]]], columns: list[tuple[str, str]],
    setting: str, default_lr: float = 2e-5,
) -> None:
    """Parse ``--steps/--lr/--out``, run every arm of ``recipe`` with those steps and learning
    rate, print the table (``setting`` may use {steps} and {lr}) and save it as
    benchmarks/results/<name>.md."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=default_lr)
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix=f"{name}_bench_"))
    common = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}", "run.plot=false",
              f"optim.lr={args.lr}"]
    results = {}
    for label, arm in arms.items():
        start = time.perf_counter()
        results[label] = run_arm(recipe, common, arm, out / label.replace(" ", "_").replace(",", ""))
        print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
    text = table(setting.format(steps=args.steps, lr=f"{args.lr:g}"), columns, results)
    print(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (ROOT / "benchmarks" / "results" / f"{name}.md").write_text(text + "\n")
    print(f"run folders: {out}")
