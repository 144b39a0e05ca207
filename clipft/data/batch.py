"""``Batch``: what a method's training and validation steps receive from the data module."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Batch:
    """What every method's step receives. ``image_ids`` and ``captions`` let evaluation
    deduplicate images (several captions per image) and texts (shared caption strings)."""

    images: torch.Tensor  # [B, 3, H, W], preprocessed
    texts: torch.Tensor  # [B, L] token ids
    captions: list[str]
    image_ids: list[str]
    # data.negatives.count = K > 0 (training): each pair's own negative captions, sample-major
    # (row i holds pair i's: the sample axis is the index map), and which of them exist
    negative_texts: Optional[torch.Tensor] = None  # [B, K, L] token ids
    negative_valid: Optional[torch.Tensor] = None  # [B, K] bool
    negative_captions: Optional[list[list[str]]] = None
    # class-based sources (data.classes): each pair's class, an index into the data's ClassSet
    labels: Optional[torch.Tensor] = None  # [B] long

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device) -> "Batch":
        """This batch with its tensors on ``device`` (the batch itself when they are there already;
        asynchronous copies to a GPU, which the data loader's pinned memory allows)."""
        moved = {
            f.name: value.to(device, non_blocking=device.type == "cuda")
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor) and value.device != device
        }
        return replace(self, **moved) if moved else self

    def chunks(self, size: int) -> list["Batch"]:
        """Consecutive micro-batches of ``size`` rows (the last may be shorter): every field
        holds one row per pair, so each is sliced alike."""
        return [
            Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[start:start + size]
                     for f in fields(self)})
            for start in range(0, len(self), size)
        ]
