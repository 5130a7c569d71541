"""The grounding curriculum: questions about synthetic scenes that teach a model trained from scratch to
see before it judges (colour and shape of a named or placed object, existence, counting, size,
relations, and reading who drew what), growing from one large object to six of the benchmark's size.

Each question has four options. An *open* question shows no options and is answered with the first
word of the answer (a loss over the whole vocabulary): this grounds the words themselves, which a
from-scratch model needs before it can match an image against option texts. A multiple-choice question
is answered by letter, with the same answer scoring and loss as the tasks. Scenes are drawn fresh from
their own seed, never from a dataset's images; every answer is read off the scene, so it is exact.

What we measured on 2 cores (docs/experiments.md, "What was measured on the way"): with objects of the benchmark's size, a tiny
LLaVA stays at chance even on one-object colour questions for hundreds of steps (the answer position
must find 1-2 object patches among 64); with objects a third of the image wide it learns them in ~50
steps. Hence the curriculum shrinks objects as it adds them.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

from ..data.records import LETTERS
from .levels import LEVELS, Level
from .phrases import NUMBER_WORDS, PLURAL, Count, Exist, Phrase, Relation, phrase_truth
from .scene import COLOURS, OPPOSITE, RELATIONS, SHAPES, SIZES, Obj, Scene, relation_holds, sample_scene

#: name of a position by the thirds of the image its centre falls in
CELLS = {
    (0, 0): "top left",
    (1, 0): "top",
    (2, 0): "top right",
    (0, 1): "left",
    (1, 1): "centre",
    (2, 1): "right",
    (0, 2): "bottom left",
    (1, 2): "bottom",
    (2, 2): "bottom right",
}
QUESTION_KINDS = (
    "colour_of_shape",
    "shape_of_colour",
    "colour_at",
    "shape_at",
    "present",
    "absent",
    "count_shape",
    "count_colour",
    "size_of",
    "relation",
    "owner",
)
#: kinds whose answer's first word is the answer (open questions use only these)
OPEN_KINDS = (
    "colour_of_shape",
    "shape_of_colour",
    "colour_at",
    "shape_at",
    "count_shape",
    "count_colour",
    "relation",
    "owner",
)
NAMES = ("Maria", "Tom", "Aiko", "Omar", "Lena", "Ravi", "Sofia", "Jonas", "Nadia", "Pablo", "Grace", "Ivan")


@dataclass
class GroundingQuestion:
    """One four-option question about an image; duck-types the parts of a Record the prompt and the
    scorer read (``task``, ``choices``-like ``options``/``letters``, ``label``)."""

    question: str
    options: list[str]
    label: int
    kind: str
    context: str = ""
    open: bool = False  # answered with the answer's first word instead of a letter
    truths: list[bool] | None = None  # verification questions: whether each option holds (one target per option)
    task: str = field(default="grounding", init=False)

    @property
    def answer(self) -> str:
        return self.options[self.label]

    @property
    def letters(self) -> list[str]:
        return list(LETTERS[: len(self.options)])

    @property
    def choices(self) -> list[str]:
        return self.options


def cell_of(o: Obj, scene: Scene) -> str:
    return CELLS[(min(2, int(3 * o.x / scene.width)), min(2, int(3 * o.y / scene.height)))]


def _mc(
    rng: random.Random, answer: str, pool: list[str] | tuple[str, ...], kind: str, question: str, context: str = ""
) -> GroundingQuestion:
    wrong = rng.sample([p for p in pool if p != answer], 3)
    options = wrong + [answer]
    rng.shuffle(options)
    return GroundingQuestion(question, options, options.index(answer), kind, context)


def _ask(rng: random.Random, scene: Scene, kind: str) -> GroundingQuestion | None:
    objs = scene.objects
    o = rng.choice(objs)
    if kind == "colour_of_shape":
        if len(scene.find(shape=o.shape)) != 1:
            return None
        return _mc(rng, o.colour, list(COLOURS), kind, f"What colour is the {o.shape}?")
    if kind == "shape_of_colour":
        if len(scene.find(colour=o.colour)) != 1:
            return None
        return _mc(rng, o.shape, SHAPES, kind, f"What shape is the {o.colour} object?")
    if kind in ("colour_at", "shape_at"):
        where = cell_of(o, scene)
        if sum(cell_of(p, scene) == where for p in objs) != 1:
            return None
        if kind == "colour_at":
            return _mc(rng, o.colour, list(COLOURS), kind, f"What colour is the object at the {where}?")
        return _mc(rng, o.shape, SHAPES, kind, f"What shape is the object at the {where}?")
    if kind in ("present", "absent"):
        here = [f"{p.size} {p.colour} {p.shape}" for p in objs]
        away = [f"{z} {c} {s}" for c in COLOURS for s in SHAPES for z in SIZES if f"{z} {c} {s}" not in here]
        if kind == "present":
            return _mc(rng, rng.choice(here), away, kind, "Which of these is in the image?")
        if len(here) < 3:
            return None
        answer = rng.choice(away)
        options = rng.sample(here, 3) + [answer]
        rng.shuffle(options)
        return GroundingQuestion("Which of these is not in the image?", options, options.index(answer), kind)
    if kind == "count_shape":
        shape = rng.choice(SHAPES)
        n = len(scene.find(shape=shape))
        word = PLURAL[shape]
        return _mc(
            rng,
            NUMBER_WORDS.get(n, "zero"),
            ["zero", "one", "two", "three", "four"],
            kind,
            f"How many {word} are there?",
        )
    if kind == "count_colour":
        colour = rng.choice(list(COLOURS))
        n = len(scene.find(colour=colour))
        return _mc(
            rng,
            NUMBER_WORDS.get(n, "zero"),
            ["zero", "one", "two", "three", "four"],
            kind,
            f"How many {colour} shapes are there?",
        )
    if kind == "size_of":
        if len(objs) < 4:
            return None
        large = rng.choice([p for p in objs if p.size == "large"] or [None])
        others = [p for p in objs if p.size == "small"]
        if large is None or len(others) < 3:
            return None
        name = f"{large.colour} {large.shape}"
        options = [f"{p.colour} {p.shape}" for p in rng.sample(others, 3)] + [name]
        rng.shuffle(options)
        return GroundingQuestion("Which of these is large?", options, options.index(name), kind)
    if kind == "relation":
        if len(objs) < 2:
            return None
        a, b = rng.sample(objs, 2)
        true = [r for r in RELATIONS if relation_holds(a, b, r)]
        if len(true) != 1:
            return None
        options = list(RELATIONS)
        rng.shuffle(options)
        return GroundingQuestion(
            f"Where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}?",
            options,
            options.index(true[0]),
            kind,
        )
    if kind == "owner":
        # the reading half of fact checking: who made the shape, given who made each colour
        if len(scene.find(shape=o.shape)) != 1:
            return None
        names = rng.sample(NAMES, 4)
        colours = [o.colour] + rng.sample([c for c in COLOURS if c != o.colour], 3)
        rng.shuffle(colours)
        context = " ".join(f"{n} drew the {c} shapes." for n, c in zip(names, colours))
        answer = names[colours.index(o.colour)]
        options = names[:]
        rng.shuffle(options)
        return GroundingQuestion(f"Who drew the {o.shape}?", options, options.index(answer), kind, context)
    raise ValueError(f"unknown question kind {kind!r}")


def make_question(rng: random.Random, scene: Scene, kinds: tuple[str, ...] = QUESTION_KINDS) -> GroundingQuestion:
    """A question about ``scene``, of a kind drawn from ``kinds`` among those the scene can answer."""
    for _ in range(50):
        q = _ask(rng, scene, rng.choice(kinds))
        if q is not None:
            return q
    q = _ask(rng, scene, "count_shape")
    assert q is not None  # a count by shape can be asked of any scene
    return q


def curriculum_objects(progress: float) -> tuple[int, int]:
    """Object-count range at ``progress`` in [0, 1] of pretraining: one object first, up to six."""
    hi = 1 + round(5 * min(1.0, progress / 0.6))
    return (max(1, hi - 2), hi)


def curriculum_level(progress: float, level: Level = LEVELS["medium"]) -> Level:
    """``level`` with objects scaled up early on: radii start at ~0.35 of the short side and shrink to the
    level's own by ``progress`` 0.5."""
    from dataclasses import replace

    t = min(1.0, progress / 0.5)
    big = (0.30, 0.38)

    def mix(own: tuple[float, float]) -> tuple[float, float]:
        return (big[0] + t * (own[0] - big[0]), big[1] + t * (own[1] - big[1]))

    return replace(level, small_radius=mix(level.small_radius), large_radius=mix(level.large_radius))


