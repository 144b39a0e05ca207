"""Embedded synthetic image-caption data set: coloured shapes on a dark, noisy background.

Every sample is generated on the fly from ``(seed, split, index)``, so the data set needs no
files, costs no download and is byte-identical on every machine, in every DataLoader worker
and in any order of access. It exists so the whole fine-tuning stack (models, losses, methods,
zero-shot evaluation) can be exercised end to end in seconds, with captions whose meaning is
known exactly:

* one-object scenes: ``"a small red circle"``;
* two-object scenes: ``"a small red circle to the left of a large blue square"``.

Compositional structure is deliberate. ``HELD_OUT_COMBOS`` lists (colour, shape) pairs that
never occur in the ``train`` or ``val`` splits; the ``novel`` split is built from them, which
measures compositional generalisation. Two-object scenes contain attribute-swapped pairs
("a red circle left of a blue square" *and* "a blue circle left of a red square"); a plain
contrastive model tends to confuse those, which is exactly what hard-negative methods address,
so the data must keep both kinds.

The module is pure numpy (no torch, no PIL) so it can be imported anywhere cheaply; a torch
``DataLoader`` wraps :class:`SyntheticScenes` elsewhere.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "SIZE_FRACTIONS",
    "RELATIONS",
    "HELD_OUT_COMBOS",
    "SPLITS",
    "TASKS",
    "SceneObject",
    "Scene",
    "SyntheticScenes",
    "alpha_mask",
    "object_diameter",
    "class_names",
    "label_of",
    "prompts",
    "one_object_eval_set",
]

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")

#: Saturated, mutually distinct colours. The order is part of the API (class indices).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 240),
    "yellow": (240, 230, 30),
    "purple": (160, 40, 220),
    "orange": (250, 140, 0),
    "cyan": (20, 220, 230),
}

SIZES: tuple[str, ...] = ("small", "large")

#: Object diameter as a fraction of the image side (8 px and 14 px at 32 px).
SIZE_FRACTIONS: dict[str, float] = {"small": 0.25, "large": 0.44}

#: ``objects[0] <relation> objects[1]``; image y grows downward, so "above" means smaller y.
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")

#: (colour, shape) pairs that never appear in ``train``/``val``; every ``novel`` scene has one.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("green", "triangle"),
    ("blue", "cross"),
    ("yellow", "circle"),
    ("purple", "square"),
)

#: Split name -> id mixed into the per-sample seed, so splits never share scenes.
SPLITS: dict[str, int] = {"train": 0, "val": 1, "novel": 2}

#: Zero-shot classification tasks understood by :func:`class_names` and friends.
TASKS: tuple[str, ...] = ("shape", "colour", "object")

# Independent random streams of one sample: the scene (objects, layout) and its pixels. Keeping
# them apart lets ``scene()`` stay cheap and ``render()`` be called on its own.
_SCENE_STREAM = 0
_PIXEL_STREAM = 1

# Rejection sampling of the perpendicular offset; the acceptance rate is high (> 80 %), so this
# bound is only a guarantee against pathological cases, after which a fixed layout is used.
_MAX_LAYOUT_TRIES = 16

# Supersampling factor of the anti-aliased masks.
_SUPERSAMPLE = 4

# Background: a per-image dark level plus uniform per-pixel noise; values stay within 0..40.
_BG_LEVEL_RANGE = (4, 20)  # integers drawn in [low, high)
_BG_NOISE = 20.0

# Per-object brightness jitter: colour * U(1 - j, 1 + j).
_BRIGHTNESS_JITTER = 0.1


# --------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One coloured shape: its attributes only (the position lives in :class:`Scene`)."""

    shape: str
    colour: str
    size: str

    @property
    def phrase(self) -> str:
        """Noun phrase used in captions, e.g. ``"a small red circle"``."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What an image shows, sufficient to caption, label and render it.

    ``relation`` reads ``objects[0] <relation> objects[1]`` and is ``None`` for one object.
    ``centres`` holds ``(x, y)`` pixel centres (y grows downward) of the objects' bounding
    boxes, which are ``object_diameter(size, image_size)`` pixels wide.
    """

    objects: tuple[SceneObject, ...]
    relation: str | None
    centres: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        # Cheap consistency checks: a malformed Scene would otherwise yield a wrong caption.
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a Scene has 1 or 2 objects, got {len(self.objects)}")
        if len(self.centres) != len(self.objects):
            raise ValueError(
                f"got {len(self.centres)} centres for {len(self.objects)} objects"
            )
        if (self.relation is None) != (len(self.objects) == 1):
            raise ValueError(
                "relation must be None for one object and one of "
                f"{RELATIONS} for two, got {self.relation!r} with {len(self.objects)} objects"
            )
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")

    @property
    def caption(self) -> str:
        """``"a small red circle"`` or ``"a small red circle to the left of a large blue square"``.

        Built from the same phrase grammar as :func:`prompts`, so zero-shot templates and
        training captions can never drift apart.
        """
        if self.relation is None:
            return self.objects[0].phrase
        return f"{self.objects[0].phrase} {self.relation} {self.objects[1].phrase}"


