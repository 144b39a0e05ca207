"""Evaluation callbacks: retrieval and zero-shot classification, logged as
``val/<task>/<metric>`` at the end of every validation, and the run report.

They are the pattern for every later evaluation: take a data source (or the features the
method's ``validation_step`` returns) and a tokenizer, compute features once per
validation, log, and let :class:`RunReport` write ``report.json``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from clipft.data.datamodule import ShardSampler, collate_labelled
from clipft.eval.metrics import (
    ImageTextRetrieval,
    ZeroShotAccuracy,
    best_subclass_logits,
    build_zero_shot_classifier,
    zero_shot_logits,
)
from clipft.eval.report import by_set, render_markdown, write_json_atomic, write_text_atomic


def _gather_objects(trainer: L.Trainer, items: list[Any]) -> list[Any]:
    if trainer.world_size == 1:
        return items
    gathered: list[list[Any]] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def _gather_rows(pl_module: L.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    if pl_module.trainer.world_size == 1:
        return rows
    return pl_module.all_gather(rows).reshape(-1, *rows.shape[1:])


def _unpadded_rows(size: int, world: int, gathered: int) -> Optional[list[int]]:
    """Rows of a rank-order gather of :class:`ShardSampler` shards that are real samples
    (each sample once), or None when the gather is not such a set (nothing to drop)."""
    per_rank = -(-size // world)
    if world == 1 or gathered != per_rank * world:
        return None
    return [r * per_rank + j for r, n in enumerate(ShardSampler.valid(size, world)) for j in range(n)]


def _val_size(trainer: L.Trainer) -> int:
    loaders = trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    return len(loader.dataset) if loader is not None else 0


@dataclass
class PairFeatures:
    """The validation pairs' features of all ranks, in rank order."""

    image: torch.Tensor  # [N, D] one row per validation pair
    text: torch.Tensor  # [N, D]
    captions: list[str]
    image_ids: list[str]


class ValidationFeatures(L.Callback):
    """Collects the features that the method's ``validation_step`` returns, once per
    validation, so that every callback that needs them (retrieval, modality gap) shares
    one encoding pass. Register it before its consumers."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.image_batches: list[torch.Tensor] = []
        self.text_batches: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.image_ids: list[str] = []
        self._gathered: Optional[PairFeatures] = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "image_features" not in outputs:
            return
        self.image_batches.append(outputs["image_features"].float())
        self.text_batches.append(outputs["text_features"].float())
        self.captions.extend(batch.captions)
        self.image_ids.extend(batch.image_ids)

    def get(self, pl_module: L.LightningModule) -> Optional[PairFeatures]:
        """All ranks' features (gathered on the first call of each validation)."""
        if self._gathered is None and self.image_batches:
            trainer = pl_module.trainer
            image = _gather_rows(pl_module, torch.cat(self.image_batches))
            text = _gather_rows(pl_module, torch.cat(self.text_batches))
            captions = _gather_objects(trainer, self.captions)
            image_ids = _gather_objects(trainer, self.image_ids)
            keep = _unpadded_rows(_val_size(trainer), trainer.world_size, len(image)) if trainer.world_size > 1 else None
            if keep is not None:  # drop the repeats that even out the ranks' shards
                image, text = image[keep], text[keep]
                captions, image_ids = [captions[i] for i in keep], [image_ids[i] for i in keep]
            _check_finite(trainer, image, text)
            self._gathered = PairFeatures(image=image, text=text, captions=captions, image_ids=image_ids)
        return self._gathered


class NonFiniteFeatures(ValueError):
    """The model's validation features hold NaN or inf: its weights do (says what to do)."""


def _check_finite(trainer: L.Trainer, image: torch.Tensor, text: torch.Tensor) -> None:
    """Every rank holds the same gathered features, so every rank stops here together."""
    bad = {name: int((~torch.isfinite(f).all(dim=-1)).sum()) for name, f in (("image", image), ("text", text))}
    if any(bad.values()):
        which = ", ".join(f"{n} of {len(image)} {name} features" for name, n in bad.items() if n)
        raise NonFiniteFeatures(
            f"validation at step {trainer.global_step}: {which} are NaN or inf, so the model's weights are: "
            "evaluate an earlier checkpoint, or train again with a lower optim.lr / trainer.gradient_clip_val"
        )


