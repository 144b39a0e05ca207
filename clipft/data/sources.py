"""Data sources behind one registry: ``data.source`` and ``eval.zeroshot[i].source`` name a
class here (synthetic, csv, folder, webdataset).

A source says what a recipe must give it (checked when the recipe is composed, before anything
is built) and builds what the data module and the zero-shot evaluation read: training and
validation pairs, class-labelled splits, labelled images. Adding a source is one class in this
file, decorated with :func:`register_source` (and its reader, when it has a new file format).

The classes register with :mod:`clipft.config` (as the methods register their settings), so
that config can check a recipe against its source without importing this package, which
imports config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from clipft.config import ConfigError, DataConfig, ZeroShotTaskConfig, data_source, register_data_source
from clipft.data import synthetic
from clipft.data.classes import read_class_names, read_subclasses
from clipft.data.shards import ShardFetch, ShardSet, check_first_sample, epoch_length, expand_shards, index_shards, is_table
from clipft.data.synthetic import SyntheticScenes, label_of, one_object_eval_set
from clipft.data.table import DataError, Split, Table, concat_tables, load_rgb, read_image_folder, read_split_file, read_table

Fetch = Callable[[int], tuple[Any, Any, str]]  # index -> (image, target, image id); has len()


# ------------------------------------------------------------------------ fetchers
# A fetcher maps an index to (image, target, image id). They are small classes, not lambdas,
# so that DataLoader workers can pickle them.


class SyntheticFetch:
    """Synthetic scenes as uint8 arrays (see :mod:`clipft.data.transforms`); the target is
    the caption, or a class index for ``label_task``."""

    def __init__(self, scenes: SyntheticScenes, label_task: Optional[str] = None) -> None:
        self.scenes = scenes
        self.label_task = label_task

    def __len__(self) -> int:
        return len(self.scenes)

    def __call__(self, index: int) -> tuple[np.ndarray, Any, str]:
        item = self.scenes[index]
        target = item["caption"] if self.label_task is None else label_of(item["scene"], self.label_task)
        return item["image"], target, f"synthetic:{self.scenes.split}:{index}"


class TableFetch:
    """Rows of a checked table; targets are the captions, or class indices via ``label_to_index``."""

    def __init__(self, table: Table, label_to_index: Optional[dict[str, int]] = None) -> None:
        self.table = table
        self.label_to_index = label_to_index

    def __len__(self) -> int:
        return len(self.table)

    def __call__(self, index: int) -> tuple[Image.Image, Any, str]:
        path = self.table.images[index]
        text = self.table.texts[index]
        target: Any = text if self.label_to_index is None else self.label_to_index[text]
        if self.table.negatives is not None:  # the row's own negative captions travel with it
            target = (text, self.table.negatives[index])
        return load_rgb(path), target, str(path)


# ------------------------------------------------------------------------ what a source builds


@dataclass
class Pairs:
    """Image-caption pairs for the data module: training pairs by index (``train``) or
    streamed from ``shards`` (``epoch_samples`` per epoch), validation pairs by index."""

    train: Optional[Fetch] = None
    val: Optional[Fetch] = None
    shards: Optional[ShardSet] = None
    epoch_samples: int = 0


@dataclass
class ClassSplits:
    """Class-labelled images (``data.classes``): the class names (index = label) and, per
    split ("train", and "val" when there is one), the items with the label of each."""

    names: list[str]
    splits: dict[str, tuple[Fetch, list[int]]]
    default_templates: list[str]  # prompts when data.classes sets none


@dataclass
class LabelledImages:
    """The images of a zero-shot task: items (image, class index, image id) by index."""

    fetch: Fetch
    class_names: list[str]
    prompts: Optional[Callable[[str], list[str]]] = None  # the source's own prompts of a class; None: the task's templates
    array_size: Optional[int] = None  # images are uint8 arrays of this size (transforms.array_transform); None: PIL
    subclasses: Optional[list[list[str]]] = None  # each class's subclass names (task.subclasses); None: none


# ------------------------------------------------------------------------ the base and the registry


class DataSource:
    """One kind of data: what a recipe must give it (the class attributes, :meth:`check`) and
    what it builds. A source overrides :meth:`pairs`, and when it is ``labelled``
    :meth:`class_splits` and :meth:`zeroshot_images`."""

    name = ""  # the recipe's name for it, set by register_source
    train_holds: Optional[str] = None  # what data.train names ("an image folder"); None: the source makes its data
    labelled = False  # can give class-labelled images (data.classes, eval.zeroshot[i].source)
    always_labelled = False  # every image comes with its class (data.classes is then always on)

    @property
    def file_backed(self) -> bool:
        """Reads the user's files, so validation pairs come only from ``data.val``."""
        return self.train_holds is not None

    def has_classes(self, data: DataConfig) -> bool:
        """Whether the run's pairs are class-labelled (captions are class prompts, batches carry labels)."""
        return self.always_labelled or (self.labelled and data.classes.enabled)

    reads_splits = False  # selects table rows by a split file (data.split_file)

    def check(self, data: DataConfig) -> None:
        """What the recipe must give this source: checked when it is composed with its data
        files, and by the data module before it reads them. A ConfigError names the key."""
        if self.file_backed and not data.train:
            raise ConfigError(f"data.train: {self.train_holds} is required when data.source={self.name}")
        if not isinstance(data.train, (str, type(None))) and not self.reads_splits:
            raise ConfigError(f"data.train: one path for data.source={self.name}, got {list(data.train)}")
        if (data.split_file or data.train_split or data.val_split) and not self.reads_splits:
            raise ConfigError(f"data.split_file: data.source={self.name} has no split files; "
                              "they select rows of tables (data.source=csv)")

    def describe(self, data: DataConfig) -> str:
        """The data, in a phrase (the exported model card's "data:")."""
        return str(data.train)

    def pairs(self, data: DataConfig) -> Pairs:
        raise NotImplementedError(f"data.source={self.name} builds no image-caption pairs")

    def class_splits(self, data: DataConfig) -> ClassSplits:
        raise ConfigError(f"data.classes: data.source={self.name} has no class labels")

    def zeroshot_images(self, task: ZeroShotTaskConfig, seed: int, image_size: int,
                        separator: Optional[str] = None) -> LabelledImages:
        raise ConfigError(f"eval.zeroshot '{task.name}': source={self.name} has no class labels")


