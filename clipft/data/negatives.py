"""Negative captions without a language model: one rule per type of the SugarCrepe taxonomy.

Hsieh et al. (NeurIPS 2023, SugarCrepe) sort hard negatives into REPLACE (obj, att, rel),
SWAP (obj, att) and ADD (obj, att); NegCLIP (Yuksekgonul et al., ICLR 2023) trains with
swapped captions as extra negatives. Each function here makes one negative of one type, or
returns None when the type does not apply to the caption (never a faked negative), and every
negative differs from its caption.

The rules read a caption as noun phrases — a determiner, known attribute words (colour,
size, material, count) and a head noun — joined by other words, among them known spatial
relations. On the synthetic data's captions ("a small red circle to the left of a large blue
square") every word is known, so the rules are exact; on free English they are light: closed
word lists, and a head noun is the word after a determiner and its attributes. ``shuffle``
(ARO's order perturbation) is for evaluation only and not among the training types.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from clipft.config import NEGATIVE_TYPES
from clipft.data.synthetic import COLOURS as SYNTHETIC_COLOURS
from clipft.data.synthetic import RELATIONS as SYNTHETIC_RELATIONS
from clipft.data.synthetic import HELD_OUT_COMBOS, SHAPES, SIZES

TRAIN_TYPES = NEGATIVE_TYPES  # the types a training pair's negatives are drawn from

COLOURS = tuple(dict.fromkeys([*SYNTHETIC_COLOURS, "black", "white", "grey", "gray", "brown", "pink", "cyan"]))
SIZE_OPPOSITES = {"small": "large", "large": "small", "big": "small", "little": "big", "tiny": "huge",
                  "huge": "tiny", "tall": "short", "short": "tall", "long": "short"}
MATERIALS = ("wooden", "metal", "plastic", "glass", "stone", "leather", "paper", "brick")
COUNTS = ("two", "three", "four", "five", "six")
ATTRIBUTES = {"colour": COLOURS, "size": tuple(SIZE_OPPOSITES), "material": MATERIALS}
RELATION_OPPOSITES = {
    "to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above",
    "in front of": "behind", "behind": "in front of", "on top of": "underneath", "underneath": "on top of",
    "inside": "outside", "outside": "inside", "under": "over", "over": "under",
}
# co-hyponyms: a replaced object comes from its own group
NOUN_GROUPS = (
    SHAPES,
    ("dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "zebra", "giraffe", "bear"),
    ("car", "bus", "truck", "bicycle", "motorcycle", "train", "boat", "airplane"),
    ("man", "woman", "boy", "girl", "child", "person"),
    ("chair", "couch", "bed", "table", "bench", "desk"),
    ("pizza", "sandwich", "cake", "banana", "apple", "donut", "broccoli", "carrot"),
    ("cup", "bottle", "bowl", "plate", "vase", "glass"),
)
DETERMINERS = ("a", "an", "the", "this", "that", "his", "her", "their", "its", "one", *COUNTS)
_NOT_NOUNS = frozenset(["and", "or", "with", "of", "to", "in", "on", "at", "is", "are", "next", "near", "by"])


@dataclass
class NounPhrase:
    start: int  # index of the determiner
    head: int  # index of the head noun
    attributes: dict[str, int] = field(default_factory=dict)  # category -> token index


@dataclass
class Parsed:
    words: list[str]
    phrases: list[NounPhrase]
    relations: list[tuple[int, int, str]]  # (start, stop, phrase)
    period: bool

    def text(self, words: Optional[list[str]] = None) -> str:
        out = " ".join(_fix_articles(words if words is not None else self.words))
        return out + ("." if self.period else "")


def _category(word: str) -> Optional[str]:
    return next((c for c, words in ATTRIBUTES.items() if word.lower() in words), None)


def parse(caption: str) -> Parsed:
    text = caption.strip()
    period = text.endswith(".")
    words = text.rstrip(".").split()
    lower = [w.lower() for w in words]
    phrases, relations = [], []
    i = 0
    while i < len(words):
        relation = next((r for r in sorted(RELATION_OPPOSITES, key=len, reverse=True)
                         if lower[i:i + len(r.split())] == r.split()), None)
        if relation is not None:
            relations.append((i, i + len(relation.split()), relation))
            i += len(relation.split())
            continue
        if lower[i] in DETERMINERS:
            j, attributes = i + 1, {}
            while j < len(words) and _category(words[j]) and _category(words[j]) not in attributes:
                attributes[_category(words[j])] = j  # type: ignore[index]
                j += 1
            if j < len(words) and words[j].isalpha() and lower[j] not in _NOT_NOUNS and not _category(words[j]):
                phrases.append(NounPhrase(i, j, attributes))
                i = j + 1
                continue
        i += 1
    return Parsed(words, phrases, relations, period)


def _fix_articles(words: list[str]) -> list[str]:
    out = list(words)
    for i, word in enumerate(out[:-1]):
        if word.lower() in ("a", "an"):
            article = "an" if out[i + 1][0].lower() in "aeiou" else "a"
            out[i] = article.capitalize() if word[0].isupper() else article
    return out


def _with(words: list[str], index: int, new: str) -> list[str]:
    out = list(words)
    out[index] = new.capitalize() if words[index][0].isupper() else new
    return out


def _group(noun: str) -> Optional[tuple[str, ...]]:
    return next((g for g in NOUN_GROUPS if noun.lower() in g), None)


def _is_synthetic(parsed: Parsed) -> bool:
    return bool(parsed.phrases) and all(
        parsed.words[p.head].lower() in SHAPES and {"colour", "size"} <= set(p.attributes) for p in parsed.phrases
    )


def _colours(parsed: Parsed) -> tuple[str, ...]:
    """Colours a replacement may use: the synthetic data's own for its captions."""
    return tuple(SYNTHETIC_COLOURS) if _is_synthetic(parsed) else COLOURS