# All 70 possible objects, built once: scenes reuse these immutable instances (cheaper than
# constructing dataclasses per sample).
_HELD_OUT = frozenset(HELD_OUT_COMBOS)
_ALL_OBJECTS: tuple[SceneObject, ...] = tuple(
    SceneObject(shape, colour, size) for colour in COLOURS for shape in SHAPES for size in SIZES
)
_SEEN_OBJECTS: tuple[SceneObject, ...] = tuple(
    o for o in _ALL_OBJECTS if (o.colour, o.shape) not in _HELD_OUT
)
_NOVEL_OBJECTS: tuple[SceneObject, ...] = tuple(
    o for o in _ALL_OBJECTS if (o.colour, o.shape) in _HELD_OUT
)



def _partner_table(
    firsts: tuple[SceneObject, ...], pool: tuple[SceneObject, ...]
) -> dict[SceneObject, tuple[SceneObject, ...]]:
    """For each first object, the allowed second objects: ``pool`` minus its (colour, shape).

    Identical (colour, shape) pairs are excluded because their captions would be ambiguous
    about which object is which; sharing just one attribute is allowed (and useful: it makes
    attribute-swap hard negatives). Precomputed because this is on the per-sample hot path.
    """
    return {
        f: tuple(o for o in pool if (o.colour, o.shape) != (f.colour, f.shape)) for f in firsts
    }


_SEEN_PARTNERS = _partner_table(_SEEN_OBJECTS, _SEEN_OBJECTS)
_NOVEL_PARTNERS = _partner_table(_NOVEL_OBJECTS, _ALL_OBJECTS)


def _draw_other(
    rng: np.random.Generator,
    first: SceneObject,
    partners: dict[SceneObject, tuple[SceneObject, ...]],
) -> SceneObject:
    """Draw a second object uniformly from the precomputed ``partners[first]`` candidates."""
    candidates = partners[first]
    return candidates[rng.integers(len(candidates))]


_COLOUR_ARRAYS: dict[str, np.ndarray] = {
    name: np.asarray(rgb, dtype=np.float32) for name, rgb in COLOURS.items()
}

# --------------------------------------------------------------------------------------------
# Geometry and masks
# --------------------------------------------------------------------------------------------


def object_diameter(size: str, image_size: int) -> int:
    """Bounding-box side in whole pixels, so masks can be pasted at integer offsets."""
    if size not in SIZE_FRACTIONS:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return max(2, int(round(SIZE_FRACTIONS[size] * image_size)))


def _star_polygon() -> np.ndarray:
    """Vertices of a 5-pointed star in unit-box coordinates, scaled to fill the box width.

    Outer radius R, inner radius 0.5 R (fatter than a classical star, so it still reads as a
    star at 8 px). R is chosen so the star spans the box horizontally, and the centre is
    moved down so the star is vertically centred (its bottom points sit at 0.81 R).
    """
    outer = 1.0 / np.cos(np.deg2rad(18.0))
    inner = 0.5 * outer
    shift = (outer - outer * np.cos(np.deg2rad(36.0))) / 2.0
    angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles) + shift], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of points against a closed polygon (vectorised over points)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (y1 > y) != (y2 > y)
        x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_cross)
    return inside


