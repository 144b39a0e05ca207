"""``clipft wise-ft RUN --alphas 0 0.25 0.5 0.75 1``: WiSE-FT's sweep (Wortsman et al., "Robust
fine-tuning of zero-shot models", CVPR 2022, Eq. 1: θ_α = (1 − α)·θ₀ + α·θ₁) of a run that
started from pre-trained weights θ₀, on every named evaluation set of the run (``eval.sets``).

It writes into the run folder ``wise_ft.json`` and ``wise_ft.md`` (each α's metrics per set, the
in-domain and shifted means, the best α by the mean over the sets) and ``wise_ft.png`` (in-domain
vs shifted, one point per α, as WiSE-FT's Figure 1). ``clipft export RUN --wise-ft α`` then
writes the chosen α's weights. A classifier's head (``classifier``, ``linear_probe``, ``lp_ft``)
is interpolated with them, from its zero-shot head, and scores the tasks of its classes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from clipft.config import LoraSettings
from clipft.eval.report import write_json_atomic, write_text_atomic
from clipft.eval.sets import PREFIX, build_eval_set, evaluate_sets
from clipft.export import ExportError, resolve_checkpoint, run_config, wise_ft
from clipft.methods.classifier import head_at
from clipft.models import ModelError, build_model, read_state_dict

OUTPUTS = ("wise_ft.json", "wise_ft.md", "wise_ft.png")


class WiseFtError(ValueError):
    """A run that cannot be swept as asked (the message says why and what to do)."""


class Encoder:
    """What the set evaluation calls on a model: an open_clip model's unit features."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: torch.device, head: Any = None) -> None:
        self.model, self.tokenizer, self.device, self._trainer = model, tokenizer, device, None
        self.head = head  # a classifier's head at the same α (clipft.methods.classifier.head_at)

    def head_for(self, class_names: Any) -> Any:
        """The head, for a zero-shot task of exactly its classes (as the methods' ``head_for``)."""
        return self.head if self.head is not None and list(class_names) == self.head.class_names else None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


def _metric(sets: list[Any], wanted: Optional[str]) -> str:
    """The metric WiSE-FT's picture compares: ``wanted``, else the first zero-shot task every
    set has (top-1), else retrieval mean R@1."""
    if wanted:
        return wanted
    common = set.intersection(*({t.name for t in s.zeroshot} for s in sets))
    first = next((t.name for t in sets[0].zeroshot if t.name in common), None)
    return f"zeroshot/{first}/top1" if first else "retrieval/mean_r1"


def sweep(run: str | Path, alphas: Sequence[float], metric: Optional[str] = None, force: bool = False,
          device: Optional[str] = None) -> dict[str, Any]:
    """Evaluate θ_α for each α on the run's sets and write the table and the picture into the run folder."""
    run_dir = Path(run)
    try:
        checkpoint = resolve_checkpoint(run_dir)
        if not run_dir.is_dir():
            raise WiseFtError(f"{run_dir}: give the run folder (the table and plot are written into it)")
        cfg = run_config(checkpoint)
    except (ExportError, ModelError) as err:
        raise WiseFtError(str(err)) from err
    if cfg.model.pretrained is None:
        raise WiseFtError(f"{run_dir}: the run started from random weights (model.pretrained is null): there is no "
                          "pre-trained start to interpolate with; WiSE-FT is for runs fine-tuned from pre-trained weights")
    if not cfg.eval.sets:
        raise WiseFtError(f"{run_dir}: the run has no eval.sets to evaluate; name its in-domain and shifted sets "
                          "in the recipe (docs/evaluation.md#evaluation-sets)")
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise WiseFtError(f"--alphas {' '.join(map(str, alphas))}: give values in [0, 1] (0: the start, 1: the fine-tuned model)")
    taken = [name for name in OUTPUTS if (run_dir / name).exists()]
    if taken and not force:
        raise WiseFtError(f"{run_dir}: {', '.join(taken)} exist from an earlier sweep; pass --force to replace them")
    adapted = read_state_dict(checkpoint)  # LoRA merged, open_clip's names
    bundle = build_model(dataclasses.replace(cfg.model, lora=LoraSettings(), cache_locked_text=False))
    start = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = bundle.model.to(target).eval()
    sets = [build_eval_set(s, cfg.data, bundle.preprocess_val, cfg.run.seed) for s in cfg.eval.sets]
    key = _metric(cfg.eval.sets, metric)
    shifted = {s.name for s in cfg.eval.sets if s.shifted}
    rows = []
    for alpha in alphas:
        model.load_state_dict(wise_ft(start, adapted, alpha))
        head = head_at(checkpoint, alpha)  # a classifier's head, interpolated from its zero-shot start alike
        metrics = evaluate_sets(Encoder(model, bundle.tokenizer, target, head.to(target) if head else None), sets,
                                cfg.eval.retrieval.ks, cfg.eval.batch_size)
        if f"{PREFIX}mean/{key}" not in metrics:
            raise WiseFtError(f"--metric {key}: not a metric of every set (e.g. zeroshot/<task>/top1, retrieval/mean_r1)")
        score = {s.name: metrics[f"{PREFIX}{s.name}/{key}"] for s in cfg.eval.sets}
        groups = {"in_domain": [v for n, v in score.items() if n not in shifted], "shifted": [score[n] for n in shifted]}
        rows.append({"alpha": alpha, "metrics": metrics, "mean": metrics[f"{PREFIX}mean/{key}"],
                     **{g: sum(v) / len(v) if v else None for g, v in groups.items()}})
    best = max(rows, key=lambda r: r["mean"])
    result = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "start": cfg.model.pretrained, "metric": key,
              "sets": {s.name: ("shifted" if s.shifted else "in-domain") for s in cfg.eval.sets},
              "best_alpha": best["alpha"], "rows": rows}
    write_json_atomic(run_dir / "wise_ft.json", result)
    write_text_atomic(run_dir / "wise_ft.md", render(result))
    plot(result, run_dir / "wise_ft.png")
    return result


