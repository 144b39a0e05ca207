"""Compositional evaluation in SugarCrepe's format (Hsieh et al., NeurIPS 2023).

A benchmark folder holds one JSON file per subset, ``<subset>.json``:
``{"<id>": {"filename": "...", "caption": "...", "negative_caption": "..."}, ...}``, with image
file names relative to an image folder. An item is right when the image is closer to its
caption than to the negative caption: cos(v̂, t̂⁺) > cos(v̂, t̂⁻). Accuracy is reported per
subset and averaged into SugarCrepe's REPLACE (obj, att, rel), SWAP (obj, att) and ADD (obj,
att) groups over the subsets present.

:func:`write_synthetic_benchmark` writes such a folder for held-out scenes of the synthetic data
set, with exact negatives from the scene description; a real SugarCrepe download (its JSON
files plus the COCO val2017 images) is read by the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from clipft.data.synthetic import (
    COLOURS,
    HELD_OUT_COMBOS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    SyntheticScenes,
)

# Bump when the generated items change, so cached folders are rewritten.
BENCHMARK_VERSION = 2

SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
GROUPS = {
    "REPLACE": ("replace_obj", "replace_att", "replace_rel"),
    "SWAP": ("swap_obj", "swap_att"),
    "ADD": ("add_obj", "add_att"),
}
_OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


@dataclass
class CompositionalItem:
    image: Path
    caption: str
    negative: str


def load_benchmark(folder: str | Path, image_root: Optional[str | Path] = None) -> dict[str, list[CompositionalItem]]:
    """Read ``<subset>.json`` files (SugarCrepe layout) from ``folder``; images are looked up
    in ``image_root`` (default: ``folder/images``). Missing subsets are skipped; a malformed
    item or a missing image is an error naming the file and the item."""
    folder = Path(folder)
    root = Path(image_root) if image_root else folder / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"compositional benchmark folder '{folder}' not found")
    subsets: dict[str, list[CompositionalItem]] = {}
    for subset in SUBSETS:
        path = folder / f"{subset}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
        items = []
        for key, item in data.items():
            missing = [k for k in ("filename", "caption", "negative_caption") if not item.get(k)]
            if missing:
                raise ValueError(f"{path}: item '{key}' lacks {', '.join(missing)}")
            image = root / item["filename"]
            if not image.is_file():
                raise FileNotFoundError(f"{path}: item '{key}': image '{image}' not found")
            items.append(CompositionalItem(image, item["caption"], item["negative_caption"]))
        subsets[subset] = items
    if not subsets:
        raise FileNotFoundError(f"{folder}: no subset files ({', '.join(s + '.json' for s in SUBSETS)})")
    return subsets


def pair_hits(image: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """Per row, whether cos(image, positive) > cos(image, negative) (L2-normalised inputs; a tie
    counts as wrong)."""
    if not (image.shape == positive.shape == negative.shape):
        raise ValueError(f"shapes differ: {tuple(image.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}")
    pos = (image * positive).sum(-1)
    neg = (image * negative).sum(-1)
    return pos > neg


def pair_accuracy(image: Tensor, positive: Tensor, negative: Tensor) -> float:
    """Fraction of rows of :func:`pair_hits`."""
    return pair_hits(image, positive, negative).double().mean().item()


def group_averages(per_subset: dict[str, float]) -> dict[str, float]:
    """SugarCrepe's REPLACE / SWAP / ADD: means of the subsets present in each group."""
    out = {}
    for group, members in GROUPS.items():
        present = [per_subset[m] for m in members if m in per_subset]
        if present:
            out[group] = sum(present) / len(present)
    return out


# ----------------------------------------------------------------------------- synthetic


def _seen(colour: str, shape: str) -> bool:
    return (colour, shape) not in HELD_OUT_COMBOS


