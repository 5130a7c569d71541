"""Reading checkpoints of the format written before checkpoints went through ``accelerate`` (``model.pt``,
``optimizer.pt``, ``scheduler.pt``, ``rng-N.json`` or the older pickled ``rng-N.pt``), so that a run
interrupted before the change still resumes exactly. Nothing writes this format any more.

Nothing is unpickled into arbitrary objects: tensors load with ``weights_only=True``, the RNG state is
JSON, and an ``rng-N.pt`` is read with only NumPy's array reconstruction allowed.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

#: the files a checkpoint of this format always has (``files`` in its state.json lists them when it has one)
LEGACY_FILES = ("model.pt", "optimizer.pt", "scheduler.pt")


def is_legacy(path: Path, state: dict) -> bool:
    """Whether the verified checkpoint ``path`` (its ``state``) is of the old format."""
    return "format" not in state and (path / "model.pt").is_file()


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def _pickled_rng_state(path: Path) -> dict:
    """The RNG state of an ``rng-N.pt`` (a pickle), read with ``weights_only=True`` and only NumPy's array
    reconstruction allowed: a crafted file cannot run code."""
    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core
    safe = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]
    with torch.serialization.safe_globals(safe):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    (version, internal, gauss), (name, keys, pos, has_gauss, cached) = raw["python"], raw["numpy"]
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, np.asarray(keys, dtype=np.uint32).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(raw["torch"].numpy().tobytes()).decode("ascii"),
    }


def load_legacy_checkpoint(
    accelerator,
    path: Path,
    state: dict,
    *,
    model,
    optimizer,
    scheduler,
    extra_modules: dict | None = None,
    stateful: dict | None = None,
) -> dict:
    """Restore an old-format checkpoint (already verified: ``state``) into the run's objects; every file is
    read before anything is restored. Only the CPU RNG was saved in this format."""
    rank = accelerator.process_index
    rng_file, pickled_rng = path / f"rng-{rank}.json", path / f"rng-{rank}.pt"
    if not rng_file.is_file() and not pickled_rng.is_file():
        raise CheckpointError(
            f"{rng_file} is missing: the checkpoint was written by fewer processes than this run has; "
            "resume with the same number of processes"
        )

    def read(name: str):
        try:
            return torch.load(path / name, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"{path / name}: missing") from None
        except Exception as e:  # truncated zip, foreign pickle: any reason the file cannot be read
            raise CheckpointError(
                f"{path / name}: cannot be read safely ({type(e).__name__}: {str(e)[:300]})"
            ) from None

    weights, optim, sched = (read(name) for name in LEGACY_FILES)
    extras = {name: read(f"{name}.pt") for name in (extra_modules or {})}
    states = {name: read(f"{name}.state.pt") for name in (stateful or {})}
    try:
        rng = json.loads(rng_file.read_text()) if rng_file.is_file() else _pickled_rng_state(pickled_rng)
    except Exception as e:
        raise CheckpointError(
            f"{rng_file if rng_file.is_file() else pickled_rng}: not a valid RNG state ({type(e).__name__}: "
            f"{str(e)[:300]}); a checkpoint's RNG state is never unpickled into arbitrary objects"
        ) from None

    def restore(name: str, load) -> None:
        try:
            load()
        except (RuntimeError, KeyError, ValueError, TypeError) as e:  # a weight of another shape or name
            raise CheckpointError(
                f"{path / name}: does not fit this run's model ({type(e).__name__}: {str(e)[:300]}); was it "
                "written for another model?"
            ) from None

    restore("model.pt", lambda: accelerator.unwrap_model(model).load_state_dict(weights))
    restore("optimizer.pt", lambda: optimizer.load_state_dict(optim))
    restore("scheduler.pt", lambda: scheduler.load_state_dict(sched))
    for name, module in (extra_modules or {}).items():
        restore(
            f"{name}.pt",
            lambda module=module, name=name: accelerator.unwrap_model(module).load_state_dict(extras[name]),
        )
    for name, obj in (stateful or {}).items():
        restore(f"{name}.state.pt", lambda obj=obj, name=name: obj.load_state_dict(states[name]))
    try:
        _set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{rng_file}: not a valid RNG state ({type(e).__name__}: {e})") from None
    return state