def render(result: dict[str, Any]) -> str:
    key, sets = result["metric"], list(result["sets"])
    lines = [f"# WiSE-FT sweep: {result['run_dir']}", "",
             f"θ_α = (1 − α)·θ₀ + α·θ₁, θ₀ = the start ({result['start']}), θ₁ = {result['checkpoint']}. "
             f"Metric: {key} (balanced = mean per-class recall).", "",
             "| α | " + " | ".join(f"{n} ({result['sets'][n]})" for n in sets) + " | in-domain | shifted | mean |",
             "|---|" + "---|" * (len(sets) + 3)]
    balanced = key.replace("/top1", "/mean_per_class_recall") if key.endswith("/top1") else None
    for row in result["rows"]:
        cells = []
        for n in sets:
            cell = f"{row['metrics'][f'{PREFIX}{n}/{key}']:.4f}"
            if balanced and f"{PREFIX}{n}/{balanced}" in row["metrics"]:
                cell += f" ({row['metrics'][f'{PREFIX}{n}/{balanced}']:.4f} balanced)"
            cells.append(cell)
        cells += ["–" if row[g] is None else f"{row[g]:.4f}" for g in ("in_domain", "shifted")]
        mark = "**" if row["alpha"] == result["best_alpha"] else ""
        lines.append(f"| {mark}{row['alpha']:g}{mark} | " + " | ".join(cells) + f" | {mark}{row['mean']:.4f}{mark} |")
    lines += ["", f"Best α by the mean over the sets: **{result['best_alpha']:g}** "
              f"(write it: `clipft export {result['run_dir']} --wise-ft {result['best_alpha']:g} --out DIR`).", "",
              "![WiSE-FT: in-domain vs shifted](wise_ft.png)", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], out: Path) -> None:
    """In-domain vs shifted, one point per α (both kinds of set present); else the metric vs α per set."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    rows, key = result["rows"], result["metric"]
    if all(r["in_domain"] is not None and r["shifted"] is not None for r in rows):
        xs, ys = [r["in_domain"] for r in rows], [r["shifted"] for r in rows]
        ax.plot(xs, ys, "-o", color="tab:blue")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        best = next(r for r in rows if r["alpha"] == result["best_alpha"])
        ax.plot([best["in_domain"]], [best["shifted"]], "*", color="tab:red", markersize=14, label=f"best α = {best['alpha']:g} (mean)")
        ax.set(xlabel=f"in-domain {key}", ylabel=f"shifted {key}")
    else:
        alphas = [r["alpha"] for r in rows]
        for name in result["sets"]:
            ax.plot(alphas, [r["metrics"][f"{PREFIX}{name}/{key}"] for r in rows], "-o", label=name)
        ax.axvline(result["best_alpha"], color="tab:red", linestyle=":", label=f"best α = {result['best_alpha']:g} (mean)")
        ax.set(xlabel="α", ylabel=key)
    ax.set_title("WiSE-FT: θ = (1 − α)·start + α·fine-tuned", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main_json(result: dict[str, Any]) -> str:
    return json.dumps({"wise_ft": str(Path(result["run_dir"]) / "wise_ft.json"), "best_alpha": result["best_alpha"]})
