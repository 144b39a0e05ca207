"""The table of benchmarks/results/two_styles.md from run folders of the emoji recipes.

    python benchmarks/two_styles.py "lit_twemoji=runs/bench/lit_twemoji_s*/lit_twemoji/*" \\
        "lit_two_styles=runs/bench/two_styles_s*/lit_two_styles/*" [--step 600]

Each argument is LABEL=GLOB: the run folders (one per seed) of one row; a row over several
seeds gives mean ± s.d. Columns: group and subgroup zero-shot top-1 / balanced accuracy (mean
per-class recall) on the twemoji and noto test splits (``val/sets/<set>/zeroshot/...``), from
the run's final report.json, or with ``--step N`` from its validation at step N in metrics.csv
(to compare runs at a step every one of them reached); and the wall time from the run folder's
start (its name) to its report.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

SETS = ("twemoji", "noto")
TASKS = ("group", "subgroup")


def key(name: str, task: str, metric: str) -> str:
    return f"val/sets/{name}/zeroshot/{task}/{metric}"


def metrics_at(run: Path, step: Optional[int]) -> dict[str, float]:
    """The final metrics (report.json), or those of the validation after ``step`` training steps."""
    if step is None:
        return json.loads((run / "report.json").read_text())["metrics"]
    probe = key(SETS[0], TASKS[0], "top1")
    with (run / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            if row.get(probe) and int(row["step"]) + 1 == step:  # Lightning logs a validation at step - 1
                return {k: float(v) for k, v in row.items() if v and k.startswith("val/")}
    raise SystemExit(f"{run}: no validation at step {step} in metrics.csv")


def wall_s(run: Path) -> float:
    """Seconds from the run folder's start time (its name, YYYYmmdd-HHMMSS) to its report."""
    start = datetime.strptime(run.name, "%Y%m%d-%H%M%S").timestamp()
    return (run / "report.json").stat().st_mtime - start


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def row(label: str, runs: list[Path], step: Optional[int]) -> str:
    found = [metrics_at(run, step) for run in runs]
    cells = []
    for task in TASKS:
        for name in SETS:
            top1 = cell([m[key(name, task, "top1")] for m in found])
            balanced = cell([m[key(name, task, "mean_per_class_recall")] for m in found])
            cells.append(f"{top1} / {balanced}")
    wall = "–" if step is not None else f"{statistics.mean(wall_s(r) for r in runs):.0f}"
    return f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {wall} |"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", metavar="LABEL=GLOB")
    parser.add_argument("--step", type=int, default=None, help="the validation at this step instead of the final one")
    args = parser.parse_args(argv)
    header = ["run", "seeds"] + [f"{name} {task} top-1 / balanced" for task in TASKS for name in SETS] + ["wall s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for item in args.rows:
        label, _, pattern = item.partition("=")
        runs = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "report.json").is_file())
        if not runs:
            sys.exit(f"{label}: no run folder with a report.json matches {pattern}")
        lines.append(row(label, runs, args.step))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
