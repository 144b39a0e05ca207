"""Training curves from Lightning's ``metrics.csv``, saved as a PNG in the run folder."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Series of (step, value) per metric column of a Lightning CSVLogger file."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    series[key].append((int(float(step)), float(value)))
                except ValueError:
                    continue
    return dict(series)


def plot_training_curves(metrics_csv: Path, out_png: Path, title: Optional[str] = None) -> Optional[Path]:
    """Plot train/loss (and its terms), the learning rate and every val/* metric against
    the step. Returns the PNG path, or None when there is nothing to plot."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    series = read_metrics_csv(metrics_csv)
    train = {k: v for k, v in series.items() if k.startswith("train/") and k != "train/logit_scale"}
    val = {k: v for k, v in series.items() if k.startswith("val/") and not k.endswith(("n_images", "n_texts", "n_pairs"))}
    if not train and not val:
        return None
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    for key, points in sorted(train.items()):
        steps, values = zip(*points)
        axes[0].plot(steps, values, label=key, linewidth=1)
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[0].grid(alpha=0.3)
    if train:
        axes[0].legend(fontsize=8)
    for key, points in sorted(val.items()):
        if key == "val/loss" or any(k in key for k in ("r5", "r10", "top5")):
            continue  # keep the panel readable: R@1, top-1 and mean R@1
        steps, values = zip(*points)
        axes[1].plot(steps, values, marker="o", label=key, linewidth=1)
    axes[1].set(xlabel="step", ylabel="score", title="validation", ylim=(0, 1.02))
    axes[1].grid(alpha=0.3)
    if val:
        axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_modality_gap(
    image: "torch.Tensor", text: "torch.Tensor", metrics: dict[str, float], out_png: Path, label: Optional[str] = None
) -> Path:
    """2-D PCA projection (fitted on both modalities together) of image and text embeddings,
    coloured by modality, with paired points joined for a sample of pairs and the gap
    figures in the title."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is
    import torch

    both = torch.cat([image, text]).double()
    centred = both - both.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    n = image.shape[0]
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.subplots()
    for i in range(0, n, max(1, n // 60)):  # a few pair lines show how far pairs sit apart
        ax.plot([xy[i, 0], xy[n + i, 0]], [xy[i, 1], xy[n + i, 1]], color="0.8", linewidth=0.5, zorder=1)
    ax.scatter(xy[:n, 0], xy[:n, 1], s=6, alpha=0.6, label="image", color="tab:blue", zorder=2)
    ax.scatter(xy[n:, 0], xy[n:, 1], s=6, alpha=0.6, label="text", color="tab:orange", zorder=2)
    for rows, colour in ((slice(0, n), "navy"), (slice(n, 2 * n), "darkred")):
        centre = xy[rows].mean(0)
        ax.scatter([centre[0]], [centre[1]], marker="X", s=120, color=colour, edgecolor="white", zorder=3)
    title = (
        f"centroid distance {metrics['centroid_distance']:.3f} · separability {metrics['linear_separability']:.2f}\n"
        f"alignment {metrics['alignment']:.3f} · uniformity (union) {metrics['uniformity_union']:.2f}"
    )
    if label:
        title = f"{label}: " + title
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(loc="best", markerscale=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