def _names_held_out_combination(parsed: Parsed) -> bool:
    """A synthetic negative must not name a (colour, shape) held out of training: it would
    teach the novel combinations that zero-shot evaluation keeps unseen."""
    return any(
        (parsed.words[p.attributes["colour"]].lower(), parsed.words[p.head].lower()) in HELD_OUT_COMBOS
        for p in parsed.phrases if "colour" in p.attributes
    )


# ------------------------------------------------------------------ one function per type


def swap_obj(parsed: Parsed, rng: random.Random) -> Optional[list[str]]:
    """Two noun phrases exchange their head nouns."""
    pairs = [(a, b) for a in parsed.phrases for b in parsed.phrases
             if a.head < b.head and parsed.words[a.head].lower() != parsed.words[b.head].lower()]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    words = _with(parsed.words, a.head, parsed.words[b.head].lower())
    return _with(words, b.head, parsed.words[a.head].lower())


def swap_att(parsed: Parsed, rng: random.Random) -> Optional[list[str]]:
    """Two noun phrases exchange their attributes of one category (colour first)."""
    for category in ATTRIBUTES:
        holders = [p for p in parsed.phrases if category in p.attributes]
        pairs = [(a, b) for a in holders for b in holders if a.head < b.head
                 and parsed.words[a.attributes[category]].lower() != parsed.words[b.attributes[category]].lower()]
        if pairs:
            a, b = rng.choice(pairs)
            i, j = a.attributes[category], b.attributes[category]
            return _with(_with(parsed.words, i, parsed.words[j].lower()), j, parsed.words[i].lower())
    return None


def replace_obj(parsed: Parsed, rng: random.Random) -> Optional[list[str]]:
    """A head noun becomes another of its group (circle -> star, dog -> cat) not in the caption."""
    present = {w.lower() for w in parsed.words}
    options = [(p, n) for p in parsed.phrases if (g := _group(parsed.words[p.head])) for n in g if n not in present]
    if not options:
        return None
    phrase, noun = rng.choice(options)
    return _with(parsed.words, phrase.head, noun)


def replace_att(parsed: Parsed, rng: random.Random) -> Optional[list[str]]:
    """An attribute becomes another of its category: a colour not in the caption, the
    opposite size, another material."""
    present = {w.lower() for w in parsed.words}
    options = []
    for phrase in parsed.phrases:
        for category, index in phrase.attributes.items():
            word = parsed.words[index].lower()
            if category == "size":
                options.append((index, SIZE_OPPOSITES[word]))
            else:
                pool = _colours(parsed) if category == "colour" else ATTRIBUTES[category]
                options += [(index, w) for w in pool if w not in present]
    if not options:
        return None
    return _with(parsed.words, *rng.choice(options))