def register_source(name: str) -> Callable[[type[DataSource]], type[DataSource]]:
    """Class decorator: make a source available as ``data.source: <name>`` in recipes."""

    def wrap(cls: type[DataSource]) -> type[DataSource]:
        cls.name = name
        register_data_source(name, cls())
        return cls

    return wrap


def source(name: str) -> DataSource:
    """The registered source ``name``; a ConfigError lists the registered names otherwise."""
    return data_source(name)


# ------------------------------------------------------------------------ the sources


@register_source("synthetic")
class Synthetic(DataSource):
    """The embedded synthetic scenes (:mod:`clipft.data.synthetic`), generated from data.synthetic."""

    labelled = True

    def describe(self, data: DataConfig) -> str:
        return f"synthetic (seed {data.synthetic.seed})"

    def pairs(self, data: DataConfig) -> Pairs:
        s = data.synthetic
        return Pairs(
            train=SyntheticFetch(SyntheticScenes("train", s.train_size, s.seed, s.image_size, s.two_object_fraction)),
            val=SyntheticFetch(SyntheticScenes("val", s.val_size, s.seed, s.image_size, s.two_object_fraction)),
        )

    def class_splits(self, data: DataConfig) -> ClassSplits:
        """One-object scenes labelled by ``data.classes.task``, without the held-out combinations
        (never drawn in train or val), in the task's own class order."""
        s, task = data.synthetic, data.classes.task
        held_out = {f"{colour} {shape}" for colour, shape in synthetic.HELD_OUT_COMBOS}
        task_names = synthetic.class_names(task)
        kept = [i for i, name in enumerate(task_names) if name not in held_out]
        new_label = {old: new for new, old in enumerate(kept)}
        splits = {}
        for split, size in (("train", s.train_size), ("val", s.val_size)):
            scenes = one_object_eval_set(split, size, s.seed, s.image_size)
            labels = [new_label[label_of(scenes.scene(i), task)] for i in range(len(scenes))]
            splits[split] = (SyntheticFetch(scenes), labels)
        return ClassSplits([task_names[i] for i in kept], splits, ["a large {}"])

    def zeroshot_images(self, task: ZeroShotTaskConfig, seed: int, image_size: int,
                        separator: Optional[str] = None) -> LabelledImages:
        """A built-in task (one-object images); its prompts are every caption of the data's
        grammar that describes the class."""
        scenes = one_object_eval_set(task.split, task.size, seed, image_size)
        return LabelledImages(SyntheticFetch(scenes, label_task=task.task), synthetic.class_names(task.task),
                              functools.partial(synthetic.prompts, task.task), array_size=image_size)


