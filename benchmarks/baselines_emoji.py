"""The robustness baselines of benchmarks/results/baselines_emoji.md (issue 29, item 3).

    python benchmarks/baselines_emoji.py --bench runs/bench --seeds 0 1 2 [--wait] [--table-only]

For each seed S, from the lit_twemoji run of that seed (BENCH/lit_twemoji_sS.done holds the path of
its last.ckpt; ``--wait`` waits for it), one process at a time, into BENCH/base29/<row>_sS/:
recipes/classifier_twemoji.yaml as a linear probe, LP-FT, classifier fine-tuning and FLYP
(``finetune``: the CLIP loss with the class prompts "an emoji of {group}" as captions), then
``clipft wise-ft`` of the classifier and of FLYP. A run or sweep already done is kept. Then it
prints the markdown table over the seeds done: group top-1 / balanced accuracy (mean per-class
recall) on twemoji's test split (in-domain) and noto's (shifted), mean ± s.d. over seeds; the
subgroup columns are zero-shot by prompts in every row (what the image tower kept).
Zero-shot: the start itself (FLYP's sweep at α = 0, the class prompts alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_styles import cell, key, wall_s  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "classifier_twemoji.yaml"
ALPHAS = ("0", "0.25", "0.5", "0.75", "1")
# row name -> overrides of recipes/classifier_twemoji.yaml, in the order they run
RUNS = {
    "classifier": [],
    "linear_probe": ["method.name=linear_probe", "optim.lr=0", "optim.weight_decay=0", "trainer.max_steps=1",
                     "trainer.val_check_interval=1"],
    "lp_ft": ["method.name=lp_ft"],
    "flyp": ["method.name=finetune"],
}
LABELS = {"linear_probe": "linear probe", "lp_ft": "LP-FT", "classifier": "classifier fine-tuning (zero-shot head)",
          "flyp": "FLYP (CLIP loss, class prompts)"}  # the table's rows, in this order
SWEPT = ("classifier", "flyp")
SETS = ("twemoji", "noto")


def start_of(bench: Path, seed: int, wait: bool) -> Path:
    done = bench / f"lit_twemoji_s{seed}.done"
    while not done.is_file():
        if not wait:
            raise SystemExit(f"{done}: not there (the lit_twemoji run of seed {seed} is not finished); --wait waits")
        time.sleep(30)
    path = Path(done.read_text().strip())
    path = path if path.is_absolute() else (bench / path if (bench / path).is_file() else path.resolve())
    if not path.is_file():
        raise SystemExit(f"{done}: names {path}, which is not a file")
    return path.resolve()


def run_dir(out: Path, row: str, seed: int) -> Optional[Path]:
    """The row's finished run folder (one with a report.json), or None."""
    found = sorted((out / f"{row}_s{seed}" / "classifier_twemoji").glob("*/report.json"))
    return found[-1].parent if found else None


def call(argv: list[str]) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, cwd=ROOT)


def run_seed(out: Path, seed: int, start: Path, extra: list[str]) -> None:
    for row, overrides in RUNS.items():
        if run_dir(out, row, seed) is None:
            call([sys.executable, "-m", "clipft", "fit", str(RECIPE), f"model.pretrained={start}", f"run.seed={seed}",
                  f"run.out_dir={out / f'{row}_s{seed}'}", "trainer.enable_progress_bar=false", *extra, *overrides])
    for row in SWEPT:
        folder = run_dir(out, row, seed)
        if not (folder / "wise_ft.json").is_file():
            call([sys.executable, "-m", "clipft", "wise-ft", str(folder), "--alphas", *ALPHAS])


def metric_cells(found: list[dict[str, float]]) -> list[str]:
    cells = []
    for name in SETS:
        top1 = cell([m[key(name, "group", "top1")] for m in found])
        balanced = cell([m[key(name, "group", "mean_per_class_recall")] for m in found])
        cells.append(f"{top1} / {balanced}")
    cells += [cell([m[key(name, "subgroup", "top1")] for m in found]) for name in SETS]
    return cells


def sweep(folder: Path) -> dict:
    return json.loads((folder / "wise_ft.json").read_text())


def at_alpha(result: dict, alpha: float) -> dict[str, float]:
    return next(r["metrics"] for r in result["rows"] if r["alpha"] == alpha)


def table(out: Path, seeds: list[int]) -> str:
    done = [s for s in seeds if all(run_dir(out, r, s) for r in RUNS)
            and all((run_dir(out, r, s) / "wise_ft.json").is_file() for r in SWEPT)]
    if not done:
        raise SystemExit(f"{out}: no seed of {seeds} has every run and sweep")
    runs = {r: [run_dir(out, r, s) for s in done] for r in RUNS}
    sweeps = {r: [sweep(f) for f in runs[r]] for r in SWEPT}
    rows: list[tuple[str, list[dict[str, float]], str]] = [
        ("zero-shot (the LiT start)", [at_alpha(s, 0) for s in sweeps["flyp"]], "–")]
    labels = LABELS
    for r in LABELS:
        metrics = [json.loads((f / "report.json").read_text())["metrics"] for f in runs[r]]
        rows.append((labels[r], metrics, f"{statistics.mean(wall_s(f) for f in runs[r]):.0f}"))
    for r in SWEPT:
        rows.append((f"WiSE-FT α = 0.5 of {labels[r].split(' (')[0]}", [at_alpha(s, 0.5) for s in sweeps[r]], "–"))
        best = [s["best_alpha"] for s in sweeps[r]]
        rows.append((f"WiSE-FT best α of {labels[r].split(' (')[0]} (α = {', '.join(f'{a:g}' for a in best)})",
                     [at_alpha(s, a) for s, a in zip(sweeps[r], best)], "–"))
    header = ["row", "seeds", "twemoji group top-1 / balanced", "noto group top-1 / balanced",
              "twemoji subgroup top-1", "noto subgroup top-1", "train wall s"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += [f"| {label} | {len(m)} | " + " | ".join(metric_cells(m)) + f" | {wall} |" for label, m, wall in rows]
    lines.append("")
    lines.append(f"seeds: {', '.join(map(str, done))}; runs under {out}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, default=Path("runs/bench"), help="holds lit_twemoji_sS.done; runs go to BENCH/base29")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--wait", action="store_true", help="wait for each seed's lit_twemoji_sS.done")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run before the row's own (a smoke test: trainer.max_steps=2)")
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs there, run nothing")
    args = parser.parse_args(argv)
    out = (args.bench / "base29").resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.table_only:
        for seed in args.seeds:
            run_seed(out, seed, start_of(args.bench.resolve(), seed, args.wait), args.set)
            print(table(out, args.seeds), flush=True)
    print(table(out, args.seeds))


if __name__ == "__main__":
    main()
