"""Difficulty levels of the synthetic benchmark. Levels differ in visual and linguistic difficulty,
never in format. ``medium`` is the default and the one headline numbers use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    name: str
    n_objects: tuple[int, int]  # inclusive range
    small_radius: tuple[float, float]  # fraction of min(width, height)
    large_radius: tuple[float, float]
    image_side: tuple[int, int]  # range of the longer side, pixels
    background: tuple[str, ...]  # background styles to draw from
    noise: float  # std of pixel noise added to the whole image (0-255 scale)
    paraphrase: float  # probability of a paraphrased sentence frame
    group_sentences: bool  # join phrases into multi-phrase sentences
    filler: float  # probability of an extra, always-true statement in captions
    sized_claims: bool  # factuality claims name size and shape ("the small circle")
    context_extra: float  # probability of an extra non-visual sentence in contexts


LEVELS: dict[str, Level] = {
    "easy": Level("easy", (2, 3), (0.10, 0.11), (0.17, 0.19), (192, 256), ("plain",), 0.0, 0.0, False, 0.0, False, 0.0),
    "medium": Level(
        "medium",
        (2, 5),
        (0.075, 0.09),
        (0.13, 0.16),
        (192, 320),
        ("plain", "gradient", "speckle"),
        4.0,
        0.5,
        True,
        0.2,
        False,
        0.5,
    ),
    "hard": Level(
        "hard",
        (3, 6),
        (0.06, 0.075),
        (0.11, 0.13),
        (192, 384),
        ("gradient", "speckle", "stripes", "checker"),
        10.0,
        0.9,
        True,
        0.5,
        True,
        0.8,
    ),
}
