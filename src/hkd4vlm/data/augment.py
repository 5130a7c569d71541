"""Label-consistent multimodal augmentation (docs/method.md).

Each augmentation is a pure function ``(record, image, rng) -> (record, image)`` that returns a new
record whose correct answer is still correct: option order permutation (labels remapped), horizontal
flip (left and right swapped in every text field), photometric changes that keep colour names true
(brightness, contrast, noise, blur, JPEG; never a hue shift), crops and rescales that keep every
object, caption/context sentence reordering, and frame paraphrase that leaves option phrases as they
are. Synthetic records carry their scene in ``extra["synth"]["scene"]``; geometric augmentations
update it, so that the result can still be checked against the ground truth.
"""

from __future__ import annotations

import copy
import io
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from .records import LETTERS, Choice, Record

Augmentation = Callable[[Record, Image.Image, random.Random], tuple[Record, Image.Image]]
TEXT_FIELDS = ("system1_question", "system1_answer", "system2_question", "context", "claim", "question")


def _scene(record: Record) -> dict | None:
    return record.extra.get("synth", {}).get("scene")


def _with_scene(record: Record, update: Callable[[dict], None]) -> Record:
    """A copy of the record whose scene (if any) was changed by ``update``."""
    extra = copy.deepcopy(record.extra)
    scene = extra.get("synth", {}).get("scene")
    if scene is not None:
        update(scene)
    return replace(record, extra=extra)


def permute_options(record: Record, image: Image.Image, rng: random.Random) -> tuple[Record, Image.Image]:
    """Shuffle the options; letters stay A, B, C... in order and the label follows its option."""
    order = list(range(len(record.choices)))
    rng.shuffle(order)
    choices = [Choice(LETTERS[j], record.choices[i].choice) for j, i in enumerate(order)]
    correct = None
    if record.label is not None:
        correct = LETTERS[order.index(record.label)]
    return replace(record, choices=choices, correct_choice=correct, extra=copy.deepcopy(record.extra)), image


_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)(most)?\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def swap_left_right(text: str) -> str:
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(1)] + (m.group(2) or ""), text)


def hflip(record: Record, image: Image.Image, rng: random.Random | None = None) -> tuple[Record, Image.Image]:
    """Mirror the image and swap left/right in every text field and option."""
    width = image.width

    def mirror(scene: dict) -> None:
        for o in scene["objects"]:
            o["x"] = round(width - o["x"], 2)

    out = _with_scene(record, mirror)
    changes: dict[str, Any] = {name: swap_left_right(getattr(record, name)) for name in TEXT_FIELDS}
    choices = [Choice(c.id, swap_left_right(c.choice)) for c in record.choices]
    answer = swap_left_right(record.correct_answer) if record.correct_answer is not None else None
    return replace(out, choices=choices, correct_answer=answer, **changes), image.transpose(
        Image.Transpose.FLIP_LEFT_RIGHT
    )


@dataclass(frozen=True)
class Photometric:
    """Ranges of the photometric changes; all keep hue, so colour names stay true."""

    brightness: float = 0.15  # factor drawn from 1 ± this
    contrast: float = 0.15
    noise_std: float = 6.0  # max std of Gaussian pixel noise, 0-255 scale
    blur_radius: float = 0.8  # max Gaussian blur radius, pixels
    jpeg_quality: tuple[int, int] = (60, 95)


def photometric(
    record: Record, image: Image.Image, rng: random.Random, cfg: Photometric = Photometric()
) -> tuple[Record, Image.Image]:
    """Brightness, contrast, noise, blur and JPEG re-encoding, each with a random strength."""
    img = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))
    if cfg.noise_std > 0:
        arr = np.asarray(img, dtype=np.float32)
        noise = np.random.default_rng(rng.randrange(2**32)).standard_normal(arr.shape[:2] + (1,), dtype=np.float32)
        arr = np.clip(arr + rng.uniform(0, cfg.noise_std) * noise, 0, 255)
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    if cfg.blur_radius > 0:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, cfg.blur_radius)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(*cfg.jpeg_quality))
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return replace(record, extra=copy.deepcopy(record.extra)), img


def crop_rescale(
    record: Record,
    image: Image.Image,
    rng: random.Random,
    *,
    max_crop: float = 0.25,
    scale: tuple[float, float] = (0.8, 1.25),
    unknown_boxes_crop: float = 0.04,
) -> tuple[Record, Image.Image]:
    """Crop a border that holds no object, then rescale uniformly.

    With a known scene, up to ``max_crop`` of each side is cut but never into an object; without one
    (real data, no boxes), only ``unknown_boxes_crop`` of each side, so objects are kept.
    """
    w, h = image.size
    scene = _scene(record)
    if scene is not None and scene["objects"]:
        objs = scene["objects"]
        pad = 2.0
        room = (
            min(o["x"] - o["r"] for o in objs) - pad,
            min(o["y"] - o["r"] for o in objs) - pad,
            w - max(o["x"] + o["r"] for o in objs) - pad,
            h - max(o["y"] + o["r"] for o in objs) - pad,
        )
        limits = [max(0.0, min(r, max_crop * (w if k % 2 == 0 else h))) for k, r in enumerate(room)]
    else:
        limits = [unknown_boxes_crop * w, unknown_boxes_crop * h] * 2
    left, top, right, bottom = (int(rng.uniform(0, lim)) for lim in limits)
    box = (left, top, w - right, h - bottom)
    factor = rng.uniform(*scale)
    size = (max(8, round((box[2] - box[0]) * factor)), max(8, round((box[3] - box[1]) * factor)))
    fx, fy = size[0] / (box[2] - box[0]), size[1] / (box[3] - box[1])
    img = image.crop(box).resize(size, Image.Resampling.BILINEAR)

    def move(scene: dict) -> None:
        scene["width"], scene["height"] = size
        for o in scene["objects"]:
            o["x"] = round((o["x"] - left) * fx, 2)
            o["y"] = round((o["y"] - top) * fy, 2)
            o["r"] = round(o["r"] * min(fx, fy), 2)

    return _with_scene(record, move), img


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s]