def sample_item(
    seed: str,
    progress: float,
    level: Level = LEVELS["medium"],
    kinds: tuple[str, ...] = QUESTION_KINDS,
    open_share: float = 0.0,
):
    """(scene, question) for curriculum position ``progress``; deterministic for ``seed``. A share
    ``open_share`` of the questions are open (no options shown)."""
    rng = random.Random(seed)
    lo, hi = curriculum_objects(progress)
    lvl = curriculum_level(progress, level)
    n = rng.randint(lo, hi)
    while True:  # large objects may not fit: fewer objects then
        try:
            scene = sample_scene(rng, lvl, n)
            break
        except RecursionError:
            n -= 1
    is_open = rng.random() < open_share
    q = make_question(rng, scene, tuple(k for k in kinds if k in OPEN_KINDS) if is_open else kinds)
    q.open = is_open
    return scene, q


#: phrase verification (the pretraining's last stage): every option is a statement about the image, true or false
VERIFY_QUESTION = "Which of the following are supported by the image?"
VERIFY_KINDS = ("exist", "exist", "relation", "count")


def verify_phrase(rng: random.Random, scene: Scene, kind: str, truth: bool) -> Phrase | None:
    """A statement of the hallucination task's kinds (existence, count, relation) that ``scene`` makes
    ``truth``, or None when this draw cannot make one (the caller draws again). False existence statements
    name an absent shape or change one attribute of a real object, as the task's hallucinations do."""
    objs = scene.objects
    if kind == "exist":
        if truth:
            o = rng.choice(objs)
            return Exist(o.size, o.colour, o.shape)
        absent = [s for s in SHAPES if not scene.find(shape=s)]
        if absent and rng.random() < 0.5:
            return Exist(rng.choice(SIZES), rng.choice(list(COLOURS)), rng.choice(absent))
        o = rng.choice(objs)
        change = rng.randrange(3)
        if change == 0:
            return Exist(SIZES[1 - SIZES.index(o.size)], o.colour, o.shape)
        if change == 1:
            return Exist(o.size, rng.choice([c for c in COLOURS if c != o.colour]), o.shape)
        return Exist(o.size, o.colour, rng.choice([s for s in SHAPES if s != o.shape]))
    if kind == "count":
        raise ValueError("count statements are planned with their scene (count_plan), not drawn on one")
    if len(objs) < 2:
        return None
    a, b = rng.sample(objs, 2)
    holds = [r for r in RELATIONS if relation_holds(a, b, r)]
    if not holds:
        return None
    rel = rng.choice(holds)
    return Relation(a.colour, a.shape, rel if truth else OPPOSITE[rel], b.colour, b.shape)