def _negatives(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """Exact hard negatives of a scene's caption, one per subset that applies (types that do
    not apply to the scene are left out, not faked)."""
    objs = scene.objects
    out: dict[str, str] = {}

    def caption(objects: tuple[SceneObject, ...], relation: Optional[str]) -> str:
        return Scene(objects, relation, ((0.0, 0.0),) * len(objects)).caption  # the data's own grammar

    which = int(rng.integers(len(objs)))
    target = objs[which]
    # negatives name only (colour, shape) combinations seen in training, so that an item tests
    # the composition, not the novelty of a combination
    other_shapes = [
        s for s in SHAPES if all(o.shape != s for o in objs) and (target.colour, s) not in HELD_OUT_COMBOS
    ]
    other_colours = [
        c for c in COLOURS if all(o.colour != c for o in objs) and (c, target.shape) not in HELD_OUT_COMBOS
    ]

    def replaced(obj: SceneObject) -> tuple[SceneObject, ...]:
        return tuple(obj if i == which else o for i, o in enumerate(objs))

    if other_shapes:
        new = SceneObject(str(rng.choice(other_shapes)), target.colour, target.size)
        out["replace_obj"] = caption(replaced(new), scene.relation)
    if other_colours:
        new = SceneObject(target.shape, str(rng.choice(other_colours)), target.size)
        out["replace_att"] = caption(replaced(new), scene.relation)
    if len(objs) == 2:
        a, b = objs
        out["replace_rel"] = caption(objs, _OPPOSITE[scene.relation])  # type: ignore[index]
        if a.shape != b.shape and _seen(a.colour, b.shape) and _seen(b.colour, a.shape):
            out["swap_obj"] = caption(
                (SceneObject(b.shape, a.colour, a.size), SceneObject(a.shape, b.colour, b.size)), scene.relation
            )
        if a.colour != b.colour and _seen(b.colour, a.shape) and _seen(a.colour, b.shape):
            out["swap_att"] = caption(
                (SceneObject(a.shape, b.colour, a.size), SceneObject(b.shape, a.colour, b.size)), scene.relation
            )
    else:
        (a,) = objs
        extras = [
            (c, s) for c in COLOURS for s in SHAPES if c != a.colour and s != a.shape and _seen(c, s)
        ]
        colour, shape = extras[int(rng.integers(len(extras)))]
        extra = SceneObject(shape, colour, str(rng.choice(SIZES)))
        out["add_obj"] = caption((a, extra), str(rng.choice(RELATIONS)))
        # add_att: the positive leaves the size out; the negative adds the wrong size
        wrong = [s for s in SIZES if s != a.size][0]
        out["add_att"] = f"a {wrong} {a.colour} {a.shape}"
    return out


def synthetic_items(size: int, seed: int, image_size: int = 32, split: str = "val") -> list[dict[str, Any]]:
    """Benchmark items for ``size`` held-out scenes: one dict per (scene, applicable subset)."""
    scenes = SyntheticScenes(split, size, seed + 7919, image_size)  # not the validation scenes
    items = []
    for index in range(size):
        scene = scenes.scene(index)
        rng = np.random.default_rng([seed, 4242, index])
        for subset, negative in _negatives(scene, rng).items():
            positive = scene.caption
            if subset == "add_att":
                obj = scene.objects[0]
                positive = f"a {obj.colour} {obj.shape}"
            items.append({"index": index, "subset": subset, "caption": positive, "negative_caption": negative})
    return items


def write_synthetic_benchmark(
    folder: str | Path, size: int = 500, seed: int = 0, image_size: int = 32, split: str = "val"
) -> Path:
    """Write a SugarCrepe-format folder (``<subset>.json`` + ``images/``) for ``size`` held-out
    synthetic scenes. Reuses an existing folder written with the same arguments."""
    from PIL import Image

    folder = Path(folder)
    stamp = {"version": BENCHMARK_VERSION, "size": size, "seed": seed, "image_size": image_size, "split": split}
    marker = folder / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(split, size, seed + 7919, image_size)
    by_subset: dict[str, dict[str, dict[str, str]]] = {s: {} for s in SUBSETS}
    written: set[int] = set()
    for n, item in enumerate(synthetic_items(size, seed, image_size, split)):
        filename = f"{item['index']:06d}.png"
        if item["index"] not in written:
            Image.fromarray(scenes[item["index"]]["image"]).save(folder / "images" / filename)
            written.add(item["index"])
        by_subset[item["subset"]][str(n)] = {
            "filename": filename, "caption": item["caption"], "negative_caption": item["negative_caption"],
        }
    from clipft.eval.report import write_text_atomic

    for subset, data in by_subset.items():
        if data:
            write_text_atomic(folder / f"{subset}.json", json.dumps(data, indent=1))
    write_text_atomic(marker, json.dumps(stamp))  # last: marks the folder complete
    return folder


def evaluate(
    encode_images: Any, encode_texts: Any, subsets: dict[str, list[CompositionalItem]]
) -> dict[str, float]:
    """Accuracy per subset and per group. ``encode_images(paths) -> [N, D]`` and
    ``encode_texts(strings) -> [N, D]`` return L2-normalised features. Every distinct image
    and text is encoded once, however many subsets use it."""
    items = [item for subset in subsets.values() for item in subset]
    images = list(dict.fromkeys(item.image for item in items))
    texts = list(dict.fromkeys(t for item in items for t in (item.caption, item.negative)))
    image_features = encode_images(images)
    text_features = encode_texts(texts)
    image_row = {path: i for i, path in enumerate(images)}
    text_row = {text: i for i, text in enumerate(texts)}
    metric = CompositionalAccuracy(sync_on_compute=False).to(image_features.device)  # every rank has every item
    for subset, members in subsets.items():
        image = image_features[[image_row[i.image] for i in members]]
        positive = text_features[[text_row[i.caption] for i in members]]
        negative = text_features[[text_row[i.negative] for i in members]]
        metric.update(image, positive, negative, subset)
    return {k: v.item() for k, v in metric.compute().items()}


class CompositionalAccuracy(Metric):
    """SugarCrepe's compositional accuracy (Hsieh et al., NeurIPS 2023): an item is right when
    cos(image, caption) > cos(image, negative caption) (a tie is wrong).

    ``update(image [N, D], positive [N, D], negative [N, D], subset)``: L2-normalised features
    of N items of one subset (a name of ``subsets``). ``compute()`` returns the accuracy of
    each subset that has items and the mean over the subsets present of each group (REPLACE,
    SWAP, ADD). States are per-subset counts, summed across processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, subsets: Sequence[str] = SUBSETS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.subsets = tuple(subsets)
        self.add_state("correct", torch.zeros(len(self.subsets), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(self.subsets), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, image: Tensor, positive: Tensor, negative: Tensor, subset: str) -> None:
        if subset not in self.subsets:
            raise ValueError(f"subset '{subset}' is not one of: {', '.join(self.subsets)}")
        index = self.subsets.index(subset)
        self.correct[index] += pair_hits(image, positive, negative).sum().to(self.correct)
        self.total[index] += image.shape[0]

    def compute(self) -> dict[str, Tensor]:
        per_subset = {
            s: (self.correct[i].double() / self.total[i]).item() for i, s in enumerate(self.subsets) if self.total[i] > 0
        }
        out = {**per_subset, **group_averages(per_subset)}
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