class RetrievalCallback(L.Callback):
    """Image→text and text→image R@K on the validation pairs.

    Reads the shared validation features, so nothing is encoded twice. Several captions per
    image are supported (an image hits if any of its captions is in the top K, as in COCO's
    5-caption protocol), and identical caption strings count as one caption relevant to
    every image they describe, so R@K stays well defined on templated captions.
    """

    def __init__(self, features: ValidationFeatures, ks: Sequence[int] = (1, 5, 10), name: str = "retrieval") -> None:
        self.features = features
        self.ks = tuple(ks)
        self.name = name

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pairs = self.features.get(pl_module)
        if pairs is None:
            return
        # every rank holds every rank's features already: no second reduction
        metric = ImageTextRetrieval(self.ks, sync_on_compute=False).to(pairs.image.device)
        metric.update(pairs.image, pairs.text, _ids(pairs.image_ids), _ids(pairs.captions))
        for key, value in metric.compute().items():
            pl_module.log(f"val/{self.name}/{key}", float(value), sync_dist=False, rank_zero_only=False)


class GapCallback(L.Callback):
    """Modality gap, alignment and uniformity of the validation pairs (:mod:`clipft.eval.gap`),
    logged as ``val/gap/<metric>``, and a 2-D PCA picture of both modalities saved as
    ``plot_path`` (rank 0) at the end of every validation."""

    def __init__(
        self, features: ValidationFeatures, plot_path: Optional[Path] = None, seed: int = 0, max_images: int = 5000
    ) -> None:
        self.features = features
        self.plot_path = plot_path
        self.seed = seed
        self.max_images = max_images
        self.label: Optional[str] = None  # plot title prefix; default "step <global step>"

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from clipft.eval.gap import ModalityGap
        from clipft.eval.plots import plot_modality_gap

        pairs = self.features.get(pl_module)
        if pairs is None or len(pairs.captions) < 4:
            return
        # one row per distinct (image, caption) pair (DDP pads ranks with repeated samples),
        # sorted (ids numbered in sorted order), so the numbers do not depend on how ranks
        # interleaved the rows; capped by a seeded sample of images (the metrics cost O(N²));
        # every rank holds every rank's features already: no second reduction
        metric = ModalityGap(self.seed, self.max_images, sync_on_compute=False)
        metric.update(pairs.image, pairs.text, _ids(pairs.image_ids, sort=True), _ids(pairs.captions, sort=True))
        metrics = {key: value.item() for key, value in metric.compute().items()}
        for key, value in metrics.items():
            pl_module.log(f"val/gap/{key}", value, sync_dist=False, rank_zero_only=False)
        if self.plot_path is not None and trainer.is_global_zero and not trainer.sanity_checking:
            label = self.label or f"step {trainer.global_step}"
            image, text, _ = metric.pairs()
            plot_modality_gap(image, text, metrics, self.plot_path, label=label)


def _ids(names: Sequence[str], sort: bool = False) -> torch.Tensor:
    """Integer ids of string names (equal names, equal ids), numbered in first-occurrence order
    or, with ``sort``, in sorted order (so that sorting the ids sorts the names)."""
    order = sorted(set(names)) if sort else list(dict.fromkeys(names))
    index = {name: i for i, name in enumerate(order)}
    return torch.tensor([index[name] for name in names], dtype=torch.long)


class _Encoder:
    """Encode as the validation loop does: on the module's device, under the trainer's
    precision, L2-normalised float features; texts tokenized in batches."""

    def __init__(self, pl_module: Any, batch_size: int) -> None:
        self.module = pl_module
        self.batch_size = batch_size
        trainer = pl_module._trainer
        self.precision = trainer.precision_plugin if trainer is not None else None

    def context(self) -> Any:
        return self.precision.forward_context() if self.precision is not None else contextlib.nullcontext()

    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.module.device)
        if self.precision is not None:
            images = self.precision.convert_input(images)
        return self.module.encode_image(images).float()

    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.module.tokenizer(texts[start : start + self.batch_size]).to(self.module.device)
            out.append(self.module.encode_text(tokens).float())
        return torch.cat(out)


def _sharded_loader(pl_module: Any, dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """(images, labels) batches of this rank's shard (the same number of batches on every rank)."""
    trainer = pl_module._trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_labelled,
        sampler=ShardSampler(len(dataset), world, rank) if world > 1 else None,  # type: ignore[arg-type]
    )


