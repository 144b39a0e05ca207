"""A fast path for images that are already at the model's input size.

open_clip's evaluation preprocess is Resize → CenterCrop → RGB → ToTensor → Normalize. On an
RGB image that already has the target size, the first three are identities, so the whole
preprocess is ``(x / 255 - mean) / std``. Doing that directly on the uint8 array skips PIL
(about 40 ms per batch of 128 at 32 px on a 2-core CPU: a quarter of a training step of the
tiny model). :func:`array_fast_path` returns such a function only when it can prove the
equivalence from the transform list; otherwise the caller keeps the PIL path.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torchvision import transforms as T


def _size_pair(size: Any) -> Optional[tuple[int, int]]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 1:
        return int(size[0]), int(size[0])
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


def array_fast_path(preprocess: Any, image_size: int) -> Optional[Callable[[np.ndarray], torch.Tensor]]:
    """A function uint8 HxWx3 array → normalised CHW tensor equal to ``preprocess`` applied to
    the same image as PIL, for square images of side ``image_size``; or None if the
    preprocess does anything else (random crops, a different size, unknown steps)."""
    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        return None
    mean = std = None
    to_tensor = False
    for step in steps:
        name = type(step).__name__
        if isinstance(step, (T.Resize, T.CenterCrop)) or name == "CenterCropOrPad":
            size = step.size
            if isinstance(step, T.Resize) and isinstance(size, int):
                size = (size, size)  # shorter side → size: identity for a square image of that side
            if _size_pair(size) != (image_size, image_size) or getattr(step, "max_size", None):
                return None
        elif name == "MaybeConvertMode":
            if getattr(step, "mode", "RGB") != "RGB":
                return None
        elif isinstance(step, T.ToTensor) or name == "MaybeToTensor":
            to_tensor = True
        elif isinstance(step, T.Normalize) and to_tensor and mean is None:
            mean, std = step.mean, step.std
        else:
            return None
    if not to_tensor or mean is None:
        return None
    return NormalizeArray(mean, std)


class NormalizeArray:
    """uint8 HxWx3 → float CHW, (x/255 − mean)/std (picklable for DataLoader workers)."""

    def __init__(self, mean: Any, std: Any) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255)
        return x.sub_(self.mean).div_(self.std)


class ViaPIL:
    """The general path: uint8 array → PIL image → the model's preprocess (picklable)."""

    def __init__(self, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.preprocess = preprocess

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        from PIL import Image

        return self.preprocess(Image.fromarray(array))


def array_transform(preprocess: Callable[[Any], torch.Tensor], image_size: int) -> Callable[[np.ndarray], torch.Tensor]:
    """The preprocess for uint8 arrays of side ``image_size``: the fast path when exact."""
    return array_fast_path(preprocess, image_size) or ViaPIL(preprocess)


# ------------------------------------------------------------------------ style augmentation


class StrokeWidth:
    """Thicker or thinner dark lines: a 3×3 minimum filter (dark strokes and outlines grow by
    a pixel) or a maximum filter (they shrink), with equal probability. Art styles differ in
    line weight (Noto's emoji have dark outlines, Twemoji's flat shapes none); a PIL image in,
    one out (picklable for DataLoader workers)."""

    def __call__(self, image: Any) -> Any:
        import random

        from PIL import ImageFilter

        return image.filter(ImageFilter.MinFilter(3) if random.random() < 0.5 else ImageFilter.MaxFilter(3))


def style_augment(preprocess: Callable[[Any], torch.Tensor], fill: int = 0) -> Callable[[Any], torch.Tensor]:
    """``data.train_transform: style``: augmentation towards art styles not seen in training,
    kept general (no style-specific rule) and meaning-preserving for drawings whose colours and
    directions carry meaning (emoji, icons, flags, signs): no flips, no hue change.

    - geometry: random scale 0.8-1.15 and shift up to 8 % (``fill`` the uncovered border);
    - line weight: :class:`StrokeWidth` with p = 0.25;
    - blur: Gaussian, 3×3, σ 0.1-1.0, p = 0.3 (soft vs crisp rendering);
    - colour: brightness ±30 %, contrast ±30 %, saturation ±40 % (hue kept), p = 0.8; grayscale
      p = 0.1 (shading and palette vary between styles; the concept does not).

    Then ``preprocess`` (the model's evaluation transform)."""
    return T.Compose([
        T.RandomAffine(degrees=0, translate=(0.08, 0.08), scale=(0.8, 1.15), fill=fill),
        T.RandomApply([StrokeWidth()], p=0.25),
        T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.3),
        T.RandomApply([T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.0)], p=0.8),
        T.RandomGrayscale(p=0.1),
        preprocess,
    ])
