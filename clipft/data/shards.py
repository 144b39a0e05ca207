"""WebDataset tar shards: image-caption pairs streamed from ``.tar`` files (open_clip_train's
and clip_benchmark's format: members ``<key>.jpg`` / ``.png`` / ... and ``<key>.txt``).

Why clipft reads the tar files itself (Python's ``tarfile``) instead of through webdataset's
pipeline: the two properties distributed training needs — every sample exactly once per epoch,
and the same number of batches on every rank, so that DDP/ZeRO never waits for a rank that ran
out — come from a deterministic plan of which (rank, worker) reads which shard, and that plan
is easiest to state and test when clipft owns the loop. It also keeps clipft clear of
webdataset's API changes (open_clip_train's pipeline fails on webdataset 1.0.2). webdataset is
used for one thing: opening remote URLs (``pipe:``, ``http(s)://``, ``gs://``, ...), which pass
to its ``gopen`` unchanged.

The plan of one epoch (:class:`ShardStream`):

* ``epoch_samples`` (``data.webdataset.epoch_samples``, or the sum of the shards' entries in
  ``sizes.json``) sets the epoch: every rank yields ``epoch_samples // (world × batch)``
  batches, no more, no fewer.
* The shards are permuted by a generator seeded with (seed, epoch), the same on every rank, and
  dealt to ranks, then within a rank to its DataLoader workers, each shard to the slot with the
  fewest samples so far (balanced by ``sizes.json``). A rank's batches are shared out between
  its workers in proportion to their samples.
* A worker reads its shards in turn through a seeded shuffle buffer of raw (undecoded) samples,
  one pass at a time; it stops at its quota (the rest of its samples wait for a later epoch,
  where the shards are dealt anew) and, if its shards run out first, it starts another pass
  over them in a new shuffled order (so a rank with fewer samples repeats a few).
  With sizes that divide evenly, every sample comes back exactly once per epoch.
* Resampled mode (``data.webdataset.resampled``): each worker draws shards with replacement,
  weighted per ``::``-separated source, from a generator seeded by (seed, epoch, rank, worker):
  an endless stream cut into epochs of ``epoch_samples``.

A sample without an image or caption member, an image that does not decode, or a tar file that
breaks off is skipped and counted (``data.on_bad_sample: error`` makes it fatal); the first few
are logged by the worker, and the count travels with the next batch to the data module.
"""

from __future__ import annotations

import heapq
import io
import json
import logging
import posixpath
import random
import tarfile
import zlib
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from clipft.config import WebDatasetConfig
from clipft.data.table import DataError

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
MAX_BAD_IN_A_ROW = 1000  # a worker that skips this many samples in a row stops with an error
LOGGED_BAD_SAMPLES = 5  # per worker; the rest are counted


def is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def is_table(spec: str) -> bool:
    return Path(spec).suffix.lower() in TABLE_SUFFIXES