def _gather_shards(pl_module: Any, size: int, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of every rank's shard, each sample once (the shards' padding dropped)."""
    trainer = pl_module._trainer
    if trainer is None or trainer.world_size == 1:
        return rows
    gathered = tuple(_gather_rows(pl_module, r) for r in rows)
    keep = _unpadded_rows(size, trainer.world_size, len(gathered[0]))
    return gathered if keep is None else tuple(g[keep] for g in gathered)


@dataclass
class ZeroShotTask:
    """Images with integer labels, class names, and the prompts of each class."""

    name: str
    dataset: Dataset  # items: (image tensor, label, image id)
    class_names: list[str]
    templates: Sequence[str] | Callable[[str], Sequence[str]]
    ensemble: str = "mean"
    # each class's subclass names: a class scores the best of its subclasses (CHiLS); None: its name
    subclasses: Optional[list[list[str]]] = None


class ZeroShotCallback(L.Callback):
    """Zero-shot classification: class names x prompt templates → classifier; top-1/top-5.
    A module whose ``head_for(class_names)`` returns a head (a method with a linear head over
    exactly the task's classes, in its order) is scored by that head's logits instead.

    Templates are combined by the mean of their embeddings (OpenAI) or by the maximum score
    over templates (see :func:`clipft.eval.metrics.zero_shot_logits`). A task with subclasses
    scores each class by its best subclass (:func:`clipft.eval.metrics.best_subclass_logits`). On several devices each
    rank encodes its shard of the images (the same number of batches on every rank, as ZeRO-3
    needs) and every rank the class prompts; the features are gathered, each image once.
    """

    def __init__(self, tasks: Sequence[ZeroShotTask], batch_size: int = 256, num_workers: int = 0) -> None:
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.num_workers = num_workers

    @torch.no_grad()
    def evaluate(self, pl_module: Any, task: ZeroShotTask) -> dict[str, float]:
        encoder = _Encoder(pl_module, self.batch_size)
        metric = ZeroShotAccuracy(len(task.class_names), ks=(1, 5)).to(pl_module.device)
        trainer = pl_module._trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        real = ShardSampler.valid(len(task.dataset), world)[rank]  # this rank's shard less its padding
        # a method with a classification head over exactly these classes (classifier, linear_probe,
        # lp_ft) is scored by its head: head_for(class names) -> logits of unit image features
        head_for = getattr(pl_module, "head_for", None)
        head = head_for(task.class_names) if head_for is not None else None
        with encoder.context():
            names, parent = task.class_names, None
            if head is None and task.subclasses is not None:  # every subclass's prompts; parent: the class of each
                names = [name for subs in task.subclasses for name in subs]
                parent = torch.tensor([c for c, subs in enumerate(task.subclasses) for _ in subs], device=pl_module.device)
            classifier = None if head is not None else build_zero_shot_classifier(encoder.texts, names, task.templates)
            for images, batch_labels in _sharded_loader(pl_module, task.dataset, self.batch_size, self.num_workers):
                features = encoder.images(images)  # every batch, padding too: ZeRO-3 needs every rank's forward
                keep = min(len(batch_labels), real)
                real -= keep
                if keep:
                    logits = head(features[:keep]) if head is not None else zero_shot_logits(
                        features[:keep], classifier, task.ensemble)
                    if parent is not None:
                        logits = best_subclass_logits(logits, parent, len(task.class_names))
                    metric.update(logits, batch_labels[:keep].to(pl_module.device))
        # torchmetrics sums the counts of every rank (each sample once)
        return {key: value.item() for key, value in metric.compute().items()}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for task in self.tasks:
            for key, value in self.evaluate(pl_module, task).items():
                pl_module.log(f"val/zeroshot/{task.name}/{key}", value, sync_dist=False, rank_zero_only=False)


class BaseToNovelCallback(L.Callback):
    """CoOp's base-to-novel evaluation of class-labelled validation images
    (``data.classes``): images of base classes are classified among the base classes, images
    of novel classes among the novel classes, each by the method's ``classify`` (MMRL's
    decoupled inference: fused branches for classes it trained on, the class token
    otherwise). Class features: the mean of each class's unit prompt features. Logs
    ``val/base_to_novel/{base,novel,hm}``, hm = 2·base·novel / (base + novel)."""

    def __init__(self, dataset: Dataset, class_names: list[str], templates: list[str], base: list[int],
                 novel: list[int], trained: list[int], batch_size: int = 256, num_workers: int = 0) -> None:
        self.dataset, self.class_names, self.templates = dataset, class_names, templates
        self.parts = {"base": base, "novel": novel}
        self.trained = set(trained)
        self.batch_size, self.num_workers = batch_size, num_workers

    @torch.no_grad()
    def evaluate(self, pl_module: Any) -> dict[str, float]:
        encoder = _Encoder(pl_module, self.batch_size)
        correct, labels = [], []
        with encoder.context():
            prompts = build_zero_shot_classifier(encoder.texts, self.class_names, self.templates)
            class_features = torch.nn.functional.normalize(prompts.mean(dim=1), dim=-1)
            part_of = torch.full((len(self.class_names),), -1, dtype=torch.long, device=pl_module.device)
            for part, classes in enumerate(self.parts.values()):
                part_of[torch.tensor(classes, device=pl_module.device)] = part
            for images, batch_labels in _sharded_loader(pl_module, self.dataset, self.batch_size, self.num_workers):
                images, batch_labels = images.to(pl_module.device), batch_labels.to(pl_module.device)
                if encoder.precision is not None:
                    images = encoder.precision.convert_input(images)
                hit = torch.zeros(len(batch_labels), dtype=torch.bool, device=pl_module.device)
                for part, classes in enumerate(self.parts.values()):
                    rows = part_of[batch_labels] == part
                    if not rows.any():
                        continue
                    seen = set(classes) <= self.trained
                    scores = pl_module.classify(images[rows], class_features[classes], seen=seen)
                    predicted = torch.tensor(classes, device=pl_module.device)[scores.argmax(dim=-1)]
                    hit[rows] = predicted == batch_labels[rows]
                correct.append(hit)
                labels.append(batch_labels)
        hits, labels_all = _gather_shards(pl_module, len(self.dataset), torch.cat(correct), torch.cat(labels))
        metrics = {}
        for part, classes in self.parts.items():
            rows = torch.isin(labels_all, torch.tensor(classes, device=labels_all.device))
            metrics[part] = hits[rows].float().mean().item() if rows.any() else float("nan")
        base, novel = metrics["base"], metrics["novel"]
        metrics["hm"] = 2 * base * novel / (base + novel) if base + novel > 0 else 0.0
        return metrics

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in self.evaluate(pl_module).items():
            pl_module.log(f"val/base_to_novel/{key}", value, sync_dist=False, rank_zero_only=False)


class CompositionalCallback(L.Callback):
    """Image vs caption vs negative caption (SugarCrepe format, :mod:`clipft.eval.compositional`):
    accuracy per subset and REPLACE/SWAP/ADD, logged as ``val/compositional/<name>``."""

    def __init__(self, subsets: dict[str, list[Any]], preprocess: Callable[[Any], torch.Tensor], batch_size: int = 256):
        self.subsets = subsets
        self.preprocess = preprocess
        self.batch_size = batch_size

    @torch.no_grad()
    def evaluate(self, pl_module: Any) -> dict[str, float]:
        from clipft.data.table import load_rgb
        from clipft.eval.compositional import evaluate

        encoder = _Encoder(pl_module, self.batch_size)

        def encode_images(paths: list[Path]) -> torch.Tensor:
            batches = [paths[i : i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
            return torch.cat([encoder.images(torch.stack([self.preprocess(load_rgb(p)) for p in b])) for b in batches])

        with encoder.context():
            return evaluate(encode_images, encoder.texts, self.subsets)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in self.evaluate(pl_module).items():
            pl_module.log(f"val/compositional/{key}", value, sync_dist=False, rank_zero_only=False)


class RunReport(L.Callback):
    """Writes ``report.json`` (the latest validation metrics, step and epoch, plus any
    ``extra`` fields) and ``report.md`` (the same as tables) after every validation, on rank 0."""

    def __init__(self, path: Path, extra: Optional[dict[str, Any]] = None) -> None:
        self.path = Path(path)
        self.extra = dict(extra or {})
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.metrics = {
            k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")
        }
        self.extra.update(global_step=trainer.global_step, epoch=trainer.current_epoch)
        self.write(trainer)

    def write(self, trainer: Optional[L.Trainer] = None) -> None:
        if trainer is not None and not trainer.is_global_zero:
            return
        report = {**self.extra, "metrics": self.metrics}
        if by_set(self.metrics):  # eval.sets: each set's metrics together
            report["sets"] = by_set(self.metrics)
        write_json_atomic(self.path, report)
        write_text_atomic(self.path.with_suffix(".md"), render_markdown(report))
