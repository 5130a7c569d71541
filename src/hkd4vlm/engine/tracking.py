"""Where a training run's scalars go: ``accelerate``'s trackers (``Accelerator(log_with=...)``), named by
the config's ``log_with``. TensorBoard (``OUT/tb/``) is the default; Weights & Biases and MLflow log to
their project ``hkd4vlm`` (run name: the out folder's) when their package is installed. A tracker that is
asked for and not installed is an error, never silently left out (accelerate would leave it out)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError

#: tracker name -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: the project (W&B) or experiment (MLflow) that runs log to
PROJECT = "hkd4vlm"


def make_trackers(names: Sequence[str], out: Path) -> list:
    """accelerate tracker objects for ``names`` (each of :data:`TRACKERS`), for ``Accelerator(log_with=...)``;
    ConfigError naming every one whose package is missing and how to install it."""
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise ConfigError(
            f"log_with: {', '.join(missing)} asked for, but not installed: pip install {' '.join(TRACKERS[n] for n in missing)} "
            f"(or leave {'it' if len(missing) == 1 else 'them'} out of log_with / --log-with)"
        )
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    made = {
        "tensorboard": lambda: TensorBoardTracker("tb", str(out)),  # OUT/tb/
        "wandb": lambda: WandBTracker(PROJECT, name=out.name, dir=str(out)),
        "mlflow": lambda: MLflowTracker(experiment_name=PROJECT, run_name=out.name),
    }
    return [made[n]() for n in names]


def flat_settings(settings: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A config (``model_dump(mode="json")``) as the flat hyperparameters trackers take: dotted keys, scalar
    values (lists, mappings inside lists and None as JSON text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(flat_settings(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out
