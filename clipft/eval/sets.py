"""Named evaluation sets (``eval.sets``): several data sets scored in one run — in-domain and
shifted, as robust fine-tuning is judged (WiSE-FT, Wortsman et al., CVPR 2022; FLYP, Goyal et
al., CVPR 2023) — each by retrieval on its pairs and by its zero-shot tasks, logged as
``val/sets/<name>/retrieval/<metric>`` and ``val/sets/<name>/zeroshot/<task>/<metric>``, and
the mean over the sets of every metric they all have as ``val/sets/mean/...``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import Dataset

from clipft.config import DataConfig, EvalSetConfig
from clipft.data.datamodule import TransformedImages
from clipft.data.table import Split, Table, load_rgb, read_table
from clipft.eval.callbacks import ZeroShotCallback, ZeroShotTask, _Encoder, _gather_shards, _sharded_loader
from clipft.eval.metrics import relevance_from_pairs, retrieval_recall
from clipft.eval.tasks import build_zeroshot_task

PREFIX = "val/sets/"


class RowFetch:
    """A table's rows as (image, row index, image path): the index finds the row's caption."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __call__(self, index: int) -> tuple[Any, int, str]:
        return load_rgb(self.table.images[index]), index, str(self.table.images[index])


@dataclass
class EvalSet:
    """One named set: its pairs (for retrieval; None when off) and its zero-shot tasks."""

    name: str
    pairs: Optional[Dataset]
    captions: list[str]
    image_ids: list[str]
    tasks: list[ZeroShotTask]
    shifted: bool = False


def build_eval_set(cfg: EvalSetConfig, data: DataConfig, preprocess_val: Callable[[Any], torch.Tensor],
                   seed: int = 0) -> EvalSet:
    """The set's table (its split), read and checked now, and its zero-shot tasks on the same rows."""
    image_key = cfg.image_key or data.image_key
    split_key = cfg.split_key or image_key
    split = Split(cfg.split_file, cfg.split, split_key) if cfg.split_file and cfg.split else None
    pairs, captions, image_ids = None, [], []
    if cfg.retrieval:
        table = read_table(cfg.data or "", image_key, cfg.caption_key or data.caption_key, data.separator, split=split)
        pairs = TransformedImages(RowFetch(table), preprocess_val)
        captions, image_ids = list(table.texts), [str(p) for p in table.images]
    tasks = []
    for task in cfg.zeroshot:
        on_set = dataclasses.replace(task, source="csv", data=cfg.data, image_key=image_key, split_file=cfg.split_file,
                                     split=cfg.split or task.split, split_key=split_key)
        tasks.append(build_zeroshot_task(on_set, preprocess_val, seed, separator=data.separator))
    return EvalSet(cfg.name, pairs, captions, image_ids, tasks, cfg.shifted)


@torch.no_grad()
def retrieval_on(pl_module: Any, evalset: EvalSet, ks: Sequence[int], batch_size: int, num_workers: int = 0) -> dict[str, float]:
    """R@K of the set's pairs (as :class:`clipft.eval.callbacks.RetrievalCallback`): each rank
    encodes its shard of the images and every caption; rows gathered, each pair once."""
    assert evalset.pairs is not None
    encoder = _Encoder(pl_module, batch_size)
    features, rows = [], []
    with encoder.context():
        for images, indices in _sharded_loader(pl_module, evalset.pairs, batch_size, num_workers):
            features.append(encoder.images(images))
            rows.append(indices.to(pl_module.device))
        texts = encoder.texts(evalset.captions)
    image, order = _gather_shards(pl_module, len(evalset.pairs), torch.cat(features), torch.cat(rows))
    order_list = order.tolist()
    relevance, image_rows, text_rows = relevance_from_pairs([evalset.image_ids[i] for i in order_list],
                                                            [evalset.captions[i] for i in order_list])
    metrics = retrieval_recall(image[image_rows], texts[order][text_rows], relevance, tuple(ks))
    metrics["n_images"], metrics["n_texts"] = relevance.shape
    return {k: float(v) for k, v in metrics.items()}


def evaluate_sets(pl_module: Any, sets: Sequence[EvalSet], ks: Sequence[int] = (1, 5, 10), batch_size: int = 256,
                  num_workers: int = 0) -> dict[str, float]:
    """Every set's metrics under ``val/sets/<name>/``, and ``val/sets/mean/`` the mean over the
    sets of each metric every set has (counts left out). Works with or without a trainer."""
    zeroshot = ZeroShotCallback([], batch_size=batch_size, num_workers=num_workers)
    per_set: dict[str, dict[str, float]] = {}
    for evalset in sets:
        metrics: dict[str, float] = {}
        if evalset.pairs is not None:
            metrics |= {f"retrieval/{k}": v for k, v in retrieval_on(pl_module, evalset, ks, batch_size, num_workers).items()}
        for task in evalset.tasks:
            metrics |= {f"zeroshot/{task.name}/{k}": float(v) for k, v in zeroshot.evaluate(pl_module, task).items()}
        per_set[evalset.name] = metrics
    out = {f"{PREFIX}{name}/{k}": v for name, metrics in per_set.items() for k, v in metrics.items()}
    if per_set:
        common = set.intersection(*(set(m) for m in per_set.values()))
        for key in sorted(k for k in common if not k.split("/")[-1].startswith("n_")):
            out[f"{PREFIX}mean/{key}"] = sum(m[key] for m in per_set.values()) / len(per_set)
    return out


def set_metric_names(cfg: Any) -> set[str]:
    """The metric names eval.sets will log (``run.monitor`` may name one)."""
    zeroshot = ("top1", "top5", "mean_per_class_recall")
    per_set = {}
    for s in cfg.eval.sets:
        names = {f"zeroshot/{t.name}/{m}" for t in s.zeroshot for m in zeroshot}
        if s.retrieval:
            ks = cfg.eval.retrieval.ks
            names |= {f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in ks} | ({"retrieval/mean_r1"} if 1 in ks else set())
        per_set[s.name] = names
    out = {f"{PREFIX}{name}/{m}" for name, names in per_set.items() for m in names}
    if per_set:
        out |= {f"{PREFIX}mean/{m}" for m in set.intersection(*per_set.values())}
    return out


class EvalSetsCallback(L.Callback):
    """Scores every named set at the end of each validation (not the sanity check)."""

    def __init__(self, sets: Sequence[EvalSet], ks: Sequence[int] = (1, 5, 10), batch_size: int = 256,
                 num_workers: int = 0) -> None:
        self.sets = list(sets)
        self.ks = tuple(ks)
        self.batch_size = batch_size
        self.num_workers = num_workers

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in evaluate_sets(pl_module, self.sets, self.ks, self.batch_size, self.num_workers).items():
            pl_module.log(key, value, sync_dist=False, rank_zero_only=False)
