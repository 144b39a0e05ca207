"""``report.json`` and ``report.md`` (the validation metrics as tables a person reads),
written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

_SECTIONS = (
    ("retrieval", "Retrieval (image→text, text→image)"),
    ("zeroshot", "Zero-shot classification"),
    ("compositional", "Compositional (SugarCrepe format: image closer to its caption than to the negative)"),
    ("gap", "Modality gap, alignment and uniformity"),
)

_GAP_NOTES = {
    "centroid_distance": "‖mean image − mean text‖ (0 = no gap; CLIP ViT-B/32 on COCO ≈ 0.82)",
    "centroid_mse": "‖Δ‖²/D, CLIP-Refine's number",
    "mean_pair_distance": "mean ‖image − its text‖",
    "linear_separability": "logistic regression image vs text, held-out pairs (0.5 = inseparable)",
    "alignment": "mean ‖image − its text‖², lower = pairs closer",
    "uniformity_image": "log E exp(−2‖x−y‖²), lower = more uniform",
    "uniformity_text": "",
    "uniformity_union": "images and texts together",
    "relative_alignment": "‖t−v‖² − min other ‖t−v'‖², negative = own image is nearest",
}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


SETS_PREFIX = "val/sets/"


def by_set(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``val/sets/<name>/<metric>`` keys as {name: {metric: value}} (report.json's ``sets``;
    ``mean`` is the mean over the sets)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(SETS_PREFIX):
            name, _, metric = key[len(SETS_PREFIX):].partition("/")
            out.setdefault(name, {})[metric] = value
    return out


def _sets_table(sets: dict[str, dict[str, float]]) -> list[str]:
    """One row per evaluation set (the mean last): zero-shot top-1 and balanced accuracy per
    task, retrieval R@1."""
    present = {k for m in sets.values() for k in m}
    tasks = sorted({k.split("/")[1] for k in present if k.startswith("zeroshot/")})
    keys = [f"zeroshot/{t}/{m}" for t in tasks for m in ("top1", "mean_per_class_recall") if f"zeroshot/{t}/{m}" in present]
    keys += [k for k in ("retrieval/i2t_r1", "retrieval/t2i_r1") if k in present]
    header = [k.replace("zeroshot/", "").replace("mean_per_class_recall", "balanced").replace("retrieval/", "") for k in keys]
    lines = ["## Evaluation sets", "", "| set | " + " | ".join(header) + " |", "|---|" + "---|" * len(keys)]
    for name in sorted(sets, key=lambda n: (n == "mean", n)):
        label = f"**{name}**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join(_fmt(sets[name].get(k, "")) for k in keys) + " |")
    return lines + ["", "balanced: mean per-class recall; mean: over the sets.", ""]


def render_markdown(report: dict[str, Any]) -> str:
    metrics: dict[str, float] = report.get("metrics", {})
    lines = [f"# clipft report: {report.get('run_dir', '')}", ""]
    facts = [
        ("method", report.get("method")), ("model", report.get("model")), ("checkpoint", report.get("checkpoint")),
        ("checkpoint step", report.get("checkpoint_step")),
        ("steps", report.get("steps", report.get("global_step"))), ("train time (s)", report.get("train_time_s")),
    ]
    lines += [f"- {k}: {v}" for k, v in facts if v is not None]
    if "val/loss" in metrics:
        world = report.get("world_size", 1)
        lines.append(
            f"- validation loss: {metrics['val/loss']:.4f} (mean over batches of {report.get('val_batch_size', '?')} "
            f"pairs on each of {world} device{'s' if world != 1 else ''}: it depends on both)"
        )
    lines.append("")
    if by_set(metrics):
        lines += _sets_table(by_set(metrics))
    for section, title in _SECTIONS:
        rows = {k[len(f"val/{section}/"):]: v for k, v in metrics.items() if k.startswith(f"val/{section}/")}
        if not rows:
            continue
        lines += [f"## {title}", ""]
        if section == "retrieval":
            ks = sorted({int(k.split("_r")[1]) for k in rows if "_r" in k and k.split("_r")[1].isdigit()})
            lines += ["| direction | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
            for direction, name in (("i2t", "image → text"), ("t2i", "text → image")):
                lines.append(f"| {name} | " + " | ".join(_fmt(rows.get(f"{direction}_r{k}")) for k in ks) + " |")
            if "n_images" in rows:
                lines += ["", f"{int(rows['n_images'])} images, {int(rows['n_texts'])} distinct captions."]
        elif section == "zeroshot":
            tasks = sorted({k.split("/")[0] for k in rows})
            columns = sorted({k.split("/")[1] for k in rows})
            lines += ["| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            for task in tasks:
                lines.append(f"| {task} | " + " | ".join(_fmt(rows.get(f"{task}/{c}", "")) for c in columns) + " |")
        elif section == "compositional":
            groups = [k for k in rows if k.isupper()]
            subsets = [k for k in rows if not k.isupper()]
            lines += ["| subset | accuracy |", "|---|---|"]
            lines += [f"| {k} | {_fmt(rows[k])} |" for k in sorted(subsets)]
            lines += [f"| **{k}** | **{_fmt(rows[k])}** |" for k in ("REPLACE", "SWAP", "ADD") if k in groups]
        else:
            counts = {k: rows.pop(k) for k in ("n_pairs", "n_images") if k in rows}
            lines += ["| metric | value | meaning |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(v)} | {_GAP_NOTES.get(k, '')} |" for k, v in rows.items()]
            if counts:
                lines += ["", f"On {int(counts.get('n_pairs', 0))} validation pairs of {int(counts.get('n_images', 0))} images."]
            lines += ["", "![modality gap](gap.png)"]
        lines.append("")
    if report.get("train_time_s") is not None:
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    return "\n".join(lines)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a report is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
