"""One table across every method: the same pre-trained start, the same data, the same steps.

    python benchmarks/compare_methods.py                  # synthetic, 3 seeds; twemoji when present
    python benchmarks/compare_methods.py --seeds 0 --steps 100 --no-twemoji   # a quick look

Each arm is a method's own laptop recipe (its learning rate and loss settings) run for
``--steps`` steps of batch 128 from the shipped tiny model pre-trained on the synthetic stream
of seed 0, on the stream of seed 1, evaluated on held-out scenes: zero-shot top-1, retrieval
R@1 both ways, SugarCrepe-style REPLACE/SWAP/ADD, centroid gap, linear separability, alignment,
uniformity. MMRL and MMRL++ run their own class-based protocol (16-shot base-to-novel on the
synthetic objects, recipes/mmrl.yaml) with its zero-shot row. Rows that stack what the
official code cannot (LoRA adapters under CLIP-Refine and under DeGLA's EMA teacher) are marked
"composition". Every arm runs in its own process, so wall time and peak memory (max RSS) are
its own. On ../shared/data/twemoji64 (when present) a LiT model is first trained on the
train split (recipes/lit_twemoji.yaml) and every contrastive method adapts it on the same split,
evaluated on the unseen test split. The table goes to stdout and docs/results_table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent

# (row label, recipe, overrides); None as overrides: the start, validated without training
# (as the recipe's model under plain CLIP evaluation: method.name=finetune)
SYNTHETIC_ARMS: list[tuple[str, str, Optional[list[str]]]] = [
    ("start (no training)", "recipes/negclip.yaml", None),
    ("fine-tuning (FLYP)", "recipes/negclip.yaml", ["method.name=finetune", "data.negatives.count=0"]),
    ("CLIP-Refine", "recipes/clip_refine.yaml", []),
    ("m²-mix", "recipes/m2mix.yaml", []),
    ("m³-mix", "recipes/m3mix.yaml", []),
    ("NegCLIP", "recipes/negclip.yaml", []),
    ("DeGLA", "recipes/degla.yaml", []),
    ("composition: CLIP-Refine + LoRA r8 (lr 1e-4)", "recipes/clip_refine.yaml",
     ["model.lora.rank=8", "optim.lr=1e-4"]),
    ("composition: DeGLA + LoRA r8 (lr 1e-4)", "recipes/degla.yaml", ["model.lora.rank=8", "optim.lr=1e-4"]),
]
CLASS_ARMS: list[tuple[str, str, Optional[list[str]]]] = [
    ("zero-shot (MMRL protocol)", "recipes/mmrl.yaml", None),
    ("MMRL", "recipes/mmrl.yaml", []),
    ("MMRL++", "recipes/mmrlpp.yaml", []),
]
TWEMOJI_ARMS: list[tuple[str, str, Optional[list[str]]]] = [
    ("start: LiT on the train split", "recipes/lit_twemoji.yaml", None),
    ("fine-tuning (FLYP)", "recipes/lit_twemoji.yaml", []),
    ("CLIP-Refine", "recipes/lit_twemoji.yaml", ["method.name=clip_refine"]),
    ("m²-mix", "recipes/lit_twemoji.yaml", ["method.name=mixup"]),
    ("NegCLIP", "recipes/lit_twemoji.yaml", ["method.name=negclip", "data.negatives.count=2"]),
]

COLUMNS = [
    ("shape top-1", "val/zeroshot/shape/top1"), ("R@1 i→t", "val/retrieval/i2t_r1"), ("R@1 t→i", "val/retrieval/t2i_r1"),
    ("REPLACE", "val/compositional/REPLACE"), ("SWAP", "val/compositional/SWAP"), ("ADD", "val/compositional/ADD"),
    ("gap", "val/gap/centroid_distance"), ("separability", "val/gap/linear_separability"),
    ("alignment", "val/gap/alignment"), ("uniformity", "val/gap/uniformity_union"),
    ("base", "val/base_to_novel/base"), ("novel", "val/base_to_novel/novel"), ("HM", "val/base_to_novel/hm"),
]
TWEMOJI_COLUMNS = [
    ("group top-1", "val/zeroshot/group/top1"), ("subgroup top-1", "val/zeroshot/subgroup/top1"),
    ("R@1 i→t", "val/retrieval/i2t_r1"), ("R@1 t→i", "val/retrieval/t2i_r1"),
    ("gap", "val/gap/centroid_distance"), ("separability", "val/gap/linear_separability"),
    ("alignment", "val/gap/alignment"), ("uniformity", "val/gap/uniformity_union"),
]


def run_one(recipe: str, overrides: list[str], train: bool) -> dict:
    """In this process: fit (or validate) and return the metrics, wall time and peak RSS."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from clipft.config import load_config
    from clipft.runner import fit, validate

    start = time.perf_counter()
    cfg = load_config(recipe, overrides)
    report = fit(cfg) if train else validate(cfg)
    return {"metrics": report["metrics"], "wall_s": time.perf_counter() - start,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_arm(recipe: str, overrides: list[str], train: bool) -> dict:
    """One arm in a fresh process (its own wall time and peak memory)."""
    job = json.dumps({"recipe": recipe, "overrides": overrides, "train": train})
    done = subprocess.run([sys.executable, __file__, "--job", job], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{recipe} {overrides} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(title: str, columns: list[tuple[str, str]], rows: dict[str, list[dict]]) -> str:
    lines = [f"### {title}", "", "| run | " + " | ".join(c for c, _ in columns) + " | wall s | peak MB |",
             "|---" * (len(columns) + 3) + "|"]
    for label, results in rows.items():
        cells = [_cell([r["metrics"][key] for r in results if key in r["metrics"]]) for _, key in columns]
        wall = statistics.mean(r["wall_s"] for r in results)
        peak = max(r["peak_mb"] for r in results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall:.0f} | {peak:.0f} |")
    return "\n".join(lines)


def run_arms(arms: list[tuple[str, str, Optional[list[str]]]], common: list[str], seeds: list[int], out: Path,
             name: str) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for label, recipe, overrides in arms:
        rows[label] = []
        for seed in seeds:
            folder = out / name / f"{len(rows):02d}_seed{seed}"
            extra = [*common, f"run.seed={seed}", f"run.out_dir={folder}"]
            train = overrides is not None
            result = run_arm(recipe, [*extra, *(overrides if train else ["method.name=finetune"])], train=train)
            rows[label].append(result)
            print(f"{name} | {label} | seed {seed} | {result['wall_s']:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--twemoji", default=str(ROOT.parent / "shared" / "data" / "twemoji64"))
    parser.add_argument("--no-twemoji", action="store_true")
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job)
        print(json.dumps(run_one(job["recipe"], job["overrides"], job["train"])))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="compare_methods_"))
    quiet = ["trainer.enable_progress_bar=false", "run.plot=false"]
    steps = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]
    texts = []
    rows = run_arms(SYNTHETIC_ARMS, [*quiet, *steps], args.seeds, out, "synthetic")
    rows.update(run_arms(CLASS_ARMS, quiet, args.seeds, out, "classes"))
    texts.append(table(
        f"Synthetic data, {args.steps} steps of batch 128 from the shipped tiny model (seeds {args.seeds}; "
        "MMRL rows: 16-shot base-to-novel, 10 epochs of batch 4)", COLUMNS, rows))
    twemoji = Path(args.twemoji)
    if not args.no_twemoji and twemoji.is_dir():
        sys.path.insert(0, str(ROOT))
        from clipft.data.twemoji import write_tables

        tables = out / "twemoji64"
        write_tables(twemoji, tables)
        data = [f"data.train={tables / 'train.csv'}", f"data.val={tables / 'test.csv'}",
                f"eval.zeroshot[0].data={tables / 'test.csv'}", f"eval.zeroshot[1].data={tables / 'test.csv'}"]
        start = run_lit_start(out, [*quiet, *data])
        common = [*quiet, *data, f"model.pretrained={start}", f"trainer.max_steps={args.steps}",
                  f"trainer.val_check_interval={args.steps}", "optim.lr=1e-5", "optim.warmup_steps=0"]
        texts.append(table(
            f"twemoji64: LiT (locked MiniLM text tower) trained on the train split, then {args.steps} steps of batch "
            f"64 of each method on the same split at lr 1e-5, evaluated on the unseen test split (seeds {args.seeds})",
            TWEMOJI_COLUMNS, run_arms(TWEMOJI_ARMS, common, args.seeds, out, "twemoji")))
    text = "\n\n".join(texts) + "\n"
    print(text)
    (ROOT / "docs" / "results_table.md").write_text(text)
    print(f"run folders: {out}")


def run_lit_start(out: Path, overrides: list[str]) -> str:
    """The twemoji start: recipes/lit_twemoji.yaml on the train split; its last checkpoint."""
    folder = out / "twemoji_start"
    run_arm("recipes/lit_twemoji.yaml", [*overrides, f"run.out_dir={folder}"], train=True)
    return str(next(folder.rglob("last.ckpt")))


if __name__ == "__main__":
    main()