def open_shard(url: str) -> IO[bytes]:
    """A local file, or a remote URL through webdataset's ``gopen`` (pipe:, http(s), gs, ...)."""
    if is_url(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


# ------------------------------------------------------------------ shard lists


@dataclass
class ShardSet:
    """The shards of a spec, with the ``::``-source each came from and its size (samples,
    from ``sizes.json``; None where unknown)."""

    spec: str
    urls: list[str]
    sources: list[int]
    sizes: list[Optional[int]]

    def __len__(self) -> int:
        return len(self.urls)

    def known_total(self) -> Optional[int]:
        return None if any(s is None for s in self.sizes) else sum(self.sizes)  # type: ignore[arg-type]


def expand_shards(spec: str) -> ShardSet:
    """Brace-expand ``spec`` (``data/shard-{000000..000099}.tar``; several sources joined with
    ``::``; a folder means its ``*.tar`` files). Local shards must exist; URLs are not checked."""
    from braceexpand import braceexpand

    urls: list[str] = []
    sources: list[int] = []
    for source, part in enumerate(p.strip() for p in spec.split("::")):
        if not part:
            raise DataError(f"shard spec '{spec}': empty source between '::'")
        expanded = list(braceexpand(part))
        if not is_url(part):
            if len(expanded) == 1 and Path(part).is_dir():
                expanded = sorted(str(p) for p in Path(part).glob("*.tar"))
                if not expanded:
                    raise DataError(f"shard folder '{part}' holds no .tar files")
            missing = [p for p in expanded if not Path(p).is_file()]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise DataError(
                    f"shard spec '{part}': {len(missing)} of {len(expanded)} shards not found "
                    f"({', '.join(missing[:3])}{more})"
                )
        urls += expanded
        sources += [source] * len(expanded)
    return ShardSet(spec, urls, sources, read_sizes(urls))


def read_sizes(urls: Sequence[str]) -> list[Optional[int]]:
    """Samples per shard from the ``sizes.json`` next to each local shard ({shard file name:
    count}, as open_clip_train and ``clipft data write-shards`` write it)."""
    tables: dict[Path, dict[str, int]] = {}
    sizes: list[Optional[int]] = []
    for url in urls:
        if is_url(url):
            sizes.append(None)
            continue
        folder = Path(url).parent
        if folder not in tables:
            path = folder / SIZES_FILE
            try:
                tables[folder] = json.loads(path.read_text()) if path.is_file() else {}
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{path}: not valid JSON ({err})") from err
        value = tables[folder].get(Path(url).name)
        sizes.append(int(value) if value is not None else None)
    return sizes


def epoch_length(shards: ShardSet, settings: WebDatasetConfig) -> int:
    """Samples per epoch: ``epoch_samples`` if set, else the sum of the shards' sizes."""
    if settings.epoch_samples is not None:
        return settings.epoch_samples
    total = shards.known_total()
    if total is None:
        unknown = next(u for u, s in zip(shards.urls, shards.sizes) if s is None)
        raise DataError(
            f"'{unknown}': no entry in a {SIZES_FILE} next to the shard, so the epoch length is unknown; "
            f"set data.webdataset.epoch_samples (samples per epoch), or write {SIZES_FILE} "
            f"({{\"shard file name\": samples, ...}}; clipft data write-shards writes one)"
        )
    return total


# ------------------------------------------------------------------ reading samples


def tar_samples(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """Samples of a tar stream: consecutive members with the same key (the path up to the first
    dot of the file name) form one sample ``{"__key__": key, ext: bytes, ...}``."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        sample: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            folder, name = posixpath.split(member.name)
            stem, dot, ext = name.partition(".")
            if not dot or stem.startswith("."):  # no extension, or a hidden file (._foo from macOS tar)
                continue
            key = posixpath.join(folder, stem)
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            data = tar.extractfile(member)
            sample[ext.lower()] = data.read() if data is not None else b""
        if sample:
            yield sample


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """A shard's samples, each tagged with ``__url__``; a shard that breaks off ends with a
    ``{"__error__": ...}`` marker instead of raising, so the caller can skip and count it."""
    try:
        with open_shard(url) as stream:
            for sample in tar_samples(url, stream):
                sample["__url__"] = url
                yield sample
    except (tarfile.TarError, OSError, EOFError) as err:
        yield {"__url__": url, "__key__": "?", "__error__": f"unreadable shard ({type(err).__name__}: {err})"}


def image_member(sample: dict[str, Any], image_keys: Sequence[str]) -> Optional[str]:
    return next((k for k in image_keys if k in sample), None)


def decode_pair(sample: dict[str, Any], settings: WebDatasetConfig) -> tuple[Optional[tuple[Image.Image, str]], str]:
    """(RGB image, caption) of a raw sample, or None and the reason it is unusable."""
    if "__error__" in sample:
        return None, sample["__error__"]
    image_key = image_member(sample, settings.image_keys)
    if image_key is None:
        return None, f"no image member ({'/'.join(settings.image_keys)}); members: {_members(sample)}"
    if settings.caption_key not in sample:
        return None, f"no caption member '{settings.caption_key}'; members: {_members(sample)}"
    caption = sample[settings.caption_key].decode("utf-8", errors="replace").strip()
    if not caption:
        return None, "empty caption"
    try:
        with Image.open(io.BytesIO(sample[image_key])) as im:
            return (im.convert("RGB"), caption), ""
    except Exception as err:  # PIL raises many types for broken files
        return None, f"image '{image_key}' cannot be read ({type(err).__name__}: {err})"


def _members(sample: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"


def check_first_sample(shards: ShardSet, settings: WebDatasetConfig) -> None:
    """Read the first sample of each source's first shard: a wrong image or caption key fails
    here, before training, naming the shard and the members it has."""
    firsts = {}
    for url, source in zip(shards.urls, shards.sources):
        firsts.setdefault(source, url)
    for url in firsts.values():
        sample = next(shard_samples(url), None)
        if sample is None:
            raise DataError(f"shard '{url}' holds no samples")
        if "__error__" in sample:
            raise DataError(f"shard '{url}': {sample['__error__']}")
        if image_member(sample, settings.image_keys) is None or settings.caption_key not in sample:
            raise DataError(
                f"shard '{url}', sample '{sample['__key__']}': expected an image member "
                f"({'/'.join(settings.image_keys)}) and a caption member '{settings.caption_key}', found: "
                f"{_members(sample)}; set data.webdataset.image_keys / data.webdataset.caption_key"
            )


# ------------------------------------------------------------------ the epoch plan


def deal(sizes: Sequence[int], order: Iterable[int], slots: int) -> list[list[int]]:
    """Deal items (in ``order``) to ``slots``, each to the slot with the smallest total size
    so far (the lowest slot on ties): deterministic and balanced to within one item."""
    dealt: list[list[int]] = [[] for _ in range(slots)]
    heap = [(0, slot) for slot in range(slots)]  # (total, slot): the smallest total, then the lowest slot
    for item in order:
        total, slot = heapq.heappop(heap)
        dealt[slot].append(item)
        heapq.heappush(heap, (total + sizes[item], slot))
    return dealt


def share_out(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders get the rest)."""
    whole = sum(weights)
    if whole <= 0:
        return [0] * len(weights)
    exact = [total * w / whole for w in weights]
    parts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def arrival_order(quotas: Sequence[int]) -> list[int]:
    """The worker each of a rank's batches comes from: a DataLoader takes one batch from each
    worker in turn, skipping workers that are done."""
    left = list(quotas)
    order = []
    while any(left):
        for worker, n in enumerate(left):
            if n:
                order.append(worker)
                left[worker] -= 1
    return order


def _seed(*parts: Any) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


@dataclass
class WorkerPlan:
    """What one worker of one rank does in one epoch."""

    worker: int  # which share of the rank's shards and batches (seeds its shuffle)
    shards: list[int]  # indices into the shard list (empty in resampled mode)
    quota: int  # batches to yield
    skip: int  # batches to pass over first (a resumed run)


class ShardStream(IterableDataset):
    """One rank's training batches from shards, ``len(self)`` per epoch on every rank
    (see the module docstring for the plan). Each item is a collated :class:`Batch`, so the
    DataLoader runs with ``batch_size=None``; a batch carries ``skipped_samples``, the number
    of bad samples skipped since the previous batch of its worker.

    Like :class:`~clipft.data.datamodule.TrainingOrder` it is a stream of epochs that a resumed
    run re-enters after the batches it trained on (:meth:`start_at`); each iteration yields the
    rest of the current data epoch. DataLoader workers must be persistent (they keep their own
    copy of the position)."""

    def __init__(
        self,
        shards: ShardSet,
        settings: WebDatasetConfig,
        epoch_samples: int,
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        collate: Callable[[Sequence[tuple[torch.Tensor, Any, str]]], Any],
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        on_bad_sample: str = "skip",
    ) -> None:
        self.shards, self.settings = shards, settings
        self.batch_size, self.transform, self.collate = batch_size, transform, collate
        self.world, self.rank, self.seed, self.on_bad_sample = world, rank, seed, on_bad_sample
        self.batches_per_epoch = epoch_samples // (world * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{shards.spec}: an epoch of {epoch_samples} samples is less than one batch per device "
                f"({world} x data.batch_size={batch_size}); lower data.batch_size or raise the epoch length"
            )
        if not settings.resampled and len(shards) < world:
            raise DataError(
                f"{shards.spec}: {len(shards)} shards for {world} devices: each device reads whole shards, so it "
                "needs at least one; write more, smaller shards (clipft data write-shards --shard-size) or set "
                "data.webdataset.resampled=true"
            )
        known = [s for s in shards.sizes if s is not None]
        mean = sum(known) // len(known) if known else max(1, epoch_samples // max(1, len(shards)))
        self.balance_sizes = [s if s is not None else mean for s in shards.sizes]  # unknown: the mean
        self.position = 0  # batches since the start of the run

    def __len__(self) -> int:
        return self.batches_per_epoch

    def start_at(self, batches: int) -> None:
        self.position = batches

    def plans(self, epoch: int, workers: int, offset: int = 0) -> list[WorkerPlan]:
        """The plans of this rank's DataLoader workers (by worker id) in data epoch ``epoch``,
        starting ``offset`` batches in. A DataLoader starts each iteration at worker 0, so
        after an offset the shares rotate: worker 0 takes the share whose batch came next."""
        if self.settings.resampled:
            shards: list[list[int]] = [[] for _ in range(workers)]
            quotas = share_out(self.batches_per_epoch, [1] * workers)
        else:
            order = list(range(len(self.shards)))
            random.Random(_seed(self.seed, epoch)).shuffle(order)
            mine = deal(self.balance_sizes, order, self.world)[self.rank]
            shards = deal(self.balance_sizes, mine, workers)
            quotas = share_out(self.batches_per_epoch, [sum(self.balance_sizes[i] for i in s) for s in shards])
        order = arrival_order(quotas)
        passed = order[:offset]
        first = order[offset] if offset < len(order) else 0
        shares = [(first + w) % workers for w in range(workers)]
        return [WorkerPlan(s, shards[s], quotas[s] - passed.count(s), passed.count(s)) for s in shares]

    def __iter__(self) -> Iterator[Any]:
        epoch, offset = divmod(self.position, self.batches_per_epoch)
        self.position = (epoch + 1) * self.batches_per_epoch
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._batches(self.plans(epoch, workers, offset)[worker], epoch)

    # -------------------------------------------------------------- one worker

    def _raw_samples(self, plan: WorkerPlan, epoch: int) -> Iterator[dict[str, Any]]:
        """The worker's raw samples, shuffled within each pass over its shards, pass after pass."""
        rng = random.Random(_seed(self.seed, epoch, self.rank, plan.worker))
        if self.settings.resampled:
            weights = self._shard_weights()
            while True:  # endless: one shard drawn at a time
                url = self.shards.urls[rng.choices(range(len(self.shards)), weights)[0]]
                yield from shuffle_buffer(shard_samples(url), self.settings.shuffle_buffer, rng)
        for pass_number in count():
            order = list(plan.shards)
            if pass_number:  # a further pass (this worker had fewer samples than its quota)
                rng.shuffle(order)
            found = False
            for sample in shuffle_buffer(
                (s for i in order for s in shard_samples(self.shards.urls[i])), self.settings.shuffle_buffer, rng
            ):
                found = True
                yield sample
            if not found:
                raise DataError(f"{self.shards.spec}: the shards of worker {plan.worker} on rank {self.rank} hold no samples")

    def _shard_weights(self) -> list[float]:
        per_source = self.settings.weights or [1.0] * (max(self.shards.sources) + 1)
        return [per_source[s] for s in self.shards.sources]

    def _batches(self, plan: WorkerPlan, epoch: int) -> Iterator[Any]:
        if plan.quota <= 0:
            return
        samples = self._raw_samples(plan, epoch)
        for _ in range(plan.skip * self.batch_size):  # a resumed run: undecoded, so fast
            next(samples)
        skipped, logged, in_a_row = 0, 0, 0
        for _ in range(plan.quota):
            items = []
            while len(items) < self.batch_size:
                sample = next(samples)
                pair, problem = decode_pair(sample, self.settings)
                if pair is None:
                    message = f"shard '{sample['__url__']}', sample '{sample['__key__']}': {problem}"
                    if self.on_bad_sample == "error":
                        raise DataError(message + " (set data.on_bad_sample=skip to skip such samples)")
                    skipped, in_a_row = skipped + 1, in_a_row + 1
                    if logged < LOGGED_BAD_SAMPLES:
                        logged += 1
                        log.warning("skipped %s", message)
                    if in_a_row >= MAX_BAD_IN_A_ROW:
                        raise DataError(f"{in_a_row} bad samples in a row; the last: {message}")
                    continue
                in_a_row = 0
                image, caption = pair
                items.append((self.transform(image), caption, f"{sample['__url__']}/{sample['__key__']}"))
            batch = self.collate(items)
            batch.skipped_samples = skipped  # read (and removed) by the data module
            skipped = 0
            yield batch


def shuffle_buffer(samples: Iterable[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Samples in a random order: each output is drawn from a buffer of ``size``; at the end the
    buffer is emptied in random order (every input comes out exactly once). ``size`` <= 1: as is."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------ random access (validation)


@dataclass
class IndexedSample:
    url: str
    key: str
    image: tuple[int, int]  # (offset, size) of the image member in the tar file
    caption: tuple[int, int]


@dataclass
class ShardIndex:
    """The samples of local shards with their members' byte positions: random access, so that
    validation splits them over ranks exactly as a table (each sample counted once)."""

    spec: str
    samples: list[IndexedSample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def index_shards(spec: str, settings: WebDatasetConfig, on_bad_sample: str = "skip") -> ShardIndex:
    """Index local shards (reads the tar headers only). Samples without an image or caption
    member are skipped and counted, or with ``on_bad_sample="error"`` fail naming the shard."""
    shards = expand_shards(spec)
    remote = [u for u in shards.urls if is_url(u)]
    if remote:
        raise DataError(
            f"data.val: '{remote[0]}': validation shards must be local files (validation reads samples by "
            "position to split them exactly over devices); copy them, or give a table (.csv/.tsv/.jsonl)"
        )
    index = ShardIndex(spec)
    for url in shards.urls:
        try:
            with tarfile.open(url, "r:") as tar:
                members: dict[str, dict[str, tuple[int, int]]] = {}
                for m in tar:
                    folder, name = posixpath.split(m.name)
                    stem, dot, ext = name.partition(".")
                    if m.isfile() and dot and not stem.startswith("."):
                        members.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"shard '{url}' cannot be read ({type(err).__name__}: {err})") from err
        for key, found in members.items():
            image_key = image_member(found, settings.image_keys)
            if image_key is None or settings.caption_key not in found:
                message = (f"shard '{url}', sample '{key}': expected an image member ({'/'.join(settings.image_keys)}) "
                           f"and '{settings.caption_key}', found: {', '.join(sorted(found))}")
                if on_bad_sample == "error":
                    raise DataError(message + "; set data.webdataset.image_keys / caption_key, or data.on_bad_sample=skip")
                index.skipped.append(message)
                continue
            index.samples.append(IndexedSample(url, key, found[image_key], found[settings.caption_key]))
    if not index.samples:
        raise DataError(f"{spec}: no usable samples" + (f" (first problem: {index.skipped[0]})" if index.skipped else ""))
    if index.skipped:
        log.warning("%s: skipped %d samples (first: %s)", spec, len(index.skipped), index.skipped[0])
    return index


class ShardFetch:
    """Fetcher (see :mod:`clipft.data.datamodule`) over indexed shards: (RGB image, caption, id)."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, i: int) -> tuple[Image.Image, str, str]:
        sample = self.index.samples[i]
        with open(sample.url, "rb") as f:
            image, caption = (_read(f, *sample.image), _read(f, *sample.caption))
        where = f"shard '{sample.url}', sample '{sample.key}'"
        try:
            with Image.open(io.BytesIO(image)) as im:
                rgb = im.convert("RGB")
        except Exception as err:
            raise DataError(f"{where}: image cannot be read ({type(err).__name__}: {err})") from err
        return rgb, caption.decode("utf-8", errors="replace").strip(), f"{sample.url}/{sample.key}"


def _read(f: IO[bytes], offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)
