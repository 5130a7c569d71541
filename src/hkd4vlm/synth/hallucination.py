"""Hallucination-detection records: a caption of 2-5 statements about a scene with exactly one
hallucinated statement, and four option phrases taken from it (three grounded, one hallucinated).

No text shortcut, by construction: every record has the same four kinds of phrase (two existence
phrases, a relation, a count) and the hallucinated one is each of them equally often; numbers, relation words and sizes are drawn
before the scene, the same way for grounded and hallucinated phrases, and the scene is then built to
serve the plan (a plan is never dropped for being hard to realise, which would skew the phrases); an object named by an existence
phrase or a counted category is named by no other phrase, and no pair of objects is related twice, so
the caption never contradicts itself.
"""

from __future__ import annotations

import random
from typing import cast

from ..data.records import LETTERS, Choice, Record
from ..data.tasks import SYSTEM1_QUESTIONS, SYSTEM2_QUESTIONS
from .levels import Level
from .phrases import Count, Exist, Phrase, Relation, phrase_truth
from .scene import COLOURS, OPPOSITE, RELATIONS, SHAPES, SIZES, Scene, relation_holds, sample_scene

HALLUCINATION_TYPES = ("absent_object", "wrong_attribute", "wrong_relation", "wrong_count")
#: the kind of phrase each hallucination type produces
KIND_OF_TYPE = {
    "absent_object": "exist",
    "wrong_attribute": "exist",
    "wrong_relation": "relation",
    "wrong_count": "count",
}
#: the kinds of the four options of every record: one of them lies, as often as its share here
PHRASE_KINDS = ("exist", "exist", "relation", "count")

FRAMES = ("I can see", "The image shows", "We can see", "The picture shows")
FILLERS = ("It is a simple drawing of flat shapes.", "The picture contains only geometric shapes.")


class _Infeasible(Exception):
    pass


#: scenes never hold more objects than this, whatever a plan asks for
MAX_OBJECTS = 6


def _plan(rng: random.Random, htype: str) -> list[tuple[str, dict]]:
    """Phrase slots: (kind, drawn parameters); slot 0 is the hallucinated one.

    Every record has the same four kinds (PHRASE_KINDS) and the hallucination types are balanced,
    so each slot is the hallucinated one equally often, whatever its kind.
    """
    kinds = list(PHRASE_KINDS)
    kinds.remove(KIND_OF_TYPE[htype])
    rng.shuffle(kinds)
    kinds.insert(0, KIND_OF_TYPE[htype])
    slots = []
    for i, kind in enumerate(kinds):
        if kind == "count":
            # stated counts are 1 or 2 and a wrong count is off by one, so that every plan fits in
            # MAX_OBJECTS objects without dropping any (dropping would skew grounded vs hallucinated)
            n = rng.randint(1, 2)
            by = rng.choice(("shape", "colour"))
            true_n = n if i else 3 - n
            params = {
                "n": n,
                "by": by,
                "true_n": true_n,
                "value": rng.choice(SHAPES if by == "shape" else tuple(COLOURS)),
            }
        elif kind == "relation":
            params = {"rel": rng.choice(RELATIONS)}
        else:
            params = {"size": rng.choice(SIZES)}
        slots.append((kind, params))
    return slots


def _scene_for(rng: random.Random, level: Level, slots: list[tuple[str, dict]]) -> Scene:
    """A scene whose counted category (if any) holds exactly the planned number of objects."""
    fixed: tuple[tuple[str, str], ...] = ()
    avoid_shapes: frozenset[str] = frozenset()
    avoid_colours: frozenset[str] = frozenset()
    needed = sum(1 for kind, _ in slots if kind == "exist")
    n_rel = sum(1 for kind, _ in slots if kind == "relation")
    needed += n_rel + 1 if n_rel else 0
    for kind, params in slots:
        if kind != "count":
            continue
        m, v = params["true_n"], params["value"]
        if params["by"] == "shape":
            fixed = tuple((c, v) for c in rng.sample(list(COLOURS), m))
            avoid_shapes = frozenset({v})
        else:
            fixed = tuple((v, s) for s in rng.sample(SHAPES, m))
            avoid_colours = frozenset({v})
        needed += m
    n = max(rng.randint(*level.n_objects), min(needed, MAX_OBJECTS))
    return sample_scene(rng, level, n, fixed=fixed, avoid_shapes=avoid_shapes, avoid_colours=avoid_colours)