def _shape_inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean coverage of ``shape`` at points of the unit box ``[-1, 1]^2`` (y down).

    Extents are matched so shapes of one size look equally big: every shape spans (nearly)
    the whole box, except the square, whose side is 0.886 so its area equals the disc's
    (a full-box square would look clearly larger than the disc).
    """
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        half = float(np.sqrt(np.pi) / 2.0)
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "triangle":  # apex up, base along the bottom edge
        return (y <= 1.0) & (np.abs(x) <= (y + 1.0) / 2.0)
    if shape == "cross":  # plus sign, arms one third of the side thick
        arm = 1.0 / 3.0
        return ((np.abs(x) <= arm) & (np.abs(y) <= 1.0)) | (
            (np.abs(y) <= arm) & (np.abs(x) <= 1.0)
        )
    if shape == "star":
        return _inside_polygon(x, y, _star_polygon())
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


@lru_cache(maxsize=None)
def alpha_mask(shape: str, size: str, image_size: int) -> np.ndarray:
    """Anti-aliased coverage of one shape: float32 ``(d, d)`` in ``[0, 1]``, read-only.

    The shape is tested at ``4 x 4`` sub-pixel centres per pixel and box-averaged, which gives
    smooth edges without any per-image geometry. Results are cached per process (one entry per
    shape, size and image size), so rendering only pastes and blends.
    """
    d = object_diameter(size, image_size)
    n = d * _SUPERSAMPLE
    # Sub-pixel centres mapped to [-1, 1]: the box's border is the unit square's border.
    coords = ((np.arange(n) + 0.5) / n) * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    fine = _shape_inside(shape, x, y).astype(np.float32)
    alpha = fine.reshape(d, _SUPERSAMPLE, d, _SUPERSAMPLE).mean(axis=(1, 3))
    alpha = np.ascontiguousarray(alpha, dtype=np.float32)
    alpha.setflags(write=False)  # shared cache entry: protect it from accidental edits
    return alpha


def _layout(
    rng: np.random.Generator,
    d0: int,
    d1: int,
    relation: str,
    image_size: int,
    max_tries: int = _MAX_LAYOUT_TRIES,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left corners ``(x, y)`` of two boxes (sides ``d0``, ``d1``) satisfying ``relation``.

    Along the relation's main axis the corners are sampled directly so that the boxes are at
    least 1 px apart, i.e. centre distance >= r0 + r1 + 1 (uniform rejection there would
    accept only a few percent of large-object pairs). Across it, offsets are drawn uniformly
    and rejected until the main-axis distance strictly dominates; after ``max_tries``
    failures the boxes are centred across the axis, which always satisfies the constraint.
    """
    w = image_size
    if w < d0 + d1 + 1:
        raise ValueError(f"image_size {w} too small for objects of {d0} and {d1} px")
    horizontal = relation in ("to the left of", "to the right of")
    first_is_lower = relation in ("to the left of", "above")  # objects[0] has smaller coord
    # Main axis: the lower box ("lo") comes first, the other must start past lo's end + 1 px.
    d_lo, d_hi = (d0, d1) if first_is_lower else (d1, d0)
    a_lo = int(rng.integers(0, w - d_lo - d_hi))  # inclusive max is w - d_lo - d_hi - 1
    a_hi = int(rng.integers(a_lo + d_lo + 1, w - d_hi + 1))
    a0, a1 = (a_lo, a_hi) if first_is_lower else (a_hi, a_lo)
    main_dist = abs((a1 + d1 / 2.0) - (a0 + d0 / 2.0))

    for _ in range(max_tries):
        b0 = int(rng.integers(0, w - d0 + 1))
        b1 = int(rng.integers(0, w - d1 + 1))
        if abs((b1 + d1 / 2.0) - (b0 + d0 / 2.0)) < main_dist:
            break
    else:
        # Deterministic fallback: centred across the axis (centres differ by <= 0.5 px).
        b0, b1 = (w - d0) // 2, (w - d1) // 2

    if horizontal:
        return (a0, b0), (a1, b1)
    return (b0, a0), (b1, a1)


# --------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------


