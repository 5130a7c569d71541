"""The lab's rungs: one skill each, as text, on freshly generated examples in the benchmark's own wording.

A rung draws an :class:`Example` from a ``random.Random``: named prompt segments (what is asked, what is
read, the scene), the answer word and the answer words it is chosen among. The segments are joined in
the order a layout names (``ask,context`` reads the question first), so the same skill can be measured
under every prompt layout. The text-only rungs stand in for the multimodal task: ``scene`` is the
image's content written out as words, so a rung that fails here cannot pass with pixels.

Rungs (chance in brackets):

- ``recall``   adjacent key-value recall over 2-3 pairs, the setup's sanity check (~0.42 among the
  pairs' values);
- ``retrieve`` "Who drew the red shapes?" over a context of 2-3 credits -> the name (~0.42 among the
  credited names); binding hops at each sentence's full stop, the asked colour where the answer is read;
- ``verdict``  a claim naming a person, a colour and a shape -> true / context / nei (1/3); as ``fact``,
  the person credited with the claimed colour at the context's last word (``name``), binding hops at the
  other full stops;
- ``verify``   a statement of the hallucination task's kinds (existence, count) checked against a
  written scene -> yes / no (1/2);
- ``colour``   "What colour is the diamond?" over a written scene -> the colour, or none (the scene
  lookup fact checking starts with; none in a fifth of the examples, 0.2);
- ``fact``     the whole fact-checking task with the scene written out: claim, context, scene -> the
  four verdicts true / image / context / nei (1/4).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..synth.factuality import NAMES, VERBS, attributions, parse_claim
from ..synth.factuality import make_record as make_fact_record
from ..synth.levels import LEVELS
from ..synth.phrases import NUMBER_WORDS, PLURAL
from ..synth.scene import COLOURS, SHAPES, SIZES, Scene, grid_cell, sample_scene

_TOKEN = re.compile(r"[A-Za-z0-9']+|[^\sA-Za-z0-9]")


def words(text: str) -> list[str]:
    """The lab's tokenisation: words, numbers and single punctuation marks."""
    return _TOKEN.findall(text)


#: the grid of image tokens a scene is placed on in the ``grid`` scene format: the LLaVA presets see a
#: 64 px image through 8 px patches, 8 x 8 tokens
GRID = 8


#: the dense kinds of intermediate target, each drawn only when asked for (``--sentence-hops``,
#: ``--binding-hops``, ``--carry-hop``); the others are an example's fixed hops
DENSE_HOPS = {
    "match": "sentence_hops",
    "bind-colour": "binding_hops",
    "bind-name": "binding_hops",
    "carry": "carry_hop",
}
#: the dense kinds at the context's full stops but the last, among the same words: an untrained one beside a
#: trained one would only read the trained one's answer (``carry`` sits at the last word or where the answer is
#: read, among colours)
AT_STOPS = frozenset({"match", "bind-colour", "bind-name"})
#: the segment name of a hop at the position the answer is read at (the cue's last token, or without the cue
#: the last segment's last word)
ANSWER = "answer"


@dataclass(frozen=True)
class Hop:
    """An intermediate target (``--hop-weight``): at word ``index`` of segment ``segment`` (negative: from its
    end), the word ``answer`` among ``answers``. One hop of a composed answer, supervised where it happens;
    ``kind`` names which (its accuracy is reported per kind)."""

    segment: str
    index: int
    answer: str
    answers: tuple[str, ...]
    kind: str

    @property
    def dense(self) -> bool:
        return self.kind in DENSE_HOPS


@dataclass(frozen=True)
class Example:
    """One rung example: prompt segments by name, the answer word and the answer words to choose among;
    ``objects`` are the scene's objects with the grid cell of their centre, ``(size, colour, shape, cell)``;
    ``hops`` the intermediate targets of a composed answer."""

    segments: dict[str, str]
    answer: str
    answers: tuple[str, ...]
    objects: tuple[tuple[str, str, str, int], ...] = ()
    hops: tuple[Hop, ...] = ()

    def prompt(self, layout: tuple[str, ...], cue: bool = True) -> str:
        """The segments in ``layout``'s order, then the answer cue (without it the answer is read at the
        last segment's last token)."""
        return " ".join(self.segments[name] for name in layout) + (" Answer :" if cue else "")


