"""Zero-shot tasks from the recipe's ``eval.zeroshot`` list (synthetic built-ins or tables)."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from clipft.config import ZeroShotTaskConfig
from clipft.data import synthetic
from clipft.data.datamodule import SyntheticFetch, TableFetch, TransformedImages
from clipft.data.table import DataError, read_image_folder, read_table
from clipft.data.transforms import array_transform
from clipft.eval.callbacks import ZeroShotTask


def _format_strings(templates: Any) -> tuple[str, ...]:
    """open_clip keeps its template lists as functions of the class name."""
    return tuple(t("{}") if callable(t) else t for t in templates)


# Named prompt sets: one prompt, and open_clip's copies of OpenAI's public ImageNet lists.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "openai_imagenet": _format_strings(OPENAI_IMAGENET_TEMPLATES),
    "simple_imagenet": _format_strings(SIMPLE_IMAGENET_TEMPLATES),
}


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
    if cfg.source == "folder":
        table = read_image_folder(cfg.data or "")
    else:
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
        templates=list(cfg.templates or TEMPLATE_SETS[cfg.template_set or "single"]),
        ensemble=cfg.ensemble,
    )
