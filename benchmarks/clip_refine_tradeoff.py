"""CLIP-Refine's trade-off at laptop scale: how much of the modality gap RaFA closes against how
much zero-shot accuracy it costs, over the RaFA weight x the learning rate (one seed).

    python benchmarks/clip_refine_tradeoff.py [--features raw] [--weights 0 0.1 1 10] [--lr 1e-6 1e-5] [--steps 300]

Every point is ``recipes/clip_refine.yaml`` (the shipped tiny start refined on synthetic stream
seed 1) with ``method.loss_weights.rafa=W optim.lr=LR``, validated once at the end; the start
is validated once. Prints the table (gap cut in %, zero-shot change in points) and writes it to
benchmarks/results/clip_refine_tradeoff.md (docs/methods/clip_refine.md reads it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from arms import ROOT, run_arm

RECIPE = str(ROOT / "recipes" / "clip_refine.yaml")
ZEROSHOT = ("shape", "colour", "novel_object")


def row(label: str, metrics: dict[str, float], start: dict[str, float]) -> str:
    gap, gap0 = metrics["val/gap/centroid_distance"], start["val/gap/centroid_distance"]
    cells = [f"{gap:.3f}", f"{100 * (gap0 - gap) / gap0:+.0f} %"]
    for task in ZEROSHOT:
        key = f"val/zeroshot/{task}/top1"
        cells.append(f"{metrics[key]:.3f} ({100 * (metrics[key] - start[key]):+.1f})")
    cells.append(f"{metrics['val/retrieval/mean_r1']:.3f}")
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default="raw", choices=["raw", "raw_rafa", "normalized"])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-6, 1e-5])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every point")
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--save", default=str(ROOT / "benchmarks" / "results" / "clip_refine_tradeoff.md"))
    parser.add_argument("--merge", nargs="*", default=None,
                        help="write the table from the results.json of these earlier --out folders; run nothing")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="clip_refine_tradeoff_"))
    common = [f"trainer.max_steps={args.steps}", "trainer.val_check_interval=null", "run.plot=false",
              "eval.compositional.source=null", f"method.features={args.features}", *args.extra]
    results: dict[str, dict[str, float]] = {}
    for folder in args.merge or []:
        results |= json.loads((Path(folder) / "results.json").read_text())
    if args.merge is None and (out / "results.json").is_file():  # an interrupted sweep continues
        results = json.loads((out / "results.json").read_text())
    if "start" not in results:
        results["start"] = run_arm(RECIPE, common, None, out / "start")
    for lr in [] if args.merge is not None else args.lr:
        for weight in args.weights:
            label = f"rafa {weight:g}, lr {lr:g}"
            if label in results:
                continue
            began = time.perf_counter()
            arm = [f"method.loss_weights.rafa={weight}", f"optim.lr={lr}"]
            results[label] = run_arm(RECIPE, common, arm, out / label.replace(" ", "_").replace(",", ""))
            print(f"{label}: {time.perf_counter() - began:.0f} s", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    start = results["start"]
    lines = [f"### CLIP-Refine trade-off: `method.features={args.features}`, {args.steps} steps of batch 128, "
             f"constant lr, one seed" + (f" ({' '.join(args.extra)})" if args.extra else ""), "",
             "| run | gap | gap cut | shape top-1 (pts) | colour top-1 (pts) | novel top-1 (pts) | R@1 (mean) |",
             "|---|---|---|---|---|---|---|"]
    lines += [row(label, metrics, start) for label, metrics in results.items()]
    text = "\n".join(lines)
    print(text)
    Path(args.save).write_text(text + "\n")
    print(f"run folders: {out}")


if __name__ == "__main__":
    main()