@dataclass(frozen=True)
class Rung:
    name: str
    draw: Callable[[random.Random], Example]
    layouts: dict[str, tuple[str, ...]]  # layout name -> segment order; the first is the ask-first default
    chance: float
    doc: str

    @property
    def segments(self) -> tuple[str, ...]:
        """The segment names every example has (each layout orders all of them)."""
        return next(iter(self.layouts.values()))


def _credit_sentence(rng: random.Random, colour: str, name: str) -> str:
    present, part = rng.choice(VERBS)
    if rng.random() < 0.5:
        return f"{name} {present} the {colour} shapes ."
    return f"The {colour} shapes were {part} by {name} ."


def _context(rng: random.Random, credits: dict[str, str]) -> str:
    sentences = [_credit_sentence(rng, c, n) for c, n in credits.items()]
    if rng.random() < 0.3:
        sentences.append(f"The drawing was scanned in {rng.randint(1995, 2024)} .")
    rng.shuffle(sentences)
    return "Context : " + " ".join(sentences)


def _credits(rng: random.Random) -> tuple[dict[str, str], list[str]]:
    """2-3 colour -> name credits, and one more colour that nobody is credited with."""
    n = rng.randint(2, 3)
    colours = rng.sample(list(COLOURS), n + 1)
    return dict(zip(colours[:n], rng.sample(NAMES, n))), colours


def draw_recall(rng: random.Random) -> Example:
    n = rng.randint(2, 3)
    keys = rng.sample([f"k{i}" for i in range(8)], n)
    values = rng.sample([f"v{i}" for i in range(12)], n)
    asked = rng.randrange(n)
    pairs = " ".join(f"{k} {v} ." for k, v in zip(keys, values))
    return Example(
        {"ask": f"Question : {keys[asked]}", "context": f"Context : {pairs}"},
        values[asked],
        tuple(f"v{i}" for i in range(12)),
    )


def _sentence_stops(context: str) -> list[tuple[int, str]]:
    """(index of its full stop among the segment's words, the sentence) for each sentence of a context
    segment ("Context : ...")."""
    out, start = [], 2  # after "Context :"
    ws = words(context)
    for end, word in enumerate(ws):
        if word == ".":
            out.append((end, " ".join(ws[start:end]) + "."))
            start = end + 1
    return out


def _binding(index: int, credit: dict[str, str]) -> tuple[Hop, Hop]:
    """What a context sentence says (``credit``: its ``attributions``), at its full stop: its colour and its
    person (none and nobody for a sentence that credits no one)."""
    [(colour, name)] = credit.items() or [("none", "nobody")]
    return (
        Hop("context", index, colour, (*COLOURS, "none"), "bind-colour"),
        Hop("context", index, name, (*NAMES, "nobody"), "bind-name"),
    )


def draw_retrieve(rng: random.Random) -> Example:
    """Also the binding hops (``bind-colour``, ``bind-name``): what each sentence says, at its full stop; and
    the asked colour where the answer is read (``carry``: what the name is looked up by, carried to the
    position that looks it up, among the colour words where the answer's are names)."""
    credits, _ = _credits(rng)
    colour = rng.choice(list(credits))
    context = _context(rng, credits)
    return Example(
        {"ask": f"Question : Who drew the {colour} shapes ?", "context": context},
        credits[colour],
        NAMES,
        hops=tuple(h for index, sentence in _sentence_stops(context) for h in _binding(index, attributions(sentence)))
        + (Hop(ANSWER, -1, colour, tuple(COLOURS), "carry"),),
    )


