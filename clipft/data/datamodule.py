"""``ImageTextDataModule``: image-caption pairs from a source, with the model's own
preprocess and tokenizer, as :class:`Batch` objects."""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import logging

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from clipft.config import DataConfig, NegativesConfig
from clipft.data.batch import Batch
from clipft.data.classes import ClassFetch, ClassSet, Labelled, few_shot_indices, template_list
from clipft.data.hard_images import WithHardImages
from clipft.data.negatives import negatives as draw_negatives
from clipft.data.shards import ShardFetch, ShardSet, ShardStream
from clipft.data.sources import ClassSplits, SyntheticFetch, TableFetch, source
from clipft.data.transforms import array_transform, style_augment

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ datasets
# A fetcher (clipft.data.sources) maps an index to (image, target, image id).


class TransformedImages(Dataset):
    """(transformed image tensor, target, image id) items from a fetcher."""

    def __init__(self, fetch: Callable[[int], tuple[Image.Image, Any, str]], transform: Callable[[Any], torch.Tensor]):
        self.fetch = fetch
        self.transform = transform

    def __len__(self) -> int:
        return len(self.fetch)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, str]:
        image, target, image_id = self.fetch(index)
        return self.transform(image), target, image_id


class CollatePairs:
    """Stack images and tokenize the batch's captions in one call (in the worker); with
    ``negatives`` (K > 0), also K negative captions per pair, drawn by the rules of
    :mod:`clipft.data.negatives` from a generator seeded by (seed, image id, caption), so a
    pair has the same negatives in every epoch, worker and process."""

    def __init__(self, tokenizer: Callable[..., torch.Tensor], negatives: Optional[NegativesConfig] = None, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.negatives = negatives if negatives is not None and negatives.count > 0 else None
        self.seed = seed

    def __call__(self, items: Sequence[tuple[torch.Tensor, Any, str]]) -> Batch:
        images, targets, image_ids = zip(*items)
        labels = None
        if isinstance(targets[0], Labelled):  # a class-based source: the caption is the class prompt
            labels = torch.tensor([t.label for t in targets], dtype=torch.long)
            targets = tuple(t.caption for t in targets)
        # a table with a negatives column gives (caption, its negatives) targets
        given = [t[1] for t in targets] if isinstance(targets[0], tuple) else None
        captions = [t[0] for t in targets] if given is not None else list(targets)
        batch = Batch(stack(images), self.tokenizer(captions), captions, list(image_ids), labels=labels)
        if self.negatives is not None:
            count, types = self.negatives.count, tuple(self.negatives.types)
            drawn = []
            for index, (caption, image_id) in enumerate(zip(captions, image_ids)):
                rng = random.Random(zlib.crc32(f"{self.seed}|{image_id}|{caption}".encode()))
                if given is not None:  # K of the row's own list
                    drawn.append(rng.sample(given[index], min(count, len(given[index]))))
                else:
                    drawn.append([n for _, n in draw_negatives(caption, count, rng, types)])
            padded = [row + [""] * (count - len(row)) for row in drawn]
            batch.negative_captions = drawn
            batch.negative_texts = self.tokenizer([n for row in padded for n in row]).reshape(len(items), count, -1)
            batch.negative_valid = torch.tensor([[k < len(row) for k in range(count)] for row in drawn])
        return batch


def stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; inside a DataLoader worker written straight into shared memory, as
    ``default_collate`` does, so that the batch reaches the main process without another copy
    (a float batch of 64 images of 224 px is 38 MB)."""
    return default_collate(list(images))


def stack_images(items: Sequence[tuple[torch.Tensor, Any, str]]) -> torch.Tensor:
    return stack([item[0] for item in items])


def collate_labelled(items: Sequence[tuple[torch.Tensor, int | Labelled, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = zip(*items)
    labels = tuple(t.label if isinstance(t, Labelled) else t for t in labels)
    return stack(images), torch.as_tensor(labels, dtype=torch.long)


# ------------------------------------------------------------------------ data module


class ImageTextDataModule(L.LightningDataModule):
    """Train and validation pairs of one source (``data.source``, :mod:`clipft.data.sources`).

    Sources are read and checked in :meth:`prepare_sources` (called by ``setup``, and by the
    CLI before the model is built, so that bad data fails before anything else happens).
    """

    def __init__(
        self,
        cfg: DataConfig,
        preprocess_train: Callable[[Any], torch.Tensor],
        preprocess_val: Callable[[Any], torch.Tensor],
        tokenizer: Callable[..., torch.Tensor],
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.preprocess_train = {
            "train": preprocess_train,
            "val": preprocess_val,
            "scale_shift": scale_shift(preprocess_val, cfg.pad_fill),
            "style": style_augment(preprocess_val, cfg.pad_fill),
        }[cfg.train_transform]
        self.preprocess_val = preprocess_val
        self.collate = CollatePairs(tokenizer)
        self.train_collate = CollatePairs(tokenizer, cfg.negatives, seed)
        self.seed = seed
        self.train_fetch: Optional[Callable[[int], Any]] = None
        self.train_shards: Optional[ShardSet] = None  # webdataset: streamed, not fetched by index
        self.train_epoch_samples = 0
        self.skipped_samples = 0  # bad training samples skipped while streaming shards (this process)
        self.resume_batches = 0  # batches a resumed run has trained (set by the runner)
        # where the training order stood in the checkpoint: (data epoch, position in samples)
        self.resume_position: Optional[tuple[int, int]] = None
        self.hard_neighbours: Optional[torch.Tensor] = None  # [N, k] (data.hard_images), set by the runner
        self.val_fetch: Optional[Callable[[int], Any]] = None
        self.classes: Optional[ClassSet] = None  # class-based sources (data.classes)
        self.train_classes: list[int] = []  # the labels trained on (data.classes.train_classes)

    def prepare_sources(self) -> None:
        if self.train_fetch is not None or self.train_shards is not None:
            return
        src = source(self.cfg.source)
        src.check(self.cfg)
        if src.has_classes(self.cfg):
            self._prepare_classes(src.class_splits(self.cfg))
            return
        pairs = src.pairs(self.cfg)
        self.train_fetch, self.val_fetch = pairs.train, pairs.val
        self.train_shards, self.train_epoch_samples = pairs.shards, pairs.epoch_samples

    def _prepare_classes(self, labelled: ClassSplits) -> None:
        """The classes and prompts of class-labelled data, and the training items: those of the
        classes trained on (data.classes.train_classes), k per class with data.classes.shots."""
        spec = self.cfg.classes
        names = labelled.names
        self.classes = ClassSet(names, template_list(spec.templates, spec.template_set, labelled.default_templates))
        self.train_classes = self.classes.base if spec.train_classes == "base" else list(range(len(names)))
        fetch, labels = labelled.splits["train"]
        if spec.shots is not None:
            indices = few_shot_indices(labels, spec.shots, self.seed, self.train_classes)
        else:
            wanted = set(self.train_classes)
            indices = [i for i, label in enumerate(labels) if label in wanted]
        if not indices:
            raise ValueError(f"data.train: no training images of the classes trained on ({spec.train_classes})")
        self.train_fetch = ClassFetch(fetch, labels, indices, self.classes)
        if "val" in labelled.splits:
            fetch, labels = labelled.splits["val"]
            self.val_fetch = ClassFetch(fetch, labels, range(len(labels)), self.classes)

    def train_size(self) -> int:
        """Training samples per epoch (shards: data.webdataset.epoch_samples or sizes.json)."""
        self.prepare_sources()
        return self.train_epoch_samples if self.train_shards is not None else len(self.train_fetch)  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        """Sizes and skipped-row counts, for the run report."""
        out: dict[str, Any] = {"source": self.cfg.source, "train_size": self.train_size()}
        out["val_size"] = len(self.val_fetch) if self.val_fetch is not None else 0  # type: ignore[arg-type]
        for split, fetch in (("train", self.train_fetch), ("val", self.val_fetch)):
            fetch = fetch.fetch if isinstance(fetch, ClassFetch) else fetch
            if isinstance(fetch, TableFetch):
                out[f"{split}_skipped_rows"] = len(fetch.table.skipped)
            if isinstance(fetch, ShardFetch):
                out[f"{split}_skipped_samples"] = len(fetch.index.skipped)
        if self.classes is not None:
            out["classes"] = len(self.classes.names)
            out["train_classes"] = len(self.train_classes)
            out["shots"] = self.cfg.classes.shots
        if self.train_shards is not None:
            out["train_shards"] = len(self.train_shards)
            out["train_skipped_samples"] = self.skipped_samples
        return out

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the bad samples a shard stream skipped (they travel with the next batch)."""
        skipped = getattr(batch, "skipped_samples", 0)
        if skipped:
            del batch.skipped_samples
            before = self.skipped_samples
            self.skipped_samples += skipped
            if before == 0 or before.bit_length() != self.skipped_samples.bit_length():  # at 1, 2, 4, 8, ...
                log.warning("%s: %d bad training samples skipped so far (data.on_bad_sample)", self.cfg.train,
                            self.skipped_samples)
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A :class:`Batch` moves its own tensors: Lightning's generic walk copies a dataclass field
        by field, lists of captions included (~1-2 ms a step on a CPU, where nothing moves)."""
        if isinstance(batch, Batch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_sources()

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        cfg = self.cfg
        pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
        world, rank = self._world()
        sampler: Optional[Sampler] = None
        batches: dict[str, Any] = {"batch_size": batch_size, "drop_last": train}
        if train:  # a shuffled 1/world of the samples per rank, none twice, resumable
            sampler = TrainingOrder(len(dataset), world, rank, self.seed, batch_size)  # type: ignore[arg-type]
            sampler.start_at(*self._training_start())
            if self.hard_neighbours is not None:  # each batch followed by its pairs' hard images
                batches = {"batch_sampler": WithHardImages(sampler, batch_size, self.hard_neighbours, self.seed)}
                sampler = None
        elif world > 1:
            sampler = ShardSampler(len(dataset), world, rank)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            sampler=sampler,
            **batches,
            num_workers=cfg.num_workers,
            pin_memory=pin,
            persistent_workers=cfg.num_workers > 0,
            collate_fn=self.train_collate if train else self.collate,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            worker_init_fn=_seed_worker,
        )

    def _transform(self, fetch: Any, preprocess: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
        fetch = fetch.fetch if isinstance(fetch, ClassFetch) else fetch
        if isinstance(fetch, SyntheticFetch):
            return array_transform(preprocess, fetch.scenes.image_size)
        return preprocess

    def hard_image_candidates(
        self, encode: Callable[[torch.Tensor], torch.Tensor], k: int, cache_dir: Path, model_key: tuple[Any, ...]
    ) -> None:
        """Find every training image's k nearest neighbours with ``encode`` (the starting
        model, named by ``model_key`` in the cache key), cached next to the data (a table) or
        in ``cache_dir`` (the synthetic set)."""
        from clipft.data.hard_images import cache_key, cached, encode_images, nearest_neighbours

        self.prepare_sources()
        fetch = self.train_fetch
        assert fetch is not None
        if isinstance(fetch, TableFetch):
            stat = fetch.table.path.stat()
            key = cache_key(fetch.table.path.resolve(), stat.st_size, stat.st_mtime_ns, k, *model_key)
            path = fetch.table.path.with_name(f"{fetch.table.path.name}.hard-images-{key}.pt")
            ids = [str(p) for p in fetch.table.images]
        else:
            s = self.cfg.synthetic
            key = cache_key("synthetic", s.seed, s.train_size, s.image_size, s.two_object_fraction, k, *model_key)
            path = cache_dir / f"hard-images-{key}.pt"
            ids = [f"{i}" for i in range(len(fetch))]  # type: ignore[arg-type]
        dataset = TransformedImages(fetch, self._transform(fetch, self.preprocess_val))

        def compute() -> torch.Tensor:
            loader = DataLoader(dataset, batch_size=self.cfg.val_batch_size or 256, num_workers=self.cfg.num_workers,
                                collate_fn=stack_images)
            return nearest_neighbours(encode_images(encode, loader), ids, k)

        self.hard_neighbours = cached(path, compute)

    def class_validation_set(self) -> Dataset:
        """The class-labelled validation images with the evaluation preprocess (base-to-novel)."""
        self.prepare_sources()
        if self.classes is None or self.val_fetch is None:
            raise ValueError("base-to-novel evaluation needs class-labelled validation data (data.classes, data.val)")
        return TransformedImages(self.val_fetch, self._transform(self.val_fetch, self.preprocess_val))

    def class_training_set(self) -> Dataset:
        """The class-labelled training images (the k-shot sample, if any) with the evaluation
        preprocess: what a linear probe fits its features to."""
        self.prepare_sources()
        if self.classes is None or self.train_fetch is None:
            raise ValueError("a linear probe needs class-labelled training data (data.classes)")
        return TransformedImages(self.train_fetch, self._transform(self.train_fetch, self.preprocess_val))

    def _trained_batches(self) -> int:
        """Where the training order starts: after the batches a resumed run has trained. The
        runner sets :attr:`resume_batches` from the checkpoint before training, because
        Lightning may build the training loader (to count the steps for the schedule) before
        it restores the global step; otherwise the trainer's step."""
        trainer = getattr(self, "trainer", None)
        step = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        return max(self.resume_batches, step)

    def _training_start(self) -> tuple[int, int, int]:
        """(batches of this world, data epoch, position in samples) where the training order
        starts: from the checkpoint's position (:attr:`resume_position`, counted in samples,
        whatever the device count it was saved on) plus the batches trained since; for a
        checkpoint without one, the batches the run has trained, on this device count."""
        if self.resume_position is None:
            return self._trained_batches(), 0, 0
        return self._trained_batches() - self.resume_batches, *self.resume_position

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint (Lightning calls it): where the training order stands, in
        (data epoch, position in samples), for a resume on any number of devices."""
        if self.train_fetch is None or self.train_shards is not None or getattr(self, "trainer", None) is None:
            return {}
        world, rank = self._world()
        order = TrainingOrder(self.train_size(), world, rank, self.seed, self.cfg.batch_size)
        batches, epoch, sample = self._training_start()
        return {"train_position": list(order.advance(epoch, sample, batches)), "world_size": world}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The runner reads the position before training starts (:attr:`resume_position`)."""

    def train_dataloader(self) -> DataLoader:
        self.prepare_sources()
        if self.train_shards is not None:
            return self._shard_loader(self.train_shards)
        assert self.train_fetch is not None
        transform = self._transform(self.train_fetch, self.preprocess_train)
        return self._loader(TransformedImages(self.train_fetch, transform), self.cfg.batch_size, True)

    def _shard_loader(self, shards: ShardSet) -> DataLoader:
        """Batches collated in the workers (one rank's :class:`ShardStream`); workers persist,
        since each keeps the stream's position."""
        cfg = self.cfg
        world, rank = self._world()
        stream = ShardStream(
            shards, cfg.webdataset, self.train_epoch_samples, cfg.batch_size, self.preprocess_train,
            self.train_collate, world=world, rank=rank, seed=self.seed, on_bad_sample=cfg.on_bad_sample or "skip",
        )
        stream.start_at(self._trained_batches())
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory,
            persistent_workers=cfg.num_workers > 0,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | list:
        self.prepare_sources()
        if self.val_fetch is None:
            return []
        size = self.cfg.val_batch_size or self.cfg.batch_size
        transform = self._transform(self.val_fetch, self.preprocess_val)
        return self._loader(TransformedImages(self.val_fetch, transform), size, False)


