"""What the method benchmarks share: run one arm (a fit, or the start validated), and print a
markdown table of chosen metrics, one row per arm."""

from __future__ import annotations

import os
import sys
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
