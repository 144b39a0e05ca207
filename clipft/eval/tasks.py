"""Zero-shot tasks from the recipe's ``eval.zeroshot`` list (synthetic built-ins or tables)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from clipft.config import ZeroShotTaskConfig
from clipft.data import synthetic
from clipft.data.datamodule import SyntheticFetch, TableFetch, TransformedImages
from clipft.data.table import DataError, read_table
from clipft.data.transforms import array_transform
from clipft.eval.callbacks import ZeroShotTask


def build_zeroshot_task(
    cfg: ZeroShotTaskConfig,
    preprocess_val: Callable[[Any], torch.Tensor],
    seed: int = 0,
    image_size: int = 32,
    separator: Optional[str] = None,
) -> ZeroShotTask:
    """A task of the synthetic data set (one-object images; prompts are every caption of the
    data's grammar that describes the class) or of a table of images and labels."""
    if cfg.source == "synthetic":
        scenes = synthetic.one_object_eval_set(cfg.split, cfg.size, seed, image_size)
        return ZeroShotTask(
            name=cfg.name,
            dataset=TransformedImages(
                SyntheticFetch(scenes, label_task=cfg.task), array_transform(preprocess_val, image_size)
            ),
            class_names=synthetic.class_names(cfg.task),
            templates=functools.partial(synthetic.prompts, cfg.task),
            ensemble=cfg.ensemble,
        )
    table = read_table(cfg.data or "", cfg.image_key, cfg.label_key, separator, what="label")
    names = list(cfg.classnames) if cfg.classnames else sorted(set(table.texts))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(table.texts) - set(index))
    if unknown:
        raise DataError(f"{cfg.data}: labels not in eval.zeroshot '{cfg.name}' classnames: {unknown[:10]}")
    return ZeroShotTask(
        name=cfg.name,
        dataset=TransformedImages(TableFetch(table, index), preprocess_val),
        class_names=names,
        templates=list(cfg.templates or ["a photo of a {}."]),
        ensemble=cfg.ensemble,
    )