class TrainingOrder(Sampler[int]):
    """The training order of one rank, as a stream that a resumed run continues exactly, on the
    same number of devices or another.

    Data epoch e is a permutation of ``range(size)`` seeded by (seed, e), the same on every
    rank. The ``world`` ranks walk through it together in global batches of
    ``batch_size·world`` consecutive positions: at position p, rank r takes positions
    p + r, p + world + r, ... (``batch_size`` of them), and the epoch ends when fewer than
    ``batch_size·world`` positions are left (no sample twice, every rank the same number of
    batches). The stream's place is (data epoch, position in samples): counted in samples, so a
    run saved on 2 devices and resumed on 1 (or the reverse) skips exactly the samples the
    interrupted epoch has seen, whatever the new split. Each iteration (one Lightning epoch)
    yields the rest of the data epoch from where the stream stands and moves it to the next one.
    """

    def __init__(self, size: int, world: int, rank: int, seed: int, batch_size: int) -> None:
        self.size, self.world, self.rank, self.seed, self.batch_size = size, world, rank, seed, batch_size
        self.per_rank = size // world
        if self.per_rank // batch_size == 0:
            raise ValueError(
                f"the training data has {size} samples, {self.per_rank} per device: fewer than one batch "
                f"(data.batch_size={batch_size}); lower data.batch_size or add data"
            )
        self.epoch, self.sample = 0, 0  # where the stream stands

    def advance(self, epoch: int, sample: int, batches: int) -> tuple[int, int]:
        """(data epoch, position) after ``batches`` more batches per rank from (epoch, sample)."""
        step = self.batch_size * self.world
        while batches > 0:
            left = (self.size - sample) // step  # global batches left in this data epoch
            if batches < left:
                return epoch, sample + batches * step
            batches -= left
            epoch, sample = epoch + 1, 0
            full = self.size // step
            epoch, batches = epoch + batches // full, batches % full
        if (self.size - sample) // step == 0:  # nothing left of this epoch: the next one
            epoch, sample = epoch + 1, 0
        return epoch, sample

    def start_at(self, batches: int, epoch: int = 0, sample: int = 0) -> None:
        """Put the stream after ``batches`` batches (of this world) from (epoch, sample)."""
        self.epoch, self.sample = self.advance(epoch, sample, batches)

    def __iter__(self) -> Iterator[int]:
        epoch, sample = self.epoch, self.sample
        self.epoch, self.sample = epoch + 1, 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        end = sample + (self.size - sample) // self.world * self.world  # the loader drops a last partial batch
        return iter(order[sample + self.rank:end:self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s contiguous shard of ``range(size)`` for evaluation on ``world`` ranks.

    Every rank yields the same number of indices (``ceil(size / world)``, so every rank runs
    the same number of forwards, as ZeRO-3 requires); a short shard repeats its last index.
    :meth:`valid` says how many leading indices of each rank's shard are real, so gathered
    results can drop the repeats: each sample is then counted exactly once.
    """

    def __init__(self, size: int, world: int, rank: int) -> None:
        self.size, self.world, self.rank = size, world, rank
        self.per_rank = -(-size // world)

    @staticmethod
    def valid(size: int, world: int) -> list[int]:
        per_rank = -(-size // world)
        return [max(0, min(per_rank, size - r * per_rank)) for r in range(world)]

    def __iter__(self) -> Iterator[int]:
        start = self.rank * self.per_rank
        stop = min(start + self.per_rank, self.size)
        indices = list(range(start, stop)) or [self.size - 1]
        return iter(indices + [indices[-1]] * (self.per_rank - len(indices)))

    def __len__(self) -> int:
        return self.per_rank


def scale_shift(preprocess: Callable[[Any], torch.Tensor], fill: int = 0) -> Callable[[Any], torch.Tensor]:
    """Light geometric augmentation for images whose orientation and colours carry meaning
    (arrows, flags, emoji): random scale 0.85-1.1 and shift up to 8 %, then ``preprocess``."""
    from torchvision import transforms as T

    return T.Compose([T.RandomAffine(degrees=0, translate=(0.08, 0.08), scale=(0.85, 1.1), fill=fill), preprocess])


def _seed_worker(worker_id: int) -> None:
    """Distinct, reproducible numpy/random state per worker (for random augmentations)."""
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