_OWNER_STATEMENT = re.compile(r"^(\w+) drew the (\w+)$")


def statement_kind(text: str) -> str:
    """The kind of a verification statement: exist, count, relation (the task's phrases) or owner."""
    from .phrases import parse_phrase

    if _OWNER_STATEMENT.match(text):
        return "owner"
    return {"Exist": "exist", "Count": "count", "Relation": "relation"}[type(parse_phrase(text)).__name__]


def owner_statements(rng: random.Random, scene: Scene, n: int = 4) -> tuple[str, list[str], list[bool]] | None:
    """The reading half of fact checking as statements: a context crediting two or three colours to people
    (two in the scene where it has two) and up to ``n`` statements "NAME drew the SHAPE", each true or false with
    probability 1/2. One holds when exactly one SHAPE is in the image and the context credits its colour
    to NAME; a false one names someone else, a shape whose colour is not credited, or an absent shape."""
    colours = sorted({o.colour for o in scene.objects})
    credited = rng.sample(colours, min(2, len(colours)))
    credited += rng.sample([c for c in COLOURS if c not in credited], 3 - len(credited))
    names = rng.sample(NAMES, len(credited))
    credits = dict(zip(credited, names))
    context = [f"{name} drew the {colour} shapes." for colour, name in credits.items()]
    rng.shuffle(context)
    unique = [o for o in scene.objects if len(scene.find(shape=o.shape)) == 1]
    owned = [o for o in unique if o.colour in credits]
    if not owned:
        return None
    statements: list[str] = []
    truths: list[bool] = []
    trues = [f"{credits[o.colour]} drew the {o.shape}" for o in owned]
    rng.shuffle(trues)
    for _ in range(50 * n):
        if len(statements) == n:
            break
        truth = rng.random() < 0.5
        if truth:
            if not trues:  # every true statement is used: stop rather than tip the balance to false ones
                break
            text = trues.pop()
        else:
            way = rng.randrange(3)
            if way == 0:  # someone else the context credits (as in the task, every name is in the context)
                o = rng.choice(owned)
                text = f"{rng.choice([m for m in names if m != credits[o.colour]])} drew the {o.shape}"
            elif way == 1:  # a colour the context does not credit
                free = [o for o in unique if o.colour not in credits]
                if not free:
                    continue
                text = f"{rng.choice(names)} drew the {rng.choice(free).shape}"
            else:  # a shape that is not in the image
                absent = [s for s in SHAPES if not scene.find(shape=s)]
                if not absent:
                    continue
                text = f"{rng.choice(names)} drew the {rng.choice(absent)}"
        if text not in statements:
            statements.append(text)
            truths.append(truth)
    return " ".join(context), statements, truths