def _realise(rng: random.Random, scene: Scene, slots: list[tuple[str, dict]], htype: str) -> list[Phrase]:
    """Concrete phrases for the slots in this scene, or _Infeasible."""
    exist_keys: set[tuple[str, str]] = set()  # objects named by exist phrases: named nowhere else
    rel_keys: set[tuple[str, str]] = set()  # objects in relations: may recur in other relations
    rel_pairs: set[frozenset] = set()  # ... but never the same pair twice
    counted_shapes = {p["value"] for k, p in slots if k == "count" and p["by"] == "shape"}
    counted_colours = {p["value"] for k, p in slots if k == "count" and p["by"] == "colour"}

    def free(colour: str, shape: str, *, for_relation: bool = False) -> bool:
        taken = exist_keys if for_relation else exist_keys | rel_keys
        return (colour, shape) not in taken and shape not in counted_shapes and colour not in counted_colours

    order = sorted(range(4), key=lambda i: {"count": 0, "relation": 1, "exist": 2}[slots[i][0]])
    phrases: list[Phrase | None] = [None] * 4
    for i in order:
        kind, params = slots[i]
        lie = i == 0
        if kind == "count":
            phrases[i] = Count(params["n"], params["by"], params["value"])
        elif kind == "relation":
            rel = params["rel"] if not lie else OPPOSITE[params["rel"]]
            pairs = [
                (a, b)
                for a in scene.objects
                for b in scene.objects
                if a is not b
                and free(*a.key, for_relation=True)
                and free(*b.key, for_relation=True)
                and frozenset((a.key, b.key)) not in rel_pairs
                and relation_holds(a, b, rel)
            ]
            if pairs:
                a, b = rng.choice(pairs)
                phrases[i] = Relation(a.colour, a.shape, params["rel"], b.colour, b.shape)
                rel_keys.update({a.key, b.key})
                rel_pairs.add(frozenset((a.key, b.key)))
        elif not lie:
            objs = [o for o in scene.objects if free(*o.key) and o.size == params["size"]]
            if objs:
                o = rng.choice(objs)
                phrases[i] = Exist(o.size, o.colour, o.shape)
                exist_keys.add(o.key)
        elif htype == "absent_object":
            present = {o.shape for o in scene.objects}
            options = [(c, s) for c in COLOURS for s in SHAPES if s not in present and free(c, s)]
            if options:
                c, s = rng.choice(options)
                phrases[i] = Exist(params["size"], c, s)
                exist_keys.add((c, s))
        else:  # wrong attribute: a real object with one attribute changed
            candidates = []
            for o in scene.objects:
                if not free(*o.key):
                    continue
                if o.size != params["size"]:  # the stated size is the wrong one
                    candidates.append((o, Exist(params["size"], o.colour, o.shape)))
                    continue
                for c in COLOURS:
                    if c != o.colour and free(c, o.shape) and not scene.find(c, o.shape):
                        candidates.append((o, Exist(o.size, c, o.shape)))
                for s in SHAPES:
                    if s != o.shape and free(o.colour, s) and not scene.find(o.colour, s):
                        candidates.append((o, Exist(o.size, o.colour, s)))
            if candidates:
                o, phrase = rng.choice(candidates)
                phrases[i] = phrase
                exist_keys.update({o.key, (phrase.colour, phrase.shape)})
        if phrases[i] is None:
            raise _Infeasible
    done = cast(list[Phrase], phrases)  # every slot is filled (an empty one raised _Infeasible above)
    texts = [p.text() for p in done]
    if len(set(texts)) < 4:
        raise _Infeasible
    return done


def _article(p: Phrase) -> str:
    return p.text() if isinstance(p, Count) else f"a {p.text()}"


def _sentence(rng: random.Random, level: Level, group: list[Phrase]) -> str:
    plural = isinstance(group[0], Count) and group[0].n > 1
    frame = rng.choice(FRAMES) if rng.random() < level.paraphrase else ("There are" if plural else "There is")
    return f"{frame} {' and '.join(_article(p) for p in group)}."


def caption(rng: random.Random, level: Level, phrases: list[Phrase]) -> str:
    """2-5 statements carrying the phrases (in random order), sometimes with a true filler statement."""
    order = list(phrases)
    rng.shuffle(order)
    groups: list[list[Phrase]] = []
    if level.group_sentences:
        sizes = rng.choice([(2, 2), (2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 1, 1, 1)])
    else:
        sizes = (1, 1, 1, 1)
    k = 0
    for s in sizes:
        groups.append(order[k : k + s])
        k += s
    sentences = [_sentence(rng, level, g) for g in groups]
    if rng.random() < level.filler:
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(FILLERS))
    return " ".join(sentences)


def make_record(rng: random.Random, level: Level, image_id: str, htype: str, letter: int) -> tuple[Record, Scene]:
    """One record whose hallucinated option sits at ``letter`` (0-3)."""
    slots = _plan(rng, htype)
    for _ in range(2000):
        scene = _scene_for(rng, level, slots)
        try:
            phrases = _realise(rng, scene, slots, htype)
            break
        except _Infeasible:
            continue
    else:  # pragma: no cover - a plan that no scene serves means the generator itself is broken
        raise RuntimeError(f"could not realise a {htype} record at level {level.name}")
    # the oracle must agree with the generator; a mismatch is a bug, not data
    truths = [phrase_truth(p, scene) for p in phrases]
    assert truths == [False, True, True, True], (truths, phrases)
    grounded = phrases[1:]
    rng.shuffle(grounded)
    options = grounded[:letter] + [phrases[0]] + grounded[letter:]
    choices = [Choice(LETTERS[j], p.text()) for j, p in enumerate(options)]
    record = Record(
        task="hallucination",
        image_id=image_id,
        system1_question=rng.choice(SYSTEM1_QUESTIONS) if level.paraphrase else SYSTEM1_QUESTIONS[0],
        system1_answer=caption(rng, level, phrases),
        system2_question=rng.choice(SYSTEM2_QUESTIONS) if level.paraphrase else SYSTEM2_QUESTIONS[0],
        choices=choices,
        correct_answer=choices[letter].choice,
        correct_choice=LETTERS[letter],
        extra={"synth": {"level": level.name, "hallucination_type": htype, "scene": scene.to_dict()}},
    )
    return record, scene
