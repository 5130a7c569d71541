"""Checkpoints of a training run: model, optimizer, scheduler, every process's RNG and the data position,
written to a temporary folder and renamed into place, so that a killed run never leaves a half-written
checkpoint that looks complete.

The state file lists every other file of the checkpoint with its size and SHA-256; resuming verifies
them and falls back to the newest checkpoint that is complete (a disk that filled up, a copy cut short).
Nothing in a checkpoint is unpickled into arbitrary objects: tensors load with ``weights_only=True`` and
the RNG state is JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import numpy as np
import torch

from ..errors import UserError
from ..files import file_sha256 as _digest  # the package's one file digest

STATE_FILE = "state.json"
#: the state file's field that holds the SHA-256 of its other fields
STATE_DIGEST = "state_sha256"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder, the file and what is wrong."""


def rng_state() -> dict:
    """This process's Python, NumPy and torch RNG states as plain JSON values."""
    version, internal, gauss = random.getstate()
    # legacy=True (the default) gives the tuple form; the stubs also allow a dict
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def _legacy_rng_state(path: Path) -> dict:
    """The RNG state of a checkpoint written before the JSON format (``rng-N.pt``, a pickle), read with
    ``weights_only=True`` and only NumPy's array reconstruction allowed: a crafted file cannot run code."""
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


