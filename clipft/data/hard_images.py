"""Hard negative images (NegCLIP, Yuksekgonul et al., ICLR 2023): for every training image
its k nearest neighbours in the starting model's image-embedding space, computed once before
training and cached; each training batch then takes, for every pair, one neighbour's pair as
an extra in-batch pair (its image a hard negative for the pair's caption, and the other way
round).
"""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler


def nearest_neighbours(features: Tensor, image_ids: Sequence[str], k: int, chunk: int = 4096) -> Tensor:
    """``[N, k]`` indices of each row's k most similar rows (cosine) among those of another
    image (rows of the same image — several captions of one picture — never count)."""
    if k < 1 or len(set(image_ids)) <= k:
        raise ValueError(f"hard images: need more than k={k} distinct training images, got {len(set(image_ids))}")
    unit = F.normalize(features.float(), dim=-1)
    ids = torch.tensor([zlib.crc32(i.encode()) for i in image_ids])
    out = []
    for start in range(0, len(unit), chunk):
        similarity = unit[start:start + chunk] @ unit.T
        similarity.masked_fill_(ids[start:start + chunk, None] == ids[None, :], float("-inf"))
        out.append(similarity.topk(k, dim=1).indices)
    return torch.cat(out)


@torch.no_grad()
def encode_images(encode: Callable[[Tensor], Tensor], loader: DataLoader) -> Tensor:
    """Features of every image batch of ``loader``, with a progress bar."""
    from tqdm.auto import tqdm

    return torch.cat([encode(images).float().cpu() for images in tqdm(loader, desc="hard images: encoding", unit=" batches")])


def cached(path: Path, compute: Callable[[], Tensor]) -> Tensor:
    """``compute()`` once: saved atomically at ``path``, read from there afterwards."""
    if path.is_file():  # clipft's own cache file, still read the safe way (docs/safety.md)
        from clipft.models.checkpoint_io import load

        return load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def cache_key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class WithHardImages(Sampler[list[int]]):
    """Batches of ``order`` (drop_last), each followed by one of the k nearest neighbours of
    every pair in it, chosen by a generator seeded by the batch itself (so a resumed run draws
    the same)."""

    def __init__(self, order: Sampler[int], batch_size: int, neighbours: Tensor, seed: int) -> None:
        self.order, self.batch_size, self.neighbours, self.seed = order, batch_size, neighbours, seed

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.order:
            batch.append(index)
            if len(batch) == self.batch_size:
                rng = random.Random(zlib.crc32(f"{self.seed}|{batch}".encode()))
                k = self.neighbours.shape[1]
                yield batch + [int(self.neighbours[i, rng.randrange(k)]) for i in batch]
                batch = []

    def __len__(self) -> int:
        return len(self.order) // self.batch_size  # type: ignore[arg-type]