class LabelledFiles(DataSource):
    """A source of image files whose class labels can be read (a table's label column, or
    the folder names): class splits and zero-shot images, given :meth:`read_labels`."""

    labelled = True

    def read_labels(self, path: str, image_key: str, label_key: str, separator: Optional[str],
                    on_bad_sample: Optional[str] = None, split: Optional[Split] = None) -> Table:
        """The images at ``path`` (of ``split`` only, where the source reads split files) with
        their class labels as the table's texts."""
        raise NotImplementedError

    def class_splits(self, data: DataConfig) -> ClassSplits:
        """The classes are the sorted labels of both splits, so the base / novel halves are
        the same whichever split is read."""
        spec = data.classes
        key = data.split_key or data.image_key
        tables = {"train": concat_tables([
            self.read_labels(path, data.image_key, spec.label_key, data.separator, data.on_bad_sample,
                             _split(data.split_file, data.train_split, key)) for path in train_tables(data)])}
        if data.val:
            tables["val"] = self.read_labels(data.val, data.image_key, spec.label_key, data.separator,
                                             data.on_bad_sample, _split(data.split_file, data.val_split, key))
        keys = sorted({text for table in tables.values() for text in table.texts})
        display = read_class_names(spec.names, keys) if spec.names else {k: k for k in keys}
        index = {k: i for i, k in enumerate(keys)}
        splits = {split: (TableFetch(table), [index[t] for t in table.texts]) for split, table in tables.items()}
        return ClassSplits([display[k] for k in keys], splits, ["a photo of a {}."])

    def zeroshot_images(self, task: ZeroShotTaskConfig, seed: int, image_size: int,
                        separator: Optional[str] = None) -> LabelledImages:
        split = _split(task.split_file, task.split, task.split_key or task.image_key)
        table = self.read_labels(task.data or "", task.image_key, task.label_key, separator, split=split)
        labels = list(task.classnames) if task.classnames else sorted(set(table.texts))
        if task.subset is not None:  # a subset of the classes: its images, and a classifier of only these
            missing = sorted(set(task.subset) - set(labels))
            if missing:
                raise DataError(f"eval.zeroshot '{task.name}'.subset: labels {missing[:10]} are not classes of {task.data}")
            labels = [label for label in labels if label in set(task.subset)]
            table = _rows_with(table, set(labels))
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted(set(table.texts) - set(index))
        if unknown:
            raise DataError(f"{task.data}: labels not in eval.zeroshot '{task.name}' classnames: {unknown[:10]}")
        folder = Path(task.data or "").parent
        file = (Path(task.names) if Path(task.names).is_absolute() else folder / task.names) if task.names else None
        display = read_class_names(file, labels, key=f"eval.zeroshot '{task.name}'.names") if file else {}
        subclasses = read_subclasses(task.subclasses, folder, file, labels, task.label_key,
                                     key=f"eval.zeroshot '{task.name}'.subclasses") if task.subclasses else None
        return LabelledImages(TableFetch(table, index), [display.get(label, label) for label in labels],
                              subclasses=subclasses)


def _rows_with(table: Table, labels: set[str]) -> Table:
    """The rows of ``table`` whose text (label) is in ``labels``."""
    keep = [i for i, text in enumerate(table.texts) if text in labels]
    if not keep:
        raise DataError(f"{table.path}: no image of the classes {sorted(labels)[:10]}")
    return Table(path=table.path, images=[table.images[i] for i in keep], texts=[table.texts[i] for i in keep],
                 lines=[table.lines[i] for i in keep], skipped=table.skipped)


def _split(file: Optional[str], name: Optional[str], key: str) -> Optional[Split]:
    return Split(file, name, key) if file and name else None


def train_tables(data: DataConfig) -> list[str]:
    """data.train as a list of paths (one path, or a list of tables)."""
    return [data.train] if isinstance(data.train, str) else [str(p) for p in data.train or []]


def read_pairs(data: DataConfig, path: str, negatives: bool = False, split: Optional[str] = None) -> Table:
    """A checked table of image paths and captions (with each row's negative captions when
    ``negatives`` and data.negatives.column name them), the rows of ``split`` of
    data.split_file when one is given."""
    column = data.negatives.column if negatives and data.negatives.count > 0 else None
    return read_table(path, data.image_key, data.caption_key, data.separator, data.on_bad_sample, negatives_key=column,
                      split=_split(data.split_file, split, data.split_key or data.image_key))


