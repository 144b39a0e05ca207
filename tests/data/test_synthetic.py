"""Tests of the embedded synthetic scenes: determinism, split rules, geometry, pixels, labels."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest

from clipft.data.synthetic import (
    COLOURS,
    HELD_OUT_COMBOS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    SyntheticScenes,
    _layout,
    alpha_mask,
    class_names,
    label_of,
    object_diameter,
    one_object_eval_set,
    prompts,
)



def _alt(words) -> str:
    return "|".join(re.escape(w) for w in words)


_PHRASE = rf"a ({_alt(SIZES)}) ({_alt(COLOURS)}) ({_alt(SHAPES)})"
CAPTION_RE = re.compile(rf"^{_PHRASE}(?: ({_alt(RELATIONS)}) {_PHRASE})?$")


def _radius(obj: SceneObject, image_size: int) -> float:
    return object_diameter(obj.size, image_size) / 2.0


# ---------------------------------------------------------------------------- vocabulary


def test_vocabulary() -> None:
    assert SHAPES == ("circle", "square", "triangle", "cross", "star")
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]
    assert len(set(COLOURS.values())) == 7
    assert all(len(rgb) == 3 and max(rgb) >= 200 for rgb in COLOURS.values())
    assert [object_diameter(s, 32) for s in SIZES] == [8, 14]
    assert all(c in COLOURS and s in SHAPES for c, s in HELD_OUT_COMBOS)


# ---------------------------------------------------------------------------- determinism


def test_same_seed_split_index_is_byte_identical_in_any_order() -> None:
    a = SyntheticScenes("train", size=100, seed=3)
    b = SyntheticScenes("train", size=100, seed=3)
    order = [7, 0, 99, 42, 7, 13]
    first = {i: a[i] for i in order}
    for i in reversed(order):  # other instance, other order
        s = b[i]
        assert s["image"].tobytes() == first[i]["image"].tobytes()
        assert s["caption"] == first[i]["caption"]
        assert s["scene"] == first[i]["scene"]
        assert s["index"] == i
    # A pickled copy (what a DataLoader worker receives) yields the same bytes too.
    c = pickle.loads(pickle.dumps(a))
    assert c[42]["image"].tobytes() == first[42]["image"].tobytes()
    assert a[-1]["caption"] == a[99]["caption"]


def test_seeds_and_splits_differ() -> None:
    base = SyntheticScenes("train", size=50, seed=0)
    others = [
        SyntheticScenes("train", size=50, seed=1),
        SyntheticScenes("val", size=50, seed=0),
        SyntheticScenes("novel", size=50, seed=0),
    ]
    for other in others:
        assert all(base[i]["image"].tobytes() != other[i]["image"].tobytes() for i in range(50))
        same = sum(base.scene(i) == other.scene(i) for i in range(50))
        assert same == 0


def test_scene_and_render_are_consistent_with_getitem() -> None:
    ds = SyntheticScenes("val", size=10, seed=5)
    scene = ds.scene(4)
    np.testing.assert_array_equal(ds.render(scene, 4), ds[4]["image"])


# ---------------------------------------------------------------------------- captions & splits


def test_caption_grammar_agrees_with_scene() -> None:
    ds = SyntheticScenes("train", size=300, seed=1)
    for i in range(len(ds)):
        sample = ds[i]
        scene: Scene = sample["scene"]
        m = CAPTION_RE.match(sample["caption"])
        assert m, sample["caption"]
        g = m.groups()
        assert SceneObject(g[2], g[1], g[0]) == scene.objects[0]
        if scene.relation is None:
            assert g[3] is None and len(scene.objects) == 1
        else:
            assert g[3] == scene.relation
            assert SceneObject(g[6], g[5], g[4]) == scene.objects[1]


@pytest.mark.parametrize("split", ["train", "val"])
def test_held_out_combos_never_in_train_or_val(split: str) -> None:
    ds = SyntheticScenes(split, size=4000, seed=2)
    seen = set()
    for i in range(len(ds)):
        for o in ds.scene(i).objects:
            seen.add((o.colour, o.shape, o.size))
    assert not {(c, s) for c, s, _ in seen} & set(HELD_OUT_COMBOS)
    assert len(seen) == (35 - len(HELD_OUT_COMBOS)) * 2  # all other objects do occur


def test_novel_always_contains_a_held_out_combo() -> None:
    ds = SyntheticScenes("novel", size=2000, seed=2)
    n_two = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        combos = {(o.colour, o.shape) for o in scene.objects}
        assert combos & set(HELD_OUT_COMBOS), scene.caption
        n_two += len(scene.objects) == 2
    assert 0.55 < n_two / len(ds) < 0.65


def test_object_mix_and_attribute_swaps() -> None:
    ds = SyntheticScenes("train", size=3000, seed=4)
    scenes = [ds.scene(i) for i in range(len(ds))]
    two = [s for s in scenes if len(s.objects) == 2]
    assert 0.57 < len(two) / len(scenes) < 0.63
    assert {s.relation for s in two} == set(RELATIONS)
    for s in two:
        a, b = s.objects
        assert (a.colour, a.shape) != (b.colour, b.shape)
    # Both a scene and its attribute-swapped counterpart occur (the hard-negative case),
    # at least for some same-relation pairs; captions share one attribute at times.
    keys = {(s.relation, s.objects[0].colour, s.objects[0].shape, s.objects[1].colour,
             s.objects[1].shape) for s in two}
    swapped = [k for k in keys if (k[0], k[3], k[2], k[1], k[4]) in keys and k[1] != k[3]]
    assert swapped
    assert any(s.objects[0].shape == s.objects[1].shape for s in two)
    assert any(s.objects[0].colour == s.objects[1].colour for s in two)


@pytest.mark.parametrize("fraction, expected", [(0.0, {1}), (1.0, {2})])
def test_two_object_fraction_extremes(fraction: float, expected: set[int]) -> None:
    ds = SyntheticScenes("train", size=200, two_object_fraction=fraction)
    assert {len(ds.scene(i).objects) for i in range(len(ds))} == expected


# ---------------------------------------------------------------------------- geometry


def _check_geometry(scene: Scene, image_size: int) -> None:
    for obj, (cx, cy) in zip(scene.objects, scene.centres):
        r = _radius(obj, image_size)
        assert r <= cx <= image_size - r and r <= cy <= image_size - r, scene
    if scene.relation is None:
        return
    (x0, y0), (x1, y1) = scene.centres
    dx, dy = x1 - x0, y1 - y0  # offset of object 1 from object 0
    gap = _radius(scene.objects[0], image_size) + _radius(scene.objects[1], image_size) + 1
    if scene.relation in ("to the left of", "to the right of"):
        assert (dx > 0) == (scene.relation == "to the left of"), scene
        assert abs(dx) > abs(dy) and abs(dx) >= gap, scene
    else:
        assert (dy > 0) == (scene.relation == "above"), scene  # y grows downward
        assert abs(dy) > abs(dx) and abs(dy) >= gap, scene


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_relation_geometry(image_size: int) -> None:
    ds = SyntheticScenes("train", size=1500, seed=6, image_size=image_size,
                         two_object_fraction=0.8)
    for i in range(len(ds)):
        _check_geometry(ds.scene(i), image_size)


@pytest.mark.parametrize("relation", RELATIONS)
def test_fallback_layout_satisfies_relation(relation: str) -> None:
    rng = np.random.default_rng(0)
    for image_size in (16, 32):
        d_small, d_large = (object_diameter(s, image_size) for s in SIZES)
        for d0, d1 in [(d_large, d_large), (d_small, d_large), (d_large, d_small)]:
            (x0, y0), (x1, y1) = _layout(rng, d0, d1, relation, image_size, max_tries=0)
            objs = tuple(SceneObject("circle", "red", "large" if d == d_large else "small")
                         for d in (d0, d1))
            centres = ((x0 + d0 / 2, y0 + d0 / 2), (x1 + d1 / 2, y1 + d1 / 2))
            _check_geometry(Scene(objs, relation, centres), image_size)


# ---------------------------------------------------------------------------- rendering


def test_masks() -> None:
    for size in SIZES:
        areas = []
        for shape in SHAPES:
            m = alpha_mask(shape, size, 32)
            d = object_diameter(size, 32)
            assert m.shape == (d, d) and m.dtype == np.float32
            assert m.min() >= 0.0 and m.max() == 1.0
            assert ((m > 0) & (m < 1)).any()  # anti-aliased edge
            assert not m.flags.writeable
            areas.append(m.sum() / d**2)
        assert 0.3 < min(areas) and max(areas) / min(areas) < 2.5, areas
    assert alpha_mask("circle", "large", 32).sum() > 2.5 * alpha_mask("circle", "small", 32).sum()


@pytest.mark.parametrize("image_size", [16, 32])
def test_rendered_colours_and_dark_background(image_size: int) -> None:
    ds = SyntheticScenes("novel", size=60, seed=8, image_size=image_size)
    for i in range(len(ds)):
        sample = ds[i]
        img, scene = sample["image"], sample["scene"]
        assert img.dtype == np.uint8 and img.shape == (image_size, image_size, 3)
        covered = np.zeros((image_size, image_size), dtype=bool)
        for obj, (cx, cy) in zip(scene.objects, scene.centres):
            d = object_diameter(obj.size, image_size)
            x, y = int(cx - d / 2), int(cy - d / 2)
            covered[y:y + d, x:x + d] = True
            mask = alpha_mask(obj.shape, obj.size, image_size)
            peak = mask.max()  # 1.0 except for tiny shapes (4 px at 16 px images)
            pixels = img[y:y + d, x:x + d][mask == peak].astype(float)
            assert peak > 0.5 and len(pixels) > 0
            # Brightness jitter is +-10 % (<= 25 levels); partial coverage mixes in background.
            err = np.abs(pixels - peak * np.asarray(COLOURS[obj.colour], float)).max()
            assert err <= 26 + (1 - peak) * 40, (scene.caption, err)
        background = img[~covered]
        assert background.max() <= 40 and background.mean() < 30
        assert background.std() > 2  # noisy, not flat


# ---------------------------------------------------------------------------- labels


def test_class_names_and_prompts_counts() -> None:
    assert class_names("shape") == list(SHAPES)
    assert class_names("colour") == list(COLOURS)
    objects = class_names("object")
    assert len(objects) == 35 and objects[0] == "red circle" and objects[6] == "green square"
    for task, count in [("shape", 14), ("colour", 10), ("object", 2)]:
        for name in class_names(task):
            p = prompts(task, name)
            assert len(p) == len(set(p)) == count
            assert all(CAPTION_RE.match(t) for t in p)
    assert prompts("object", "blue star") == ["a small blue star", "a large blue star"]


@pytest.mark.parametrize("split", ["val", "novel"])
def test_labels_round_trip_with_prompts(split: str) -> None:
    ds = one_object_eval_set(split, size=200, seed=9, image_size=32)
    assert ds.two_object_fraction == 0.0
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert len(scene.objects) == 1
        for task in ("shape", "colour", "object"):
            label = label_of(scene, task)
            assert scene.caption in prompts(task, class_names(task)[label])
            # ...and in no other class's prompts: the labels are unambiguous.
            others = [n for k, n in enumerate(class_names(task)) if k != label]
            assert all(scene.caption not in prompts(task, n) for n in others)


def test_label_of_rejects_two_object_scene() -> None:
    ds = SyntheticScenes("train", size=10, two_object_fraction=1.0)
    with pytest.raises(ValueError, match="one-object"):
        label_of(ds.scene(0), "shape")


# ---------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"split": "test"}, "'test'"),
        ({"size": 0}, "size.*0"),
        ({"seed": -1}, "seed.*-1"),
        ({"image_size": 8}, "image_size.*8"),
        ({"two_object_fraction": 1.5}, "two_object_fraction.*1.5"),
        ({"two_object_fraction": -0.1}, "two_object_fraction.*-0.1"),
    ],
)
def test_bad_dataset_arguments(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        SyntheticScenes(**kwargs)


def test_bad_split_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="train.*val.*novel"):
        SyntheticScenes("test")


def test_bad_label_arguments_and_index() -> None:
    with pytest.raises(ValueError, match="'color'"):
        class_names("color")
    with pytest.raises(ValueError, match="'pink'"):
        prompts("colour", "pink")
    with pytest.raises(ValueError, match="'size'"):
        label_of(one_object_eval_set("val", 1, 0).scene(0), "size")
    ds = SyntheticScenes(size=5)
    with pytest.raises(IndexError, match="5"):
        ds[5]
    assert len([sample for sample in ds]) == 5  # plain iteration stops at IndexError


def test_module_is_pure_numpy() -> None:
    """The module file itself imports no torch/PIL (loaded directly, bypassing the package)."""
    import subprocess
    import sys
    from pathlib import Path

    import clipft.data.synthetic as module

    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('synthetic_alone', {module.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['synthetic_alone'] = mod\n"  # dataclasses resolve their module by name
        "spec.loader.exec_module(mod)\n"
        "mod.SyntheticScenes()[0]\n"
        "print(sorted(m for m in ('torch', 'PIL') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(module.__file__).parent, check=True)
    assert out.stdout.strip() == "[]"