def draw_verdict(rng: random.Random) -> Example:
    credits, colours = _credits(rng)
    key = rng.choice(("true", "context", "nei"))
    names = list(credits.values())
    if key == "nei":
        colour, name = colours[-1], rng.choice(names)
    else:
        colour = rng.choice(list(credits))
        owner = credits[colour]
        name = owner if key == "true" else rng.choice([n for n in names if n != owner])
    present, part = rng.choice(VERBS)
    shape = rng.choice(SHAPES)
    claim = (
        f"{name} {present} the {colour} {shape} ."
        if rng.random() < 0.5
        else f"The {colour} {shape} was {part} by {name} ."
    )
    context = _context(rng, credits)
    stops = _sentence_stops(context)
    # as fact's: the person credited with the claimed colour at the last full stop, binding at the others
    hops = (Hop("context", -1, credits.get(colour, "nobody"), (*NAMES, "nobody"), "name"),)
    return Example(
        {"ask": f"Claim : {claim}", "context": context},
        key,
        ("true", "context", "nei"),
        hops=hops + tuple(h for index, sentence in stops[:-1] for h in _binding(index, attributions(sentence))),
    )


def scene_text(scene: Scene) -> str:
    """The scene's objects written out in the order the renderer placed them ("small red circle , ...")."""
    return "Scene : " + " , ".join(f"{o.size} {o.colour} {o.shape}" for o in scene.objects) + " ."


def grid_objects(scene: Scene) -> tuple[tuple[str, str, str, int], ...]:
    """Each object with the cell (row-major, ``GRID`` x ``GRID``) of the image patch its centre falls in, as
    the image is resized to a square; where two centres share a cell the first keeps it."""
    out, taken = [], set()
    for o in scene.objects:
        row, col = grid_cell(o, scene, GRID)
        if row * GRID + col not in taken:
            taken.add(row * GRID + col)
            out.append((o.size, o.colour, o.shape, row * GRID + col))
    return tuple(out)


def draw_verify(rng: random.Random) -> Example:
    truth = rng.random() < 0.5
    if rng.random() < 0.5:  # existence: a present object, or one differing from a present one in one attribute
        scene = sample_scene(rng, LEVELS["medium"])
        obj = rng.choice(scene.objects)
        size, colour, shape = obj.size, obj.colour, obj.shape
        while not truth and scene.find(colour, shape, size):
            which = rng.randrange(3)
            size = rng.choice(SIZES) if which == 0 else obj.size
            colour = rng.choice(list(COLOURS)) if which == 1 else obj.colour
            shape = rng.choice(SHAPES) if which == 2 else obj.shape
        statement = f"{size} {colour} {shape}"
    else:  # a count (1-3) drawn independently of its truth, and a scene drawn to fit both
        shown = rng.randint(1, 3)
        while True:
            scene = sample_scene(rng, LEVELS["medium"])
            fits = [s for s in SHAPES if (len(scene.find(shape=s)) == shown) == truth]
            if fits:
                break
        shape = rng.choice(fits)
        statement = f"{NUMBER_WORDS[shown]} {shape if shown == 1 else PLURAL[shape]}"
    return Example(
        {"ask": f"Statement : {statement}", "scene": scene_text(scene)},
        "yes" if truth else "no",
        ("yes", "no"),
        grid_objects(scene),
    )


def draw_colour(rng: random.Random) -> Example:
    """The colour of the one object of a shape (or "none" where the scene has no such shape): the lookup
    the fact-checking verdict starts with."""
    absent = rng.random() < 0.2  # else a shape the scene holds once
    while True:
        scene = sample_scene(rng, LEVELS["medium"])
        shapes = [s for s in SHAPES if len(scene.find(shape=s)) == (0 if absent else 1)]
        if shapes:
            break
    shape = rng.choice(shapes)
    found = scene.find(shape=shape)
    return Example(
        {"ask": f"Question : What colour is the {shape} ?", "scene": scene_text(scene)},
        found[0].colour if found else "none",
        (*COLOURS, "none"),
        grid_objects(scene),
    )


FACT_KEYS = ("true", "image", "context", "nei")


