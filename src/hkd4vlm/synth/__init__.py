"""The synthetic benchmark: scenes of shapes with known ground truth, written in the challenge layout."""

from .levels import LEVELS, Level
from .scene import COLOURS, SHAPES, SIZES, Obj, Scene

__all__ = ["LEVELS", "Level", "COLOURS", "SHAPES", "SIZES", "Obj", "Scene"]