@register_source("csv")
class Csv(LabelledFiles):
    """A table of image paths and captions (.csv, .tsv, .jsonl; :mod:`clipft.data.table`), or
    of image paths and class labels (data.classes.label_key)."""

    train_holds = "a table of image paths and captions"
    reads_splits = True

    def check(self, data: DataConfig) -> None:
        """data.train: a table or a list of tables; with data.split_file, the split of each
        table (data.train_split, data.val_split), checked against the file now."""
        super().check(data)
        tables = train_tables(data)
        if not all(isinstance(p, str) and p for p in tables):
            raise ConfigError(f"data.train: a table, or a list of tables, got {data.train!r}")
        if len(tables) > 1 and data.hard_images > 0:
            raise ConfigError("data.hard_images: needs one training table; concatenate the tables into one file")
        if not data.split_file:
            for key in ("train_split", "val_split"):
                if getattr(data, key):
                    raise ConfigError(f"data.{key}: a split needs data.split_file, the JSON file that lists it")
            return
        for key, paths in (("train_split", tables), ("val_split", [data.val] if data.val else [])):
            name = getattr(data, key)
            if paths and not name:
                raise ConfigError(f"data.{key}: name the split of data.{key[:-6]} in data.split_file ({data.split_file})")
            for path in paths:
                self.check_split(f"data.{key}", path, data.split_file, name, "data.split_file")

    @staticmethod
    def check_split(key: str, table: str, file: str, name: str, file_key: str) -> None:
        """The split file of ``table`` exists and holds the split ``name`` (a ConfigError naming ``key`` otherwise)."""
        path = Split(file, name, "").path(table)
        try:
            splits = read_split_file(path)
        except DataError as err:
            raise ConfigError(f"{file_key}: {err}") from err
        if name not in splits:
            raise ConfigError(f"{key}={name!r} is not a split of {path} (splits: {', '.join(splits) or 'none'})")

    def describe(self, data: DataConfig) -> str:
        tables = " + ".join(train_tables(data))
        return f"{tables} ({data.train_split})" if data.split_file else tables

    def pairs(self, data: DataConfig) -> Pairs:
        train = concat_tables([read_pairs(data, path, negatives=True, split=data.train_split) for path in train_tables(data)])
        return Pairs(TableFetch(train), TableFetch(read_pairs(data, data.val, split=data.val_split)) if data.val else None)

    def read_labels(self, path: str, image_key: str, label_key: str, separator: Optional[str],
                    on_bad_sample: Optional[str] = None, split: Optional[Split] = None) -> Table:
        return read_table(path, image_key, label_key, separator, on_bad_sample, what="label", split=split)


@register_source("folder")
class Folder(LabelledFiles):
    """An image folder with one sub-folder of images per class (the folder name is the label)."""

    train_holds = "an image folder"
    always_labelled = True

    def read_labels(self, path: str, image_key: str, label_key: str, separator: Optional[str],
                    on_bad_sample: Optional[str] = None, split: Optional[Split] = None) -> Table:
        if split is not None:
            raise ConfigError(f"{path}: an image folder has no split file; split_file selects rows of tables (source csv)")
        return read_image_folder(path)


@register_source("webdataset")
class WebDataset(DataSource):
    """Tar shards streamed while training (:mod:`clipft.data.shards`); validation pairs from
    local shards (indexed) or a table."""

    train_holds = "shards"

    def check(self, data: DataConfig) -> None:
        wds = data.webdataset
        if data.train and not isinstance(data.train, str):
            raise ConfigError("data.train: one shard pattern for data.source=webdataset (join sources with '::')")
        if not data.train:
            raise ConfigError("data.train: shards are required when data.source=webdataset "
                              "(e.g. 'data/shard-{000000..000099}.tar')")
        sources = len(str(data.train).split("::"))
        if wds.weights is not None and not wds.resampled:
            raise ConfigError("data.webdataset.weights: source weights need data.webdataset.resampled=true")
        if wds.weights is not None and len(wds.weights) != sources:
            raise ConfigError(f"data.webdataset.weights: {len(wds.weights)} weights for {sources} '::'-separated sources in data.train")
        if wds.epoch_samples is None and any("://" in s or s.startswith("pipe:") for s in str(data.train).split("::")):
            raise ConfigError("data.webdataset.epoch_samples: required for remote shards (their sizes.json is not read)")
        if data.hard_images > 0:
            raise ConfigError("data.hard_images: needs random access to the training images; use a table (data.source=csv)")
        if data.negatives.count > 0 and data.negatives.column:
            raise ConfigError("data.negatives.column: shards carry no negatives column; leave it null (rule-made negatives)")

    def pairs(self, data: DataConfig) -> Pairs:
        shards = expand_shards(data.train)
        epoch_samples = epoch_length(shards, data.webdataset)
        check_first_sample(shards, data.webdataset)
        val: Optional[Fetch] = None
        if data.val:
            on_bad = data.on_bad_sample or "skip"
            val = TableFetch(read_pairs(data, data.val)) if is_table(data.val) else ShardFetch(
                index_shards(data.val, data.webdataset, on_bad))
        return Pairs(val=val, shards=shards, epoch_samples=epoch_samples)
