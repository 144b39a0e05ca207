"""CLIP-Refine at small scale: does post-pre-training narrow the modality gap while zero-shot
and retrieval hold, where plain contrastive fine-tuning loses zero-shot? (Yamaguchi et al., CVPR 2025; docs/methods/clip_refine.md)

    python benchmarks/clip_refine.py [--steps 300] [--lr 1e-6 1e-5] [--twemoji-lr 1e-5] [--twemoji ../shared/data/twemoji64]

From one pre-trained start, with the same data, steps and learning rate, it runs: no
refinement, contrastive fine-tuning, CLIP-Refine in its readings (the default raw_rafa, raw features as
the official code, unit features as the normalised form), HyCD only and RaFA only; then prints
one table per data set (gap, linear separability, zero-shot top-1, retrieval R@1,
compositional accuracy) and writes it to benchmarks/results/clip_refine_<data>.md.

* synthetic: the shipped tiny model (``model.pretrained=synthetic``, pre-trained on the
  synthetic seed-0 stream), refined on a different stream (seed 1), evaluated on held-out scenes.
* twemoji (when the folder exists): a LiT model pre-trained on the train split
  (``recipes/lit_twemoji.yaml``, trained here first) is refined on the same train split with
  the text tower kept locked, and evaluated on the unseen test split.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arms import ROOT, run_arm, table  # noqa: E402

from clipft.config import load_config  # noqa: E402
from clipft.runner import fit  # noqa: E402

RAW = ["method.features=raw"]  # with gaussian references, RaFA as `code`, HyCD on raw dot products
ARMS = {
    "no refinement": None,
    "contrastive fine-tuning": ["method.name=finetune"],
    "CLIP-Refine (raw, official code)": ["method.name=clip_refine", *RAW],
    "CLIP-Refine (raw_rafa, default)": ["method.name=clip_refine"],
    "CLIP-Refine (normalized)": ["method.name=clip_refine", "method.features=normalized"],
    "HyCD only (normalized)": ["method.name=clip_refine", "method.features=normalized", "method.loss_weights.rafa=0"],
    "RaFA only (normalized)": ["method.name=clip_refine", "method.features=normalized", "method.loss_weights.hycd=0"],
    "RaFA only (raw)": ["method.name=clip_refine", *RAW, "method.loss_weights.hycd=0"],
}

COLUMNS = {
    "synthetic": [
        ("gap", "val/gap/centroid_distance"), ("separability", "val/gap/linear_separability"),
        ("shape top-1", "val/zeroshot/shape/top1"), ("novel top-1", "val/zeroshot/novel_object/top1"),
        ("R@1 (mean)", "val/retrieval/mean_r1"), ("SWAP", "val/compositional/SWAP"),
        ("REPLACE", "val/compositional/REPLACE"),
    ],
    "twemoji": [
        ("gap", "val/gap/centroid_distance"), ("separability", "val/gap/linear_separability"),
        ("group top-1", "val/sets/twemoji/zeroshot/group/top1"), ("subgroup top-1", "val/sets/twemoji/zeroshot/subgroup/top1"),
        ("R@1 (mean)", "val/retrieval/mean_r1"),
    ],
}


def benchmark(name: str, recipe: str, overrides: list[str], lrs: list[float], setting: str, out: Path) -> str:
    """Every arm at every learning rate; the start is validated once."""
    results: dict[str, dict[str, float]] = {}
    for arm, arm_overrides in ARMS.items():
        for lr in [None] if arm_overrides is None else lrs:
            label = arm if lr is None else f"{arm}, lr {lr:g}"
            folder = out / name / re.sub(r"[^A-Za-z0-9.-]+", "_", label)
            start = time.perf_counter()
            extra = [] if lr is None else [*arm_overrides, f"optim.lr={lr}"]
            results[label] = run_arm(recipe, overrides, extra if lr is not None else None, folder)
            print(f"[{name}] {label}: {time.perf_counter() - start:.0f} s", flush=True)
    text = table(f"{name}: {setting}", COLUMNS[name], results)
    print(text, flush=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    saved = ROOT / "benchmarks" / "results" / f"clip_refine_{name}.md"
    saved.parent.mkdir(exist_ok=True)
    saved.write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-6, 1e-5], help="synthetic: every arm at each")
    parser.add_argument("--twemoji-lr", type=float, nargs="+", default=[1e-5])
    parser.add_argument("--twemoji", default=str(ROOT.parent / "shared" / "data" / "twemoji64"))
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--only", choices=["synthetic", "twemoji"], default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="clip_refine_bench_"))
    common = [f"trainer.max_steps={args.steps}", "trainer.val_check_interval=null", "run.plot=false"]
    lrs = ", ".join(f"{lr:g}" for lr in args.lr)
    if args.only in (None, "synthetic"):
        setting = (f"clipft-tiny-vit `synthetic` start, {args.steps} steps of batch 128 on synthetic stream seed 1, "
                   f"constant lr {lrs}")
        benchmark("synthetic", str(ROOT / "recipes" / "clip_refine.yaml"), common, args.lr, setting, out)
    twemoji = Path(args.twemoji)
    if args.only in (None, "twemoji") and twemoji.is_dir():
        os.environ["CLIPFT_DATA"] = str(twemoji.parent)  # the recipe reads twemoji64 and noto64 from there
        start = fit(load_config(str(ROOT / "recipes" / "lit_twemoji.yaml"),
                                ["trainer.enable_progress_bar=false", f"run.out_dir={out / 'lit'}", "run.plot=false"]))
        refine = [f"model.pretrained={start['last_checkpoint']}", "optim.schedule=constant", "optim.warmup_steps=0",
                  *common]
        setting = (f"LiT twemoji start (locked MiniLM text tower), {args.steps} steps of batch 64 on the train split, "
                   f"constant lr {', '.join(f'{lr:g}' for lr in args.twemoji_lr)}, test split")
        benchmark("twemoji", str(ROOT / "recipes" / "lit_twemoji.yaml"), refine, args.twemoji_lr, setting, out)
    print(f"run folders: {out}")


if __name__ == "__main__":
    main()