def draw_fact(rng: random.Random) -> Example:
    """Also two hops: the claimed shape's colour at the claim's shape word (``colour``, or none), and the
    person the context credits with that colour at the context's last word (``name``, or nobody); with the
    scene first, each can be read where it is targeted. Dense hops at each sentence's full stop but the
    last (which holds the name hop: two targets among the same words at one position would contradict each
    other): the person it credits if its colour is the claimed shape's, else nobody (``match``, the matching
    sentence by sentence); and what the sentence itself says, its colour and its person (``bind-colour``,
    ``bind-name``: none and nobody for a sentence crediting no one), the binding that matching needs; and the
    claimed shape's colour again at the context's last word (``carry``: the colour hop's answer carried to
    where the name hop looks it up, among colour words where the name hop's are names)."""
    key = rng.choice(FACT_KEYS)
    record, scene = make_fact_record(rng, LEVELS["medium"], "lab", key, 0)
    context = " ".join(words(record.context or ""))
    claim = f"Claim : {' '.join(words(record.claim or ''))}"
    size, shape, _ = parse_claim(record.claim or "")
    found = scene.find(shape=shape, size=size)
    colour = found[0].colour if found else "none"
    credited = attributions(record.context or "").get(colour, "nobody") if found else "nobody"
    claim_words = words(claim)
    hops: tuple[Hop, ...] = (
        Hop("ask", len(claim_words) - 1 - claim_words[::-1].index(shape), colour, (*COLOURS, "none"), "colour"),
        Hop("context", -1, credited, (*NAMES, "nobody"), "name"),
    )
    for end, sentence in _sentence_stops(f"Context : {context}")[:-1]:  # the last full stop: the name hop's
        credit = attributions(sentence)
        name = credit.get(colour, "nobody") if found else "nobody"
        hops += (Hop("context", end, name, (*NAMES, "nobody"), "match"), *_binding(end, credit))
    hops += (Hop("context", -1, colour, (*COLOURS, "none"), "carry"),)
    return Example(
        {"ask": claim, "context": f"Context : {context}", "scene": scene_text(scene)},
        key,
        FACT_KEYS,
        grid_objects(scene),
        hops,
    )


RUNGS: dict[str, Rung] = {
    r.name: r
    for r in (
        Rung(
            "recall",
            draw_recall,
            {"ask-first": ("ask", "context"), "context-first": ("context", "ask")},
            0.42,
            "adjacent key-value recall over 2-3 pairs (sanity)",
        ),
        Rung(
            "retrieve",
            draw_retrieve,
            {"ask-first": ("ask", "context"), "context-first": ("context", "ask")},
            0.42,
            "who drew the shapes of a colour (reading)",
        ),
        Rung(
            "verdict",
            draw_verdict,
            {"ask-first": ("ask", "context"), "context-first": ("context", "ask")},
            1 / 3,
            "a claim against the context: true / context / nei (reading)",
        ),
        Rung(
            "verify",
            draw_verify,
            {"ask-first": ("ask", "scene"), "scene-first": ("scene", "ask")},
            1 / 2,
            "a statement against a written scene: yes / no (statement verification)",
        ),
        Rung(
            "colour",
            draw_colour,
            {"ask-first": ("ask", "scene"), "scene-first": ("scene", "ask")},
            0.2,
            "the colour of a shape in a written scene, or none (scene lookup)",
        ),
        Rung(
            "fact",
            draw_fact,
            {
                "ask-first": ("ask", "context", "scene"),
                "ask-scene-context": ("ask", "scene", "context"),
                "scene-first": ("scene", "ask", "context"),
                "context-first": ("context", "ask", "scene"),
            },
            1 / 4,
            "fact checking with the scene written out: true / image / context / nei",
        ),
    )
}


def get_rung(name: str) -> Rung:
    if name not in RUNGS:
        raise ValueError(f"unknown rung {name!r}; choose one of {sorted(RUNGS)}")
    return RUNGS[name]