def _state_digest(state: dict) -> str:
    """SHA-256 of the state file's own fields (all but the digest), so that an edited step or data position
    is caught like an altered weights file."""
    fields = {k: v for k, v in state.items() if k != STATE_DIGEST}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Checkpoints under ``root`` that were renamed into place, oldest first (a folder is there once it has
    its state file; whether its files are intact is :func:`verify_checkpoint`'s question)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    """The step of a folder that :data:`_STEP_DIR` matches."""
    m = _STEP_DIR.match(path.name)
    assert m is not None
    return int(m.group(1))


def save_checkpoint(
    accelerator,
    root: str | Path,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    state: dict,
    extra_modules: dict | None = None,
    stateful: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write ``root/step-{step}`` atomically; every process calls this (each saves its RNG)."""
    root = Path(root)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _cleared_on_failure(tmp):
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            torch.save({k: v.detach().cpu() for k, v in unwrapped.state_dict().items()}, tmp / "model.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for name, module in (extra_modules or {}).items():
                torch.save(accelerator.unwrap_model(module).state_dict(), tmp / f"{name}.pt")
            for name, obj in (stateful or {}).items():
                torch.save(obj.state_dict(), tmp / f"{name}.state.pt")
        (tmp / f"rng-{accelerator.process_index}.json").write_text(json.dumps(rng_state()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _cleared_on_failure(tmp):
            # the state file goes last: its presence marks the folder complete, its list of files lets a
            # resume tell a truncated or altered file from a good one
            files = {p.name: {"bytes": p.stat().st_size, "sha256": _digest(p)} for p in sorted(tmp.iterdir())}
            full = {**state, "step": step, "files": files}
            (tmp / STATE_FILE).write_text(json.dumps({**full, STATE_DIGEST: _state_digest(full)}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _cleared_on_failure(tmp: Path):
    """Remove the half-written checkpoint ``tmp`` when writing it fails (a full disk), and say which it was."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{tmp}: the checkpoint could not be written ({type(e).__name__}: {str(e)[:300]}); it was removed. "
            "Free some space (or lower keep_checkpoints) and resume with --resume"
        ) from e


def verify_checkpoint(path: str | Path) -> dict:
    """The checkpoint's state after checking every file it lists (size, then SHA-256); raises
    :class:`CheckpointError` naming the first file that is missing, truncated or altered."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "epoch", "index")):
        raise CheckpointError(f"{path / STATE_FILE}: lacks the integer fields step, epoch and index")
    if STATE_DIGEST in state and state[STATE_DIGEST] != _state_digest(state):
        raise CheckpointError(f"{path / STATE_FILE}: its fields differ from the SHA-256 it was written with (edited?)")
    m = _STEP_DIR.match(path.name)
    if m is not None and state["step"] != int(m.group(1)):
        raise CheckpointError(f"{path / STATE_FILE}: field 'step' is {state['step']}, but the folder is {path.name}")
    for key in ("step", "epoch", "index"):
        if state[key] < 0:
            raise CheckpointError(f"{path / STATE_FILE}: field '{key}' is {state[key]}; it must be at least 0")
    files = state.get("files")
    if files is None:  # written before checkpoints listed their files: only their presence can be checked
        needed = ["model.pt", "optimizer.pt", "scheduler.pt"]
        missing = [n for n in needed if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)}")
        return state
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / STATE_FILE}: field 'files' must map file names to sizes and hashes")
    for name, want in files.items():
        if Path(name).name != name or name in (".", "..", STATE_FILE):
            raise CheckpointError(
                f"{path / STATE_FILE}: field 'files' lists {name!r}, which is not a file of the checkpoint"
            )
        if (
            not isinstance(want, dict)
            or not isinstance(want.get("bytes"), int)
            or not isinstance(want.get("sha256"), str)
        ):
            raise CheckpointError(
                f'{path / STATE_FILE}: field \'files.{name}\' must be {{"bytes": int, "sha256": str}}'
            )
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"{f}: {size} bytes, the state file says {want.get('bytes')} (truncated?)")
        if _digest(f) != want.get("sha256"):
            raise CheckpointError(f"{f}: contents differ from the SHA-256 in the state file")
    return state


def load_checkpoint(
    accelerator,
    path: str | Path,
    *,
    model,
    optimizer,
    scheduler,
    extra_modules: dict | None = None,
    stateful: dict | None = None,
) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the saved state (step, epoch, position ...).

    Every file is verified and read before anything is restored, so a bad checkpoint leaves the model as it was.
    """
    path = Path(path)
    state = verify_checkpoint(path)
    rank = accelerator.process_index
    rng_file = path / f"rng-{rank}.json"
    legacy_rng = path / f"rng-{rank}.pt"
    if not rng_file.is_file() and not legacy_rng.is_file():
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

    weights, optim, sched = read("model.pt"), read("optimizer.pt"), read("scheduler.pt")
    extras = {name: read(f"{name}.pt") for name in (extra_modules or {})}
    states = {name: read(f"{name}.state.pt") for name in (stateful or {})}
    try:
        rng = json.loads(rng_file.read_text()) if rng_file.is_file() else _legacy_rng_state(legacy_rng)
    except Exception as e:
        raise CheckpointError(
            f"{rng_file if rng_file.is_file() else legacy_rng}: not a valid RNG state ({type(e).__name__}: "
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
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{rng_file}: not a valid RNG state ({type(e).__name__}: {e})") from None
    return state


def resume_latest(accelerator, root: str | Path, *, log=print, **parts) -> tuple[Path, dict] | None:
    """Load the newest checkpoint under ``root`` that verifies and reads; ``parts`` are
    :func:`load_checkpoint`'s keyword arguments. A newer one that does not is said so, renamed
    ``step-N.corrupt`` (kept for inspection, out of the way of pruning) and skipped. None when there is no
    checkpoint; :class:`CheckpointError` when none of those there can be resumed from."""
    # every step-N folder, also one whose state file is gone: it was complete once (folders are renamed into place
    # after their state file is written), so it is said and set aside like a corrupt one, never passed over
    root = Path(root)
    dirs = sorted((p for p in root.glob("step-*") if p.is_dir() and _STEP_DIR.match(p.name)), key=_step_of)
    bad: list[tuple[Path, str]] = []
    found = None
    for path in reversed(dirs):
        try:
            if not (path / STATE_FILE).is_file():
                raise CheckpointError(f"{path / STATE_FILE}: missing")
            found = path, load_checkpoint(accelerator, path, **parts)
            break
        except CheckpointError as e:
            bad.append((path, str(e)))
            log(f"checkpoint {path.name} cannot be resumed from: {e}")
    if dirs and found is None:
        raise CheckpointError(
            f"no checkpoint under {root} can be resumed from:\n"
            + "\n".join(f"  {p.name}: {why}" for p, why in bad)
            + "\nremove the folder to start afresh"
        )
    accelerator.wait_for_everyone()
    if bad:
        assert found is not None  # a failure means dirs is not empty, and with nothing found we raised above
        log(f"falling back to {found[0].name}; set aside: {', '.join(p.name + '.corrupt' for p, _ in bad)}")
        if accelerator.is_main_process:
            for p, _ in bad:
                shutil.rmtree(p.with_name(p.name + ".corrupt"), ignore_errors=True)
                p.rename(p.with_name(p.name + ".corrupt"))
    accelerator.wait_for_everyone()
    return found