def count_plan(rng: random.Random) -> tuple[Count, bool, dict]:
    """A count statement drawn before its scene, as the task's are: the stated number (1 or 2) and whether
    it holds are drawn independently, and the scene is then built to hold the true number (the stated one,
    or one off), so the number word says nothing about the truth. Returns the statement, its truth and
    ``sample_scene`` arguments."""
    n, truth = rng.randint(1, 2), rng.random() < 0.5
    true_n = n if truth else (2 if n == 1 else rng.choice((1, 3)))
    by = rng.choice(("shape", "colour"))
    if by == "shape":
        value = rng.choice(SHAPES)
        fixed = tuple((c, value) for c in rng.sample(list(COLOURS), true_n))
        return Count(n, by, value), truth, {"fixed": fixed, "avoid_shapes": frozenset({value})}
    value = rng.choice(list(COLOURS))
    fixed = tuple((value, sh) for sh in rng.sample(SHAPES, true_n))
    return Count(n, by, value), truth, {"fixed": fixed, "avoid_colours": frozenset({value})}


def verify_item(
    seed: str, level: Level = LEVELS["medium"], kinds: tuple[str, ...] = VERIFY_KINDS, owner_share: float = 0.0
):
    """(scene, question): a scene of ``level`` and one statement per kind in ``kinds``, each true or false
    with probability 1/2 (checked by the benchmark's oracle, ``phrase_truth``), in random order; the
    question's ``truths`` say which hold. A share ``owner_share`` of the items are about who drew what
    instead (``owner_statements``, with a context). Deterministic for ``seed``."""
    rng = random.Random(seed)
    scene = sample_scene(rng, level, rng.randint(*level.n_objects))
    if owner_share and rng.random() < owner_share:
        for _ in range(20):
            made = owner_statements(rng, scene)
            if made is not None:
                context, options, owner_truths = made
                label = owner_truths.index(True) if True in owner_truths else 0
                return scene, GroundingQuestion(VERIFY_QUESTION, options, label, "verify", context, truths=owner_truths)
            scene = sample_scene(rng, level, rng.randint(*level.n_objects))
    phrases: list[Phrase] = []
    truths: list[bool] = []
    if "count" in kinds:  # the count statement decides the scene
        count, truth, layout = count_plan(rng)
        scene = sample_scene(rng, level, rng.randint(*level.n_objects), **layout)
        phrases.append(count)
        truths.append(truth)
        kinds = tuple(k for k in kinds if k != "count")
    for kind in kinds:
        for _ in range(50):
            truth = rng.random() < 0.5
            p = verify_phrase(rng, scene, kind, truth)
            if p is not None and phrase_truth(p, scene) is truth and p.text() not in [q.text() for q in phrases]:
                phrases.append(p)
                truths.append(truth)
                break
    order = list(range(len(phrases)))
    rng.shuffle(order)
    options, truths = [phrases[i].text() for i in order], [truths[i] for i in order]
    label = truths.index(True) if True in truths else 0  # unused by the loss; a Record-like needs one
    return scene, GroundingQuestion(VERIFY_QUESTION, options, label, "verify", truths=truths)


def vocabulary_texts(n: int = 3000, seed: int = 0) -> list[str]:
    """Texts that cover every word the curriculum uses, for building a tokenizer."""
    return list(_vocabulary_texts(n, seed))


@functools.cache  # a pure function of its arguments, drawn again by every model a process builds
def _vocabulary_texts(n: int, seed: int) -> tuple[str, ...]:
    texts = list(CELLS.values()) + list(PLURAL.values()) + list(NAMES) + ["zero", "Question", "Context"]
    rng = random.Random(seed)
    for i in range(n):
        _, q = sample_item(f"vocab:{seed}:{i}", rng.random())
        texts += [q.question, q.context] + q.options
    return tuple(t for t in texts if t)
