"""The rule-based negative captions: each type on fixed captions (expected negatives spelled
out), on synthetic captions of every scene kind, and where a type does not apply."""

from __future__ import annotations

import random

import pytest

from clipft.data.negatives import RULES, TRAIN_TYPES, make_negative, negatives, parse
from clipft.data.synthetic import HELD_OUT_COMBOS, RELATIONS, SyntheticScenes

TWO = "a small red circle to the left of a large blue square"


@pytest.mark.parametrize("kind,caption,expected", [
    ("swap_obj", TWO, "a small red square to the left of a large blue circle"),
    ("swap_att", TWO, "a small blue circle to the left of a large red square"),
    ("replace_rel", TWO, "a small red circle to the right of a large blue square"),
    ("replace_rel", "a red car in front of a white bus", "a red car behind a white bus"),
    ("swap_obj", "A man riding a brown horse.", "A horse riding a brown man."),
    ("swap_att", "a wooden table with a glass vase", "a glass table with a wooden vase"),
    ("replace_att", "a large dog", "a small dog"),  # a size: its opposite is the only option
])
def test_each_type_on_fixed_captions(kind: str, caption: str, expected: str) -> None:
    assert make_negative(caption, kind, random.Random(0)) == expected


def test_choices_follow_the_rules() -> None:
    for seed in range(20):
        rng = random.Random(seed)
        # a colour for the one colourless phrase that is not a person, after its size and
        # before its material
        words = make_negative("a man holding a big glass vase", "add_att", rng).split()
        assert words[:5] == ["a", "man", "holding", "a", "big"] and words[6:] == ["glass", "vase"]
        assert words[5] not in ("big", "glass", "vase")
        # another object of the same group, with the article fixed ("a" -> "an")
        negative = make_negative("a dog on a bench", "replace_obj", rng)
        assert negative.split()[1] in ("cat", "horse", "cow", "sheep", "bird", "elephant", "zebra", "giraffe", "bear", "dog") \
            or negative.split()[-1] in ("chair", "couch", "bed", "table", "desk")
    assert make_negative("a dog", "replace_obj", random.Random(4)) in {
        f"{'an' if n[0] in 'aeiou' else 'a'} {n}" for n in ("cat", "horse", "cow", "sheep", "bird", "elephant", "zebra", "giraffe", "bear")
    }
    assert parse("an orange cat").phrases[0].attributes == {"colour": 1}


@pytest.mark.parametrize("kind,caption", [
    ("swap_obj", "a large green star"),  # one object
    ("swap_att", "a red car next to a red bus"),  # the same colour
    ("replace_rel", "a man riding a horse"),  # no spatial relation
    ("replace_obj", "a spaceship over a nebula"),  # nouns outside the closed lists
    ("add_obj", TWO),  # a synthetic caption already has its two objects
    ("add_att", TWO),  # every phrase has a colour
    ("add_att", "a man riding a red horse"),  # people get no colour
])
def test_types_that_do_not_apply_are_skipped(kind: str, caption: str) -> None:
    assert make_negative(caption, kind, random.Random(0)) is None


def test_synthetic_captions_of_every_scene_kind() -> None:
    """Exact rules on the data's grammar: every negative differs from its caption, stays in the
    synthetic vocabulary and grammar, never names a held-out (colour, shape), and every type
    applies where the scene allows it."""
    scenes = SyntheticScenes("train", 300, seed=3)
    applied = {kind: 0 for kind in TRAIN_TYPES}
    for index in range(300):
        scene = scenes.scene(index)
        caption = scene.caption
        for kind in TRAIN_TYPES:
            negative = make_negative(caption, kind, random.Random(index))
            two = len(scene.objects) == 2
            if kind in ("swap_obj", "swap_att", "replace_rel") and not two:
                assert negative is None
            if kind == "add_obj" and two or kind == "add_att":
                assert negative is None, (kind, caption)
            if negative is None:
                continue
            applied[kind] += 1
            assert negative != caption
            parsed = parse(negative)
            assert len(parsed.phrases) == (2 if two or kind == "add_obj" else 1)
            for phrase in parsed.phrases:
                colour = parsed.words[phrase.attributes["colour"]]
                assert (colour, parsed.words[phrase.head]) not in HELD_OUT_COMBOS
            if two or kind == "add_obj":
                assert [r for _, _, r in parsed.relations][0] in RELATIONS
    assert applied["replace_obj"] == applied["replace_att"] == 300
    assert applied["replace_rel"] > 100 and applied["add_obj"] > 50
    assert applied["swap_obj"] > 50 and applied["swap_att"] > 50


def test_negatives_are_distinct_types_and_deterministic() -> None:
    first = negatives(TWO, 3, random.Random(5))
    assert first == negatives(TWO, 3, random.Random(5))
    assert len(first) == 3 and len({k for k, _ in first}) == 3 and len({n for _, n in first}) == 3
    assert negatives("spaceships and nebulae", 4, random.Random(0)) == []  # no noun phrase, no relation
    assert set(RULES) == set(TRAIN_TYPES) | {"shuffle"}
    with pytest.raises(ValueError, match="unknown negative type"):
        make_negative(TWO, "negate", random.Random(0))