class SyntheticScenes:
    """Map-style data set of synthetic captioned scenes, generated from ``(seed, split, index)``.

    Sample ``i`` depends only on ``(seed, split, i)`` (via
    ``np.random.default_rng([seed, split_id, i, stream])``), never on what was read before, so
    shuffling, DataLoader workers and restarts all see identical bytes.

    Args:
        split: ``"train"`` and ``"val"`` draw objects uniformly from shape x colour x size
            minus ``HELD_OUT_COMBOS``; ``"novel"`` scenes always contain a held-out combo.
            Each split has its own seed stream, so ``val`` scenes are fresh, not training ones.
        size: number of samples (the data set is virtual; any size costs nothing).
        seed: non-negative base seed.
        image_size: side of the square RGB image in pixels (>= 16 so two large objects fit).
        two_object_fraction: probability that a scene has two objects and a relation.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        seed: int = 0,
        image_size: int = 32,
        two_object_fraction: float = 0.6,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not isinstance(image_size, (int, np.integer)) or image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
        if not 0.0 <= float(two_object_fraction) <= 1.0:
            raise ValueError(
                f"two_object_fraction must be in [0, 1], got {two_object_fraction!r}"
            )
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.two_object_fraction = float(two_object_fraction)
        self._split_id = SPLITS[split]
        self._diameters = {s: object_diameter(s, self.image_size) for s in SIZES}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, size={self.size}, seed={self.seed}, "
            f"image_size={self.image_size}, two_object_fraction={self.two_object_fraction})"
        )

    def __len__(self) -> int:
        return self.size

    def _check_index(self, index: int) -> int:
        """Normalise a (possibly negative) index; IndexError ends plain iteration correctly."""
        i = operator.index(index)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        return i

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._split_id, index, stream])

    def _draw_objects(self, rng: np.random.Generator, two: bool) -> tuple[SceneObject, ...]:
        """Draw 1 or 2 objects per the split's rules (see the class docstring)."""
        if self.split != "novel":
            first = _SEEN_OBJECTS[rng.integers(len(_SEEN_OBJECTS))]
            if not two:
                return (first,)
            return (first, _draw_other(rng, first, _SEEN_PARTNERS))
        held = _NOVEL_OBJECTS[rng.integers(len(_NOVEL_OBJECTS))]
        if not two:
            return (held,)
        other = _draw_other(rng, held, _NOVEL_PARTNERS)
        # The held-out object is first or second with equal chance, so captions do not
        # reveal which phrase is the novel one by its position.
        return (held, other) if rng.random() < 0.5 else (other, held)

    def scene(self, index: int) -> Scene:
        """Describe sample ``index`` (objects, relation, centres) without rendering it."""
        i = self._check_index(index)
        rng = self._rng(i, _SCENE_STREAM)
        two = bool(rng.random() < self.two_object_fraction)
        objects = self._draw_objects(rng, two)
        w = self.image_size
        if not two:
            d = self._diameters[objects[0].size]
            x, y = (int(v) for v in rng.integers(0, w - d + 1, size=2))
            return Scene(objects, None, ((x + d / 2.0, y + d / 2.0),))
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        d0, d1 = (self._diameters[o.size] for o in objects)
        (x0, y0), (x1, y1) = _layout(rng, d0, d1, relation, w)
        centres = ((x0 + d0 / 2.0, y0 + d0 / 2.0), (x1 + d1 / 2.0, y1 + d1 / 2.0))
        return Scene(objects, relation, centres)

    def render(self, scene: Scene, index: int) -> np.ndarray:
        """Draw ``scene`` as a uint8 ``(image_size, image_size, 3)`` RGB image.

        ``index`` seeds the pixel noise and brightness jitter (a stream separate from the
        scene's), so rendering is deterministic yet independent of ``scene()`` calls.
        """
        i = self._check_index(index)
        rng = self._rng(i, _PIXEL_STREAM)
        w = self.image_size
        level = rng.integers(*_BG_LEVEL_RANGE)
        img = rng.random((w, w, 3), dtype=np.float32)
        img *= _BG_NOISE
        img += level
        jitter = rng.uniform(
            1.0 - _BRIGHTNESS_JITTER, 1.0 + _BRIGHTNESS_JITTER, size=len(scene.objects)
        )
        for obj, (cx, cy), gain in zip(scene.objects, scene.centres, jitter):
            d = self._diameters[obj.size]
            x, y = int(round(cx - d / 2.0)), int(round(cy - d / 2.0))
            if x < 0 or y < 0 or x + d > w or y + d > w:
                raise ValueError(f"{obj.phrase} at centre ({cx}, {cy}) leaves the image")
            alpha = alpha_mask(obj.shape, obj.size, w)[:, :, None]
            colour = np.minimum(_COLOUR_ARRAYS[obj.colour] * np.float32(gain), np.float32(255))
            patch = img[y : y + d, x : x + d]
            patch += alpha * (colour - patch)  # alpha blend in place (patch is a view)
        # Values are already within [0, 255] (convex blends of in-range values), so rounding
        # is all that is left before the cast.
        np.rint(img, out=img)
        return img.astype(np.uint8)

    def __getitem__(self, index: int) -> dict:
        """``{"image": uint8 HxWx3, "caption": str, "scene": Scene, "index": int}``."""
        i = self._check_index(index)
        scene = self.scene(i)
        image = self.render(scene, i)
        return {"image": image, "caption": scene.caption, "scene": scene, "index": i}


