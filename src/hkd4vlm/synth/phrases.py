"""Option phrases of the hallucination task: how they are written, read back and checked against a scene.

The reader (:func:`parse_phrase`) and the checker (:func:`phrase_truth`) form the benchmark's oracle:
given only a record's text and its scene, they say which option is hallucinated. Generation uses the
same functions, and tests use them to check augmentations against the ground truth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .scene import COLOURS, OPPOSITE, RELATIONS, SHAPES, SIZES, Scene, relation_holds

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
WORD_NUMBERS = {v: k for k, v in NUMBER_WORDS.items()}
PLURAL = {s: (s + "es" if s.endswith("s") else s + "s") for s in SHAPES}
SINGULAR = {v: k for k, v in PLURAL.items()}


@dataclass(frozen=True)
class Exist:
    size: str
    colour: str
    shape: str

    def text(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Relation:
    colour_a: str
    shape_a: str
    rel: str
    colour_b: str
    shape_b: str

    def text(self) -> str:
        return f"{self.colour_a} {self.shape_a} {self.rel} a {self.colour_b} {self.shape_b}"


@dataclass(frozen=True)
class Count:
    n: int
    by: str  # "shape" or "colour"
    value: str

    def text(self) -> str:
        word = NUMBER_WORDS[self.n]
        if self.by == "shape":
            return f"{word} {self.value if self.n == 1 else PLURAL[self.value]}"
        return f"{word} {self.value} {'shape' if self.n == 1 else 'shapes'}"


Phrase = Exist | Relation | Count

_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_SP = "|".join(list(SHAPES) + list(PLURAL.values()))
_EXIST = re.compile(rf"^({'|'.join(SIZES)}) ({_C}) ({_S})$")
_REL = re.compile(rf"^({_C}) ({_S}) ({'|'.join(RELATIONS)}) a ({_C}) ({_S})$")
_COUNT_SHAPE = re.compile(rf"^({'|'.join(WORD_NUMBERS)}) ({_SP})$")
_COUNT_COLOUR = re.compile(rf"^({'|'.join(WORD_NUMBERS)}) ({_C}) shapes?$")


def parse_phrase(text: str) -> Phrase:
    """Read an option phrase back into its structure; ValueError for anything else."""
    t = " ".join(text.strip().lower().split())
    if m := _EXIST.match(t):
        return Exist(*m.groups())
    if m := _REL.match(t):
        return Relation(*m.groups())
    if m := _COUNT_SHAPE.match(t):
        word, shape = m.groups()
        return Count(WORD_NUMBERS[word], "shape", SINGULAR.get(shape, shape))
    if m := _COUNT_COLOUR.match(t):
        word, colour = m.groups()
        return Count(WORD_NUMBERS[word], "colour", colour)
    raise ValueError(f"not a benchmark phrase: {text!r}")


def phrase_truth(phrase: Phrase, scene: Scene) -> bool | None:
    """True if the scene supports the phrase, False if it contradicts it, None if it is ambiguous."""
    if isinstance(phrase, Exist):
        return bool(scene.find(phrase.colour, phrase.shape, phrase.size))
    if isinstance(phrase, Count):
        found = scene.find(shape=phrase.value) if phrase.by == "shape" else scene.find(colour=phrase.value)
        return len(found) == phrase.n
    a, b = scene.find(phrase.colour_a, phrase.shape_a), scene.find(phrase.colour_b, phrase.shape_b)
    if len(a) != 1 or len(b) != 1:
        return False if not a or not b else None
    if relation_holds(a[0], b[0], phrase.rel):
        return True
    if relation_holds(a[0], b[0], OPPOSITE[phrase.rel]):
        return False
    return None


def hallucinated_options(options: list[str], scene: Scene) -> list[int]:
    """Indices of the options that the scene does not support."""
    return [i for i, text in enumerate(options) if phrase_truth(parse_phrase(text), scene) is not True]
