"""The learnability lab: rungs that each isolate one skill on freshly generated data, with a fixed
held-out set and a curve (``hkd4vlm lab run RUNG``). A question about learning is asked here first, in the
cheapest setting that shows it, before it is paid for with a full VLM step (docs/lab.md)."""

from .rungs import RUNGS, Example, Rung, get_rung
from .sizes import SizesResult, run_sizes
from .train import LabConfig, LabResult, run_rung

__all__ = ["RUNGS", "Example", "LabConfig", "LabResult", "Rung", "SizesResult", "get_rung", "run_rung", "run_sizes"]