def one_object_eval_set(
    split: str, size: int, seed: int, image_size: int = 32
) -> SyntheticScenes:
    """One-object scenes only: the evaluation set for zero-shot shape/colour/object labels."""
    return SyntheticScenes(
        split=split, size=size, seed=seed, image_size=image_size, two_object_fraction=0.0
    )


# --------------------------------------------------------------------------------------------
# Zero-shot labels
# --------------------------------------------------------------------------------------------


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def class_names(task: str) -> list[str]:
    """Class names of a zero-shot task; the list index is the label.

    ``"shape"``: SHAPES; ``"colour"``: COLOURS; ``"object"``: ``f"{colour} {shape}"`` for all
    35 combos in COLOURS x SHAPES order (held-out combos included, so ``novel`` is labelled).
    """
    _check_task(task)
    if task == "shape":
        return list(SHAPES)
    if task == "colour":
        return list(COLOURS)
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def label_of(scene: Scene, task: str) -> int:
    """Index into ``class_names(task)`` of a one-object scene (ValueError for two objects)."""
    _check_task(task)
    if len(scene.objects) != 1:
        raise ValueError(
            f"label_of needs a one-object scene, got {len(scene.objects)} objects: "
            f"{scene.caption!r}"
        )
    obj = scene.objects[0]
    if task == "shape":
        return SHAPES.index(obj.shape)
    if task == "colour":
        return list(COLOURS).index(obj.colour)
    return list(COLOURS).index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def prompts(task: str, class_name: str) -> list[str]:
    """Every single-object caption consistent with a class: templates for max-over-prompts.

    Using the exact caption grammar of the data (rather than "a photo of a ...") means a
    zero-shot classifier compares images against texts of the training distribution; the
    class score is the maximum over its prompts. Counts: shape 14 (7 colours x 2 sizes),
    colour 10 (5 shapes x 2 sizes), object 2 (2 sizes).
    """
    names = class_names(task)
    if class_name not in names:
        raise ValueError(
            f"class_name {class_name!r} is not a {task!r} class; expected one of {names}"
        )
    if task == "shape":
        pairs = [(colour, class_name) for colour in COLOURS]
    elif task == "colour":
        pairs = [(class_name, shape) for shape in SHAPES]
    else:
        colour, shape = class_name.split(" ")
        pairs = [(colour, shape)]
    return [SceneObject(shape, colour, size).phrase for colour, shape in pairs for size in SIZES]


# --------------------------------------------------------------------------------------------
# Throughput check: python -m clipft.data.synthetic
# --------------------------------------------------------------------------------------------

if __name__ == "__main__":
    import time

    dataset = SyntheticScenes("train", size=20000, seed=0, image_size=32)
    dataset[0]  # warm the mask cache so only steady-state work is timed
    n = 20000
    start = time.perf_counter()
    for k in range(n):
        dataset[k]
    elapsed = time.perf_counter() - start
    print(f"{n / elapsed:,.0f} images/s ({dataset})")
