"""MMRL and MMRL++ against zero-shot and a linear probe, base-to-novel (CoOp's protocol), from
the same frozen starting model and the same k-shot sample.

    python benchmarks/mmrl.py                      # recipes/mmrl.yaml and mmrlpp.yaml: synthetic objects
    python benchmarks/mmrl.py --seeds 1 2 3        # mean ± s.d. over few-shot samples

Rows: zero-shot (the start, its class prompts); the ``linear_probe`` method's probe on the frozen
image features of the k-shot base images (L-BFGS logistic regression, λ chosen on a held-out fifth;
base classes only: novel classes fall back to zero-shot, so its novel column is zero-shot's);
MMRL; MMRL++.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from arms import ROOT, run_arm  # noqa: E402  (sets the environment and sys.path)

import clipft.methods  # noqa: E402,F401  (every method registers its settings)
from clipft.config import load_config  # noqa: E402
from clipft.data.datamodule import ImageTextDataModule, stack_images  # noqa: E402
from clipft.methods.linear_probe import fit_linear_probe  # noqa: E402
from clipft.models import build_model  # noqa: E402


@torch.no_grad()
def _features(model: torch.nn.Module, dataset, labels_of) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=lambda items: items)
    features, labels = [], []
    for items in loader:
        features.append(F.normalize(model.encode_image(stack_images(items)), dim=-1))
        labels.extend(labels_of(item) for item in items)
    return torch.cat(features), torch.tensor(labels)


def linear_probe(recipe: str, overrides: list[str]) -> dict[str, float]:
    """Base accuracy of the ``linear_probe`` method's probe (clipft.methods.linear_probe: an
    L2-regularised logistic regression on the frozen unit image features of the k-shot base
    images, λ chosen on a held-out fifth of them); novel = zero-shot."""
    cfg = load_config(recipe, overrides)
    bundle = build_model(cfg.model)
    model = bundle.model.eval()
    data = ImageTextDataModule(cfg.data, bundle.preprocess_val, bundle.preprocess_val, bundle.tokenizer, seed=cfg.run.seed)
    data.prepare_sources()
    classes = data.classes
    assert classes is not None
    label = lambda item: item[1].label  # noqa: E731
    train_x, train_y = _features(model, data.class_training_set(), label)
    val_x, val_y = _features(model, data.class_validation_set(), label)
    with torch.no_grad():
        prompts = [p for c in range(len(classes.names)) for p in classes.prompts(c)]
        text = F.normalize(model.encode_text(bundle.tokenizer(prompts)), dim=-1)
        text = F.normalize(text.reshape(len(classes.names), -1, text.shape[-1]).mean(1), dim=-1)
    base, novel = classes.base, classes.novel  # base = labels 0..len(base)-1: the probe's rows
    probe = fit_linear_probe(train_x, train_y, len(base), seed=cfg.run.seed)
    with torch.no_grad():
        in_base = torch.isin(val_y, torch.tensor(base))
        base_pred = torch.tensor(base)[(val_x[in_base] @ probe.weight.T + probe.bias).argmax(-1)]
        novel_pred = torch.tensor(novel)[(val_x[~in_base] @ text[novel].T).argmax(-1)]
    b = (base_pred == val_y[in_base]).float().mean().item()
    n = (novel_pred == val_y[~in_base]).float().mean().item()
    return {"val/base_to_novel/base": b, "val/base_to_novel/novel": n, "val/base_to_novel/hm": 2 * b * n / (b + n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/mmrl.yaml")
    parser.add_argument("--recipe-plus", default="recipes/mmrlpp.yaml", help="the MMRL++ arm's recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default="mmrl_synthetic", help="benchmarks/results/<name>.md")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="mmrl_bench_"))
    quiet = ["run.plot=false"]
    arms = {
        "zero-shot": lambda seed: run_arm(args.recipe, [*quiet, f"run.seed={seed}", "method.name=finetune"], None,
                                          out / f"zeroshot_{seed}"),
        "linear probe (base), zero-shot (novel)": lambda seed: linear_probe(args.recipe, [f"run.seed={seed}"]),
        "MMRL": lambda seed: run_arm(args.recipe, [*quiet, f"run.seed={seed}"], [], out / f"mmrl_{seed}"),
        "MMRL++": lambda seed: run_arm(args.recipe_plus, [*quiet, f"run.seed={seed}"], [], out / f"mmrlpp_{seed}"),
    }
    keys = ("base", "novel", "hm")
    lines = [f"### Base-to-novel, {args.recipe}, seeds {args.seeds} (k-shot sample and training)", "",
             "| run | base | novel | HM | wall s |", "|---|---|---|---|---|"]
    for label, arm in arms.items():
        results, start = [], time.perf_counter()
        for seed in args.seeds:
            metrics = arm(seed)
            results.append([metrics[f"val/base_to_novel/{k}"] for k in keys])
        wall = (time.perf_counter() - start) / len(args.seeds)
        cells = []
        for column in zip(*results):
            mean = statistics.mean(column)
            cells.append(f"{mean:.3f} ± {statistics.stdev(column):.3f}" if len(column) > 1 else f"{mean:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    (ROOT / "benchmarks" / "results" / f"{args.name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