def shuffle_sentences(record: Record, image: Image.Image, rng: random.Random) -> tuple[Record, Image.Image]:
    """Reorder the sentences of the caption (hallucination) or the context (factuality)."""
    name = "system1_answer" if record.task == "hallucination" else "context"
    sentences = split_sentences(getattr(record, name))
    rng.shuffle(sentences)
    changes: dict[str, Any] = {name: " ".join(sentences)}
    return replace(record, extra=copy.deepcopy(record.extra), **changes), image


#: interchangeable sentence frames; options never contain them, so option phrases stay as they are
CAPTION_FRAMES = ("There is", "I can see", "The image shows", "We can see", "The picture shows")
PLURAL_FRAMES = ("There are", "I can see", "The image shows", "We can see", "The picture shows")
_CAPTION_FRAME = re.compile(
    r"(^|(?<=[.!?] ))(There is|There are|I can see|The image shows|We can see|The picture shows) "
)
#: authorship verbs (past, participle) with one meaning, in contexts and claims alike
VERB_FORMS = (("drew", "drawn"), ("painted", "painted"), ("made", "made"))
_PAST = re.compile(r"\b(drew|painted|made) the\b")
_PARTICIPLE = re.compile(r"\b(were|was) (drawn|painted|made) by\b")


def paraphrase(record: Record, image: Image.Image, rng: random.Random) -> tuple[Record, Image.Image]:
    """Swap sentence frames (captions) or authorship verbs (contexts and claims) for synonyms."""
    if record.task == "hallucination":

        def frame(m: re.Match) -> str:
            plural = m.group(2) == "There are"
            return m.group(1) + rng.choice(PLURAL_FRAMES if plural else CAPTION_FRAMES) + " "

        return replace(
            record, system1_answer=_CAPTION_FRAME.sub(frame, record.system1_answer), extra=copy.deepcopy(record.extra)
        ), image

    def past(m: re.Match) -> str:
        return rng.choice(VERB_FORMS)[0] + " the"

    def participle(m: re.Match) -> str:
        return f"{m.group(1)} {rng.choice(VERB_FORMS)[1]} by"

    def swap(text: str) -> str:
        return _PARTICIPLE.sub(participle, _PAST.sub(past, text))

    return replace(
        record, context=swap(record.context), claim=swap(record.claim), extra=copy.deepcopy(record.extra)
    ), image


AUGMENTATIONS: dict[str, Augmentation] = {
    "permute_options": permute_options,
    "hflip": hflip,
    "photometric": photometric,
    "crop_rescale": crop_rescale,
    "shuffle_sentences": shuffle_sentences,
    "paraphrase": paraphrase,
}


def augment_spec(value) -> dict[str, float]:
    """The one reader of an augmentation setting, in any form a user writes it: a mapping
    ``{name: probability}`` (YAML), a string ``"name=prob,name=prob"`` (the CLI), or None / ``""`` (none).
    Returns the canonical ``{name: probability}`` (floats, in the order given); an unknown name or a
    probability outside [0, 1] is a ``ValueError`` that names it."""
    if value is None:
        return {}
    if isinstance(value, str):
        pairs = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, eq, prob = part.partition("=")
            if not eq:
                raise ValueError(f"{part!r} is not name=probability (e.g. permute_options=0.5,hflip=0.5)")
            pairs.append((name.strip(), prob.strip()))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise ValueError(
            f"an augmentation setting is a mapping name -> probability or a string "
            f"name=prob,...; got {type(value).__name__}"
        )
    unknown = [name for name, _ in pairs if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {sorted(map(str, unknown))}; known: {sorted(AUGMENTATIONS)}")
    spec: dict[str, float] = {}
    for name, prob in pairs:
        try:
            spec[name] = float(prob)
        except (TypeError, ValueError):
            raise ValueError(f"augmentation {name}: probability {prob!r} is not a number") from None
    bad = {k: p for k, p in spec.items() if not 0.0 <= p <= 1.0}
    if bad:
        raise ValueError(f"augmentation probabilities must lie in [0, 1]: {bad}")
    return spec


@dataclass(frozen=True)
class AugmentConfig:
    """Probability of each augmentation (0 switches it off); applied in the order of AUGMENTATIONS."""

    probs: dict[str, float] = field(
        default_factory=lambda: {
            "permute_options": 0.5,
            "hflip": 0.5,
            "photometric": 0.5,
            "crop_rescale": 0.5,
            "shuffle_sentences": 0.5,
            "paraphrase": 0.5,
        }
    )

    def __post_init__(self) -> None:
        augment_spec(self.probs)


def augment(
    record: Record, image: Image.Image, rng: random.Random, cfg: AugmentConfig = AugmentConfig()
) -> tuple[Record, Image.Image]:
    """Apply each enabled augmentation with its probability; the inputs are not modified."""
    for name, fn in AUGMENTATIONS.items():
        if rng.random() < cfg.probs.get(name, 0.0):
            record, image = fn(record, image, rng)
    return record, image