def replace_rel(parsed: Parsed, rng: random.Random) -> Optional[list[str]]:
    """A spatial relation becomes its opposite (left <-> right, above <-> below, ...)."""
    if not parsed.relations:
        return None
    start, stop, relation = rng.choice(parsed.relations)
    return parsed.words[:start] + RELATION_OPPOSITES[relation].split() + parsed.words[stop:]


def add_obj(parsed: Parsed, rng: random.Random) -> Optional[list[str]]:
    """An object the image does not show is added. A one-object synthetic caption gains a
    second object in the data's own grammar; other captions gain "and a <noun>" after their
    first noun phrase (a noun of the same group, not in the caption)."""
    if not parsed.phrases:
        return None
    present = {w.lower() for w in parsed.words}
    if _is_synthetic(parsed):
        if len(parsed.phrases) != 1:
            return None
        extra = f"a {rng.choice(SIZES)} {rng.choice(list(SYNTHETIC_COLOURS))} {rng.choice([s for s in SHAPES if s not in present])}"
        return parsed.words + rng.choice(SYNTHETIC_RELATIONS).split() + extra.split()
    first = parsed.phrases[0]
    group = _group(parsed.words[first.head])
    nouns = [n for n in (group or ()) if n not in present]
    if not nouns:
        return None
    return parsed.words[:first.head + 1] + ["and", "a", rng.choice(nouns)] + parsed.words[first.head + 1:]


def add_att(parsed: Parsed, rng: random.Random) -> Optional[list[str]]:
    """A colour is given to a noun phrase that has none (not to people), in English order:
    after a size, before a material ("a glass vase" -> "a pink glass vase")."""
    people = NOUN_GROUPS[3]
    bare = [p for p in parsed.phrases if "colour" not in p.attributes and parsed.words[p.head].lower() not in people]
    if not bare:
        return None
    phrase = rng.choice(bare)
    present = {w.lower() for w in parsed.words}
    colour = rng.choice([c for c in _colours(parsed) if c not in present])
    at = phrase.attributes["size"] + 1 if "size" in phrase.attributes else phrase.start + 1
    return parsed.words[:at] + [colour] + parsed.words[at:]


def shuffle(parsed: Parsed, rng: random.Random) -> Optional[list[str]]:
    """ARO's order perturbation: nouns and attributes shuffled among their positions (for
    evaluation, not training)."""
    slots = sorted({p.head for p in parsed.phrases} | {i for p in parsed.phrases for i in p.attributes.values()})
    if len({parsed.words[i].lower() for i in slots}) < 2:
        return None
    for _ in range(10):
        order = rng.sample(slots, len(slots))
        words = list(parsed.words)
        for target, source in zip(slots, order):
            words[target] = parsed.words[source]
        if [w.lower() for w in words] != [w.lower() for w in parsed.words]:
            return words
    return None


RULES: dict[str, Callable[[Parsed, random.Random], Optional[list[str]]]] = {
    "swap_obj": swap_obj, "swap_att": swap_att, "replace_obj": replace_obj, "replace_att": replace_att,
    "replace_rel": replace_rel, "add_obj": add_obj, "add_att": add_att, "shuffle": shuffle,
}


def make_negative(caption: str, kind: str, rng: random.Random) -> Optional[str]:
    """One negative of type ``kind``, or None when the type does not apply."""
    if kind not in RULES:
        raise ValueError(f"unknown negative type {kind!r} (known: {', '.join(RULES)})")
    parsed = parse(caption)
    for _ in range(8):  # a synthetic negative naming a held-out combination is drawn again
        words = RULES[kind](parsed, rng)
        if words is None:
            return None
        negative = parsed.text(words)
        if _is_synthetic(parsed) and _names_held_out_combination(parse(negative)):
            continue
        return negative if _normal(negative) != _normal(caption) else None
    return None


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().rstrip(".").lower())


def negatives(caption: str, count: int, rng: random.Random, types: tuple[str, ...] = TRAIN_TYPES) -> list[tuple[str, str]]:
    """Up to ``count`` distinct (type, negative) of different types, in random type order;
    fewer when fewer types apply."""
    out: list[tuple[str, str]] = []
    for kind in rng.sample(list(types), len(types)):
        negative = make_negative(caption, kind, rng)
        if negative is not None and negative not in {n for _, n in out}:
            out.append((kind, negative))
            if len(out) == count:
                break
    return out
