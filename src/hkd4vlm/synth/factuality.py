"""Fact-checking records: a context that says who drew the shapes of each colour (information the
image does not carry), a claim about who drew one shape, and four verdicts.

The verdict always needs the image: the claim names a shape, the context names colours, and only the
picture says which colour that shape has (or that there is no such shape). For a fixed text every
verdict is possible, so a text-only model stays at chance:

- True: the shape is there, and the context credits its colour to the claimed person;
- False: contradicted by the image: there is no such shape;
- False: contradicted by the context: the shape is there, and its colour is credited to someone else;
- Not enough information: the shape is there, and the context says nothing about its colour.
"""

from __future__ import annotations

import random
import re

from ..data.records import LETTERS, Choice, Record
from ..data.tasks import FACT_QUESTIONS, VERDICTS
from .levels import Level
from .scene import COLOURS, SHAPES, SIZES, Scene, sample_scene

VERDICT_KEYS = ("true", "image", "context", "nei")
NAMES = ("Maria", "Tom", "Aiko", "Omar", "Lena", "Ravi", "Sofia", "Jonas", "Nadia", "Pablo", "Grace", "Ivan")
#: (present tense for "X drew ...", participle for "... was drawn by X")
VERBS = (("drew", "drawn"), ("painted", "painted"), ("made", "made"))
EXTRAS = (
    "The picture was finished in {year}.",
    "It was shown at a school exhibition in {year}.",
    "The background was prepared before any shape was added.",
    "The drawing was scanned in {year}.",
)
QUESTIONS = FACT_QUESTIONS

_C, _S, _N = "|".join(COLOURS), "|".join(SHAPES), "|".join(NAMES)
_PRESENT, _PART = "|".join(v[0] for v in VERBS), "|".join(v[1] for v in VERBS)
_ATTR_ACTIVE = re.compile(rf"\b({_N}) (?:{_PRESENT}) the ({_C}) shapes\b")
_ATTR_PASSIVE = re.compile(rf"\bThe ({_C}) shapes were (?:{_PART}) by ({_N})\b")
_CLAIM_PASSIVE = re.compile(rf"^The (?:(small|large) )?({_S}) was (?:{_PART}) by ({_N})\.$")
_CLAIM_ACTIVE = re.compile(rf"^({_N}) (?:{_PRESENT}) the (?:(small|large) )?({_S})\.$")


def attributions(context: str) -> dict[str, str]:
    """colour -> person, as the context states it."""
    out = {c: n for n, c in _ATTR_ACTIVE.findall(context)}
    out.update({c: n for c, n in _ATTR_PASSIVE.findall(context)})
    return out


def parse_claim(claim: str) -> tuple[str | None, str, str]:
    """(size or None, shape, person) of a claim; ValueError for anything else."""
    if m := _CLAIM_PASSIVE.match(claim.strip()):
        size, shape, name = m.groups()
        return size, shape, name
    if m := _CLAIM_ACTIVE.match(claim.strip()):
        name, size, shape = m.groups()
        return size, shape, name
    raise ValueError(f"not a benchmark claim: {claim!r}")


def verdict(context: str, claim: str, scene: Scene) -> str:
    """The verdict key (one of VERDICT_KEYS) for a context and claim, given the scene."""
    size, shape, name = parse_claim(claim)
    found = scene.find(shape=shape, size=size)
    if not found:
        return "image"
    if len(found) > 1:
        raise ValueError(f"claim {claim!r} is ambiguous in this scene")
    credited = attributions(context).get(found[0].colour)
    if credited is None:
        return "nei"
    return "true" if credited == name else "context"


def _context(rng: random.Random, level: Level, credits: dict[str, str]) -> str:
    sentences = []
    for colour, name in credits.items():
        present, part = rng.choice(VERBS)
        if rng.random() < 0.5:
            sentences.append(f"{name} {present} the {colour} shapes.")
        else:
            sentences.append(f"The {colour} shapes were {part} by {name}.")
    if rng.random() < level.context_extra and len(sentences) < 4:
        sentences.append(rng.choice(EXTRAS).format(year=rng.randint(1995, 2024)))
    rng.shuffle(sentences)
    return " ".join(sentences)


def _claim(rng: random.Random, size: str | None, shape: str, name: str) -> str:
    ref = f"{size} {shape}" if size else shape
    present, part = rng.choice(VERBS)
    return f"The {ref} was {part} by {name}." if rng.random() < 0.5 else f"{name} {present} the {ref}."


def make_record(rng: random.Random, level: Level, image_id: str, key: str, letter: int) -> tuple[Record, Scene]:
    """One record with verdict ``key`` whose correct option sits at ``letter`` (0-3)."""
    n_credits = rng.randint(2, 3)
    for _ in range(1000):
        scene = sample_scene(rng, level)
        size = rng.choice(SIZES) if level.sized_claims else None
        by_ref: dict[tuple[str | None, str], list] = {}
        for s in SHAPES:
            for z in [size] if size else [None]:
                by_ref[(z, s)] = scene.find(shape=s, size=z)
        refs = [r for r, objs in by_ref.items() if (len(objs) == 0) == (key == "image") and len(objs) <= 1]
        if refs:
            break
    else:  # pragma: no cover
        raise RuntimeError(f"could not realise a {key} record at level {level.name}")
    size, shape = rng.choice(refs)
    names = rng.sample(NAMES, n_credits)
    colours = list(COLOURS)
    if key == "image":
        credited = rng.sample(colours, n_credits)
        name = rng.choice(names)
    else:
        colour = by_ref[(size, shape)][0].colour
        others = [c for c in colours if c != colour]
        if key == "nei":
            credited = rng.sample(others, n_credits)
            name = rng.choice(names)
        else:
            credited = [colour] + rng.sample(others, n_credits - 1)
            rng.shuffle(credited)
            owner = names[credited.index(colour)]
            name = owner if key == "true" else rng.choice([n for n in names if n != owner])
    context = _context(rng, level, dict(zip(credited, names)))
    claim = _claim(rng, size, shape, name)
    assert verdict(context, claim, scene) == key, (context, claim, key)
    others = [v for k, v in zip(VERDICT_KEYS, VERDICTS) if k != key]
    rng.shuffle(others)
    correct = VERDICTS[VERDICT_KEYS.index(key)]
    options = others[:letter] + [correct] + others[letter:]
    choices = [Choice(LETTERS[j], text) for j, text in enumerate(options)]
    record = Record(
        task="factuality",
        image_id=image_id,
        context=context,
        claim=claim,
        question=rng.choice(QUESTIONS) if level.paraphrase else QUESTIONS[0],
        choices=choices,
        correct_answer=correct,
        correct_choice=LETTERS[letter],
        extra={"synth": {"level": level.name, "verdict": key, "scene": scene.to_dict()}},
    )
    return record, scene
