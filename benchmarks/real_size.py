"""Every paper recipe (recipes/*_vit*.yaml) smoke-tested at its real size on this machine's CPU.

Each recipe runs ``clipft fit RECIPE --smoke`` (clipft/smoke.py: random weights, synthetic data
at the model's image size, 2 steps of 4 pairs, one CPU process) in its own process, so its peak
resident set (``os.wait4``'s ru_maxrss of that child alone) is its own. The table gives the
model's parameters (total and trainable, from the run's report.json), the model copies the
method holds beside it (a frozen teacher, an EMA: ``clipft.memory.count``), the median step
time (report.json's step_time_s), the peak RSS and the wall time of the whole command (model
built, 2 steps, evaluation, last.ckpt written), and "ok" or the error's last line.

    python benchmarks/real_size.py                          # all paper recipes
    python benchmarks/real_size.py --recipes recipes/mmrl_vitb16_imagenet.yaml --out /tmp/t.md

Exits 1 when a recipe fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("recipe", "model", "parameters", "trainable", "copies held", "step (s)", "peak RSS (GB)", "wall (s)", "status")


def run_recipe(recipe: str, extra: list[str]) -> dict:
    """One smoke run in a child process; its row of the table."""
    from clipft.memory import count
    from clipft.smoke import smoke_config

    out = Path(tempfile.mkdtemp(prefix="real-size-"))
    overrides = [f"run.out_dir={out}", "trainer.enable_progress_bar=false", "run.plot=false", *extra]
    row = {"recipe": Path(recipe).stem}
    try:
        _, cfg = smoke_config(recipe, overrides)
        counts = count(cfg)
        row |= {"model": cfg.model.name, "copies held": _copies(counts.teacher, counts.ema)}
        command = [sys.executable, "-m", "clipft", "fit", recipe, "--smoke", *overrides]
        start = time.perf_counter()
        with open(out / "log.txt", "w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            _, status, usage = os.wait4(child.pid, 0)
        row |= {"wall (s)": f"{time.perf_counter() - start:.0f}", "peak RSS (GB)": f"{usage.ru_maxrss * 1024 / 1e9:.1f}"}
        reports = list(out.glob("*/*/report.json"))
        if os.waitstatus_to_exitcode(status) != 0 or not reports:
            row["status"] = _last_error((out / "log.txt").read_text())
            return row
        report = json.loads(reports[0].read_text())
        row |= {
            "parameters": f"{report['parameters']['total']['total']:,}",
            "trainable": f"{report['trainable_parameters']:,}",
            "step (s)": f"{report['step_time_s']:.2f}",
            "status": "ok" if report["steps"] == cfg.trainer.max_steps else f"{report['steps']} steps",
        }
    except Exception as err:  # a recipe that does not compose or count: its row says why
        row["status"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    finally:
        shutil.rmtree(out, ignore_errors=True)  # last.ckpt of a ViT-B with Adam states: ~1.8 GB
    return row


def _copies(teacher: int, ema: int) -> str:
    held = [f"teacher {teacher / 1e6:.1f}M"] * bool(teacher) + [f"EMA {ema / 1e6:.1f}M"] * bool(ema)
    return ", ".join(held) or "none"


def _last_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("clipft: error") or "Error" in line.split(":")[0]]
    return (errors or lines or ["failed, no output"])[-1][:200].replace("|", "/")


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=sorted(glob.glob(str(ROOT / "recipes" / "*_vit*.yaml"))))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_size_cpu.md"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every recipe")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]  # the machine may be shared: a loaded one stretches the times
    rows = []
    for recipe in args.recipes:
        rows.append(run_recipe(recipe, args.overrides))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    import torch

    header = (f"# Paper recipes at real size, `clipft fit RECIPE --smoke` on a CPU\n\n"
              f"`python benchmarks/real_size.py` on {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
              f"{load:.1f} at the start. Random weights, "
              "synthetic data at the model's image size, 2 steps of 4 pairs, fp32, one process; step: the median "
              "of the 2 steps; peak RSS of the run's own process; wall: the whole command (build, 2 steps, "
              "evaluation on 16 pairs, last.ckpt).\n\n")
    Path(args.out).write_text(header + table(rows) + "\n")
    print(table(rows))
    failed = [row["recipe"] for row in rows if row.get("status") != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
