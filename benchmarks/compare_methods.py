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

A registered method that none of the arms below runs gets a synthetic arm of its own when it
has a laptop recipe ``recipes/<method>.yaml`` from the same start (``model.pretrained:
synthetic``), so a new method gets its row without an edit here. To (re)run some arms only:

    python benchmarks/compare_methods.py --only "contrastive gap (Fahim et al.)" --no-twemoji

which replaces (or adds) just those rows of docs/results_table.md's synthetic table.
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
    ("group top-1", "val/sets/twemoji/zeroshot/group/top1"), ("subgroup top-1", "val/sets/twemoji/zeroshot/subgroup/top1"),
    ("R@1 i→t", "val/retrieval/i2t_r1"), ("R@1 t→i", "val/retrieval/t2i_r1"),
    ("gap", "val/gap/centroid_distance"), ("separability", "val/gap/linear_separability"),
    ("alignment", "val/gap/alignment"), ("uniformity", "val/gap/uniformity_union"),
]


def method_arms(listed: list[tuple[str, str, Optional[list[str]]]]) -> list[tuple[str, str, Optional[list[str]]]]:
    """An arm for every registered method that no listed arm runs and whose laptop recipe
    ``recipes/<method>.yaml`` starts from the shipped synthetic model: (label, recipe, [])."""
    sys.path.insert(0, str(ROOT))
    from clipft.config import peek
    from clipft.methods import METHODS

    covered = {peek(ROOT / recipe, overrides or [], "method.name") for _, recipe, overrides in listed}
    arms = []
    for name in sorted(set(METHODS) - covered):
        recipe = ROOT / "recipes" / f"{name}.yaml"
        if recipe.is_file() and peek(recipe, [], "model.pretrained") == "synthetic":
            arms.append((arm_label(name, METHODS[name].paper), f"recipes/{name}.yaml", []))
    return arms


def arm_label(name: str, paper: str) -> str:
    """'contrastive_gap', 'Fahim, Murphy & Fyshe, "..."' -> 'contrastive gap (Fahim et al.)'."""
    first_author = paper.split('"')[0].split(",")[0].split(" et al")[0].strip()
    return f"{name.replace('_', ' ')} ({first_author} et al.)" if first_author else name.replace("_", " ")


def merge_rows(text: str, new_rows: list[str], before: set[str]) -> str:
    """``text`` (docs/results_table.md) with the synthetic table's rows of the same labels
    replaced by ``new_rows``; a new label goes before the first row whose label is in
    ``before`` (the class-based arms), or after the table's last row."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### Synthetic"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("### ")), len(lines))

    def label(line: str) -> Optional[str]:
        return line.split("|")[1].strip() if line.startswith("| ") else None

    for row in new_rows:
        same = [i for i in range(start, end) if label(lines[i]) == label(row)]
        if same:
            lines[same[0]] = row
            continue
        rows_at = [i for i in range(start, end) if lines[i].startswith("|")]
        at = next((i for i in rows_at if label(lines[i]) in before), rows_at[-1] + 1)
        lines.insert(at, row)
        end += 1
    return "\n".join(lines) + "\n"


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
    return "\n".join(lines + table_rows(columns, rows))


def table_rows(columns: list[tuple[str, str]], rows: dict[str, list[dict]]) -> list[str]:
    """One markdown row per arm: mean ± s.d. over its seeds, mean wall time, peak memory."""
    lines = []
    for label, results in rows.items():
        cells = [_cell([r["metrics"][key] for r in results if key in r["metrics"]]) for _, key in columns]
        wall = statistics.mean(r["wall_s"] for r in results)
        peak = max(r["peak_mb"] for r in results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall:.0f} | {peak:.0f} |")
    return lines


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
    parser.add_argument("--only", nargs="+", metavar="LABEL",
                        help="run only these synthetic/class arms (their row labels) and replace just their rows "
                             "in docs/results_table.md")
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job)
        print(json.dumps(run_one(job["recipe"], job["overrides"], job["train"])))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="compare_methods_"))
    quiet = ["trainer.enable_progress_bar=false", "run.plot=false"]
    steps = [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]
    synthetic_arms = SYNTHETIC_ARMS + method_arms(SYNTHETIC_ARMS + CLASS_ARMS)
    if args.only:
        run_only(args.only, synthetic_arms, [*quiet, *steps], quiet, args.seeds, out)
        return
    texts = []
    rows = run_arms(synthetic_arms, [*quiet, *steps], args.seeds, out, "synthetic")
    rows.update(run_arms(CLASS_ARMS, quiet, args.seeds, out, "classes"))
    texts.append(table(
        f"Synthetic data, {args.steps} steps of batch 128 from the shipped tiny model (seeds {args.seeds}; "
        "MMRL rows: 16-shot base-to-novel, 10 epochs of batch 4)", COLUMNS, rows))
    twemoji = Path(args.twemoji)
    if not args.no_twemoji and twemoji.is_dir():
        # the recipe reads twemoji64 (and noto64, its shifted set) from $CLIPFT_DATA as they ship;
        # the arms' processes inherit it
        os.environ["CLIPFT_DATA"] = str(twemoji.parent)
        start = run_lit_start(out, quiet)
        common = [*quiet, f"model.pretrained={start}", f"trainer.max_steps={args.steps}",
                  f"trainer.val_check_interval={args.steps}", "optim.lr=1e-5", "optim.warmup_steps=0"]
        texts.append(table(
            f"twemoji64: LiT (locked MiniLM text tower) trained on the train split, then {args.steps} steps of batch "
            f"64 of each method on the same split at lr 1e-5, evaluated on the unseen test split (seeds {args.seeds})",
            TWEMOJI_COLUMNS, run_arms(TWEMOJI_ARMS, common, args.seeds, out, "twemoji")))
    text = "\n\n".join(texts) + "\n"
    print(text)
    (ROOT / "docs" / "results_table.md").write_text(text)
    print(f"run folders: {out}")


def run_only(labels: list[str], synthetic_arms: list[tuple[str, str, Optional[list[str]]]], synthetic_common: list[str],
             class_common: list[str], seeds: list[int], out: Path) -> None:
    """Run the named arms, print their rows and put them into docs/results_table.md."""
    known = {label for label, _, _ in synthetic_arms + CLASS_ARMS}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise SystemExit(f"--only: no arm named {unknown}; the arms: {sorted(known)}")
    rows = run_arms([a for a in synthetic_arms if a[0] in labels], synthetic_common, seeds, out, "synthetic")
    rows.update(run_arms([a for a in CLASS_ARMS if a[0] in labels], class_common, seeds, out, "classes"))
    new_rows = table_rows(COLUMNS, rows)
    print("\n".join(new_rows))
    path = ROOT / "docs" / "results_table.md"
    path.write_text(merge_rows(path.read_text(), new_rows, {label for label, _, _ in CLASS_ARMS}))
    print(f"rows replaced in {path.relative_to(ROOT)}; run folders: {out}")


def run_lit_start(out: Path, overrides: list[str]) -> str:
    """The twemoji start: recipes/lit_twemoji.yaml on the train split; its last checkpoint."""
    folder = out / "twemoji_start"
    run_arm("recipes/lit_twemoji.yaml", [*overrides, f"run.out_dir={folder}"], train=True)
    return str(next(folder.rglob("last.ckpt")))


if __name__ == "__main__":
    main()
