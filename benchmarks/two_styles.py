"""The table of benchmarks/results/two_styles.md from run folders of the emoji recipes.

    python benchmarks/two_styles.py "lit_twemoji=runs/bench/lit_twemoji_s*/lit_twemoji/*" \\
        "lit_two_styles=runs/bench/two_styles_s*/lit_two_styles/*" [--step 600] [--tasks group group_by_subgroup]

Each argument is LABEL=GLOB: the run folders (one per seed) of one row; a row over several
seeds gives mean ± s.d. Columns: group and subgroup zero-shot top-1 / balanced accuracy (mean
per-class recall) on the twemoji and noto test splits (``val/sets/<set>/zeroshot/...``), from
the run's final report.json, or with ``--step N`` from its validation at step N in metrics.csv
(to compare runs at a step every one of them reached); and the wall time from the run folder's
start (its name) to its report.

A row whose run folders all hold a WiSE-FT sweep (``wise_ft.json``, from ``clipft wise-ft RUN``)
is followed by a row of the sweep at each run's best α (the α with the best mean over the sets):
the same columns, mean ± s.d. over the seeds, the α of each seed in its label. The sweep
interpolates the final weights, so this row is left out with ``--step``.
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
    start = datetime.strptime(run.resolve().name, "%Y%m%d-%H%M%S").timestamp()  # a link: its target's name
    return (run / "report.json").stat().st_mtime - start


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def best_alpha(run: Path) -> tuple[float, dict[str, float]]:
    """The best α of the run's WiSE-FT sweep (wise_ft.json) and that α's metrics."""
    sweep = json.loads((run / "wise_ft.json").read_text())
    best = next(r for r in sweep["rows"] if r["alpha"] == sweep["best_alpha"])
    return sweep["best_alpha"], best["metrics"]


def row(label: str, runs: list[Path], step: Optional[int], found: Optional[list[dict[str, float]]] = None,
        tasks: tuple[str, ...] = TASKS) -> str:
    """One table row: the runs' final or step-``step`` metrics, or those given (``found``, no wall time)."""
    timed = found is None and step is None
    found = found or [metrics_at(run, step) for run in runs]
    cells = []
    for task in tasks:
        for name in SETS:
            top1 = cell([m[key(name, task, "top1")] for m in found])
            balanced = cell([m[key(name, task, "mean_per_class_recall")] for m in found])
            cells.append(f"{top1} / {balanced}")
    wall = f"{statistics.mean(wall_s(r) for r in runs):.0f}" if timed else "–"
    return f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {wall} |"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="+", metavar="LABEL=GLOB")
    parser.add_argument("--step", type=int, default=None, help="the validation at this step instead of the final one")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS),
                        help="the zero-shot tasks of the columns (e.g. group group_by_subgroup)")
    args = parser.parse_args(argv)
    tasks = tuple(args.tasks)
    header = ["run", "seeds"] + [f"{name} {task} top-1 / balanced" for task in tasks for name in SETS] + ["wall s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for item in args.rows:
        label, _, pattern = item.partition("=")
        runs = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "report.json").is_file())
        if not runs:
            sys.exit(f"{label}: no run folder with a report.json matches {pattern}")
        lines.append(row(label, runs, args.step, tasks=tasks))
        if args.step is None and all((run / "wise_ft.json").is_file() for run in runs):
            alphas, found = zip(*(best_alpha(run) for run in runs))
            lines.append(row(f"{label} WiSE-FT at best α (α = {', '.join(f'{a:g}' for a in alphas)})", runs, None,
                             list(found), tasks))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
