"""Class-labelled images for few-shot adaptation (MMRL): the classes and their prompts, the
base/novel split of CoOp's base-to-novel protocol, and the k-shot training sample.

A class-based source (``data.classes.enabled``, or ``data.source: folder``) yields pairs
whose caption is the class prompt and whose :class:`Labelled` target carries the label, so
every method still sees image-caption pairs, and class-based methods also get labels.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from clipft.data.table import DataError

log = logging.getLogger(__name__)

# CoOp's hand-written prompt of each data set of the base-to-novel benchmark (MMRL uses them).
COOP_TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}


@dataclass(frozen=True)
class Labelled:
    """A training/validation target of a class-based source: the prompt of its class, and the label."""

    caption: str
    label: int


@dataclass
class ClassSet:
    """The classes of a data set in label order, their prompt templates, and CoOp's split:
    base = the first ceil(C/2) labels, novel = the rest."""

    names: list[str]
    templates: list[str]

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise DataError(f"a class-based data set needs at least 2 classes, got {self.names}")
        for template in self.templates:
            if "{}" not in template:
                raise DataError(f"class prompt template {template!r} has no '{{}}' for the class name")

    @property
    def base(self) -> list[int]:
        return list(range(math.ceil(len(self.names) / 2)))

    @property
    def novel(self) -> list[int]:
        return list(range(math.ceil(len(self.names) / 2), len(self.names)))

    def prompts(self, label: int) -> list[str]:
        return [template.format(self.names[label]) for template in self.templates]

    def caption(self, label: int) -> str:
        """The caption a pair of this class carries (the first template)."""
        return self.prompts(label)[0]


def read_class_names(path: str | Path, labels: Sequence[str], key: str = "data.classes.names") -> dict[str, str]:
    """A JSON file ``{label or folder name: class name}``, or a data set's class file whose
    values are lists of ``{"key": label, "text" (or "name"): class name}`` objects (as the emoji
    data sets' classes.json); every label must be in it."""
    path = Path(path)
    data = _read_json(path, key)
    mapping = {str(k): str(v) for k, v in data.items() if isinstance(v, str)}
    for value in data.values():  # lists of {key, text|name} objects
        for item in value if isinstance(value, list) else []:
            if isinstance(item, dict) and "key" in item and ("text" in item or "name" in item):
                mapping[str(item["key"])] = str(item.get("text", item.get("name")))
    missing = sorted(set(labels) - set(mapping))
    if missing:
        raise DataError(f"{path}: no class name for labels {missing[:10]}")
    return mapping


def read_subclasses(spec: str, folder: Path, names_file: Optional[Path], labels: Sequence[str], label_key: str,
                    key: str) -> list[list[str]]:
    """The subclass names of each label, in the order of ``labels``: from a JSON file ``{label:
    [subclass name, ...]}`` (``spec`` ends in .json, relative to ``folder``), or from the list
    ``spec`` of the class-name file, whose items are ``{"key", "text" (or "name"), <label_key>:
    label}`` (the emoji data sets' ``subgroups``, each naming its ``group``). Every label needs
    at least one subclass."""
    if spec.endswith(".json"):
        path = Path(spec) if Path(spec).is_absolute() else folder / spec
        data = _read_json(path, key)
        by_label = {str(k): [str(n) for n in v] for k, v in data.items() if isinstance(v, list)}
    else:
        if names_file is None:
            raise DataError(f"{key}={spec!r}: a list of the class-name file needs `names` (e.g. names: classes.json), "
                            "or give a JSON file {label: [subclass name, ...]}")
        data = _read_json(names_file, key)
        items = data.get(spec)
        if not isinstance(items, list):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            raise DataError(f"{names_file}: no list '{spec}' for {key} (lists there: {', '.join(lists) or 'none'})")
        by_label = {}
        for item in items:
            if isinstance(item, dict) and label_key in item and ("text" in item or "name" in item):
                by_label.setdefault(str(item[label_key]), []).append(str(item.get("text", item.get("name"))))
        if not by_label:
            raise DataError(f"{names_file}: the items of '{spec}' need a '{label_key}' field naming their class "
                            f"(and a 'text' or 'name'), for {key}")
        path = names_file
    missing = [label for label in labels if not by_label.get(label)]
    if missing:
        raise DataError(f"{path}: no subclasses for labels {missing[:10]} ({key})")
    return [by_label[label] for label in labels]


def _read_json(path: Path, key: str) -> dict:
    if not path.is_file():
        raise DataError(f"{key}: file '{path}' not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def few_shot_indices(labels: Sequence[int], shots: int, seed: int, classes: Sequence[int]) -> list[int]:
    """Indices of ``shots`` items of each class in ``classes``, drawn without replacement by a
    generator seeded with ``seed`` (a class with fewer items gives all it has, with a warning).
    Sorted, so the sample does not depend on the order classes are visited."""
    if shots < 1:
        raise ValueError(f"data.classes.shots must be >= 1, got {shots}")
    by_class: dict[int, list[int]] = {c: [] for c in classes}
    for index, label in enumerate(labels):
        if label in by_class:
            by_class[label].append(index)
    rng = random.Random(seed)
    chosen: list[int] = []
    short = {c: len(items) for c, items in by_class.items() if len(items) < shots}
    if short:
        log.warning("classes with fewer than %d training images use all they have: %s", shots, short)
    for label in sorted(by_class):
        items = by_class[label]
        chosen.extend(items if len(items) <= shots else rng.sample(items, shots))
    return sorted(chosen)


class ClassFetch:
    """A class-based view of a fetcher: the items at ``indices``, whose target becomes
    :class:`Labelled` (the class prompt and the label)."""

    def __init__(self, fetch: Callable[[int], tuple[Any, Any, str]], labels: Sequence[int], indices: Sequence[int],
                 classes: ClassSet) -> None:
        self.fetch = fetch
        self.labels = list(labels)
        self.indices = list(indices)
        self.captions = [classes.caption(c) for c in range(len(classes.names))]

    def __len__(self) -> int:
        return len(self.indices)

    def __call__(self, index: int) -> tuple[Any, Labelled, str]:
        source = self.indices[index]
        image, _, image_id = self.fetch(source)
        label = self.labels[source]
        return image, Labelled(self.captions[label], label), image_id


def template_list(templates: Optional[Sequence[str]], template_set: Optional[str], default: Sequence[str]) -> list[str]:
    if templates:
        return list(templates)
    if template_set is not None:
        if template_set not in COOP_TEMPLATES:
            raise DataError(f"data.classes.template_set: unknown '{template_set}' (known: {', '.join(COOP_TEMPLATES)})")
        return [COOP_TEMPLATES[template_set]]
    return list(default)


__all__ = [
    "COOP_TEMPLATES",
    "ClassFetch",
    "ClassSet",
    "Labelled",
    "few_shot_indices",
    "read_class_names",
    "template_list",
]
