"""The synthetic benchmark, a producer like any dataset (nothing in the core imports it): scenes of shapes
with known ground truth, both tasks written in the challenge layout, text-only baselines, the grounding
curriculum, and the pretraining of tiny bases on them (dense vision stage, curriculum, verification)."""

from .levels import LEVELS, Level
from .scene import COLOURS, SHAPES, SIZES, Obj, Scene

__all__ = ["LEVELS", "Level", "COLOURS", "SHAPES", "SIZES", "Obj", "Scene"]
