"""Scenes of coloured shapes: sampling, geometry (relations) and rendering."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
from PIL import Image, ImageDraw

from .levels import Level

#: eight colours a person tells apart at a glance; backgrounds are low-saturation greys far from all of them
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 155, 55),
    "blue": (35, 85, 225),
    "yellow": (245, 220, 30),
    "orange": (245, 135, 20),
    "purple": (135, 50, 185),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = ("small", "large")
#: a relation holds when the centres are apart by more than this many times the mean radius
RELATION_FACTOR = 1.5
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, pixels
    y: float
    r: float  # radius of the circumscribed circle, pixels

    @property
    def key(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    width: int
    height: int
    objects: list[Obj]
    background: str
    bg_colour: tuple[int, int, int]
    seed: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bg_colour"] = list(self.bg_colour)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(
            width=d["width"],
            height=d["height"],
            objects=[Obj(**o) for o in d["objects"]],
            background=d["background"],
            bg_colour=tuple(d["bg_colour"]),
            seed=d["seed"],
        )

    def find(self, colour: str | None = None, shape: str | None = None, size: str | None = None) -> list[Obj]:
        return [
            o
            for o in self.objects
            if (colour is None or o.colour == colour)
            and (shape is None or o.shape == shape)
            and (size is None or o.size == size)
        ]


def grid_cell(o: Obj, scene: Scene, grid: int) -> tuple[int, int]:
    """(row, column) of the cell of a ``grid`` x ``grid`` patch grid that ``o``'s centre falls in, as the image
    is resized to a square."""
    return min(grid - 1, int(o.y / scene.height * grid)), min(grid - 1, int(o.x / scene.width * grid))


def relation_holds(a: Obj, b: Obj, rel: str) -> bool:
    """Whether ``a`` is clearly ``rel`` ``b`` (scale- and crop-invariant, mirrored by a flip)."""
    margin = RELATION_FACTOR * (a.r + b.r) / 2
    if rel == "left of":
        return b.x - a.x > margin
    if rel == "right of":
        return a.x - b.x > margin
    if rel == "above":
        return b.y - a.y > margin
    if rel == "below":
        return a.y - b.y > margin
    raise ValueError(f"unknown relation {rel!r}")


def sample_scene(
    rng: random.Random,
    level: Level,
    n_objects: int | None = None,
    *,
    fixed: tuple[tuple[str, str], ...] = (),
    avoid_shapes: frozenset[str] = frozenset(),
    avoid_colours: frozenset[str] = frozenset(),
) -> Scene:
    """Objects with distinct (colour, shape) pairs, placed without overlap.

    ``fixed`` (colour, shape) pairs are always present; the other objects avoid ``avoid_shapes`` and
    ``avoid_colours`` (so that counts of those categories are exactly what ``fixed`` holds).
    """
    long_side = rng.randint(*level.image_side)
    aspect = rng.uniform(0.75, 1.0)
    w, h = (long_side, int(long_side * aspect)) if rng.random() < 0.5 else (int(long_side * aspect), long_side)
    n = max(n_objects if n_objects is not None else rng.randint(*level.n_objects), len(fixed))
    side = min(w, h)
    objects: list[Obj] = []
    keys: set[tuple[str, str]] = set()
    colours = [c for c in COLOURS if c not in avoid_colours]
    shapes = [s for s in SHAPES if s not in avoid_shapes]
    attempts = 0
    while len(objects) < n:
        attempts += 1
        if attempts > 400:  # crowded: start again with a fresh layout
            return sample_scene(rng, level, n, fixed=fixed, avoid_shapes=avoid_shapes, avoid_colours=avoid_colours)
        if len(objects) < len(fixed):
            colour, shape = fixed[len(objects)]
        else:
            colour, shape = rng.choice(colours), rng.choice(shapes)
            if (colour, shape) in keys:
                continue
        size = rng.choice(SIZES)
        r = side * rng.uniform(*(level.small_radius if size == "small" else level.large_radius))
        x, y = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        if any(math.hypot(x - o.x, y - o.y) < r + o.r + 0.04 * side for o in objects):
            continue
        objects.append(Obj(shape, colour, size, round(x, 2), round(y, 2), round(r, 2)))
        keys.add((colour, shape))
    rng.shuffle(objects)
    grey = rng.randint(105, 170)
    tint = [rng.randint(-12, 12) for _ in range(3)]
    bg = cast(tuple[int, int, int], tuple(int(np.clip(grey + t, 0, 255)) for t in tint))  # three channels
    return Scene(w, h, objects, rng.choice(level.background), bg, rng.randrange(2**31))


def shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape centred at (x, y) within radius r; None for a circle."""

    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (x + radius * math.cos(phase + 2 * math.pi * k / n), y + radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if shape == "circle":
        return None
    if shape == "square":
        return ring(4, r, math.pi / 4)
    if shape == "diamond":
        return [(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)]
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, 0.45 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = 0.32 * r, 0.95 * r
        return [
            (x - a, y - b),
            (x + a, y - b),
            (x + a, y - a),
            (x + b, y - a),
            (x + b, y + a),
            (x + a, y + a),
            (x + a, y + b),
            (x - a, y + b),
            (x - a, y + a),
            (x - b, y + a),
            (x - b, y - a),
            (x - a, y - a),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    h, w = scene.height, scene.width
    base = np.empty((h, w, 3), dtype=np.float32)
    base[:] = scene.bg_colour
    if scene.background == "gradient":
        ramp = np.linspace(-18, 18, w if rng.random() < 0.5 else h, dtype=np.float32)
        base += ramp[None, :, None] if ramp.shape[0] == w else ramp[:, None, None]
    elif scene.background == "speckle":
        base += 9 * rng.standard_normal((h, w, 1), dtype=np.float32)
    elif scene.background == "stripes":
        period = rng.integers(6, 16)
        base += (12 * np.sign(np.sin(2 * np.pi * np.arange(w) / period)))[None, :, None].astype(np.float32)
    elif scene.background == "checker":
        cell = int(rng.integers(8, 20))
        yy, xx = np.mgrid[0:h, 0:w]
        base += (((yy // cell + xx // cell) % 2) * 20 - 10)[..., None].astype(np.float32)
    return base


def render(scene: Scene, level: Level) -> Image.Image:
    """Draw the scene. Deterministic for ``scene.seed``."""
    rng = np.random.default_rng(scene.seed)
    canvas = Image.fromarray(np.clip(_background(scene, rng), 0, 255, out=None).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        fill = COLOURS[o.colour]
        poly = shape_polygon(o.shape, o.x, o.y, o.r)
        if poly is None:
            draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    if level.noise > 0:
        arr = np.asarray(canvas, dtype=np.float32)
        arr += level.noise * rng.standard_normal((scene.height, scene.width, 1), dtype=np.float32)
        canvas = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), "RGB")
    return canvas
