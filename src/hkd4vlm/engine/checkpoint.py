"""Checkpoints of a training run, written by ``accelerate`` (``Accelerator.save_state``), so that DDP, FSDP
and DeepSpeed runs checkpoint and resume with the same code: the model (safetensors where accelerate
allows), the optimizer, every process's RNG for every device type it uses, and the objects the run
registers with ``Accelerator.register_for_checkpointing`` (the scheduler, modules trained beside the model,
a stage's own state). The step and the data position are the engine's, in ``state.json``.

What is ours on top: a checkpoint is written to a temporary folder and renamed into place, so that a
killed run never leaves a half-written checkpoint that looks complete; ``state.json`` lists every other
file with its size and SHA-256 and holds a digest of its own fields; resuming verifies them and falls back
to the newest checkpoint that is complete (a disk that filled up, a copy cut short).

Nothing is unpickled into arbitrary objects. accelerate writes the optimizer, the registered objects and
the RNG states with ``torch.save``; before ``Accelerator.load_state`` runs, every such file is read here
with ``weights_only=True`` (tensors, containers and NumPy's RNG arrays only), and a file that needs
anything else is refused. accelerate then reads the same verified files (the registered objects' without
``weights_only``, which is why they are checked here first). Checkpoints of the format written before
(``model.pt``, ``rng-N.json``) still resume (``checkpoint_legacy``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import file_sha256 as _digest  # the package's one file digest

__all__ = ["CheckpointError", "checkpoint_dirs", "load_checkpoint", "resume_latest", "save_checkpoint"]

STATE_FILE = "state.json"
#: the state file's field that holds the SHA-256 of its other fields
STATE_DIGEST = "state_sha256"
#: the format of checkpoints written by accelerate (state.json's ``format``; the older format has none)
FORMAT = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
#: files that accelerate writes with ``torch.save`` (read here with ``weights_only=True`` before resuming)
_PICKLED = (".bin", ".pkl")


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
    accelerator, root: str | Path, step: int, *, state: dict, registered: list[str], keep: int = 2
) -> Path:
    """Write ``root/step-{step}`` atomically with ``accelerator.save_state``; every process calls this (each
    saves its RNG; sharded models save their shards). ``state`` (the data position) goes into state.json
    with the step, the number of processes and the names of the objects registered for checkpointing."""
    root = Path(root)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _cleared_on_failure(tmp):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _cleared_on_failure(tmp):
            # the state file goes last: its presence marks the folder complete, its list of files lets a
            # resume tell a truncated or altered file from a good one
            files = {
                p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _digest(p)}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            full = {
                **state,
                "step": step,
                "format": FORMAT,
                "processes": accelerator.num_processes,
                "registered": list(registered),
                "files": files,
            }
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


def _listed_name(name: str) -> bool:
    """Whether ``name`` (a key of state.json's ``files``) is a path inside the checkpoint folder."""
    parts = name.split("/")
    return (
        bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts) and name != STATE_FILE
    )


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
        from .checkpoint_legacy import LEGACY_FILES

        missing = [n for n in LEGACY_FILES if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)}")
        return state
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / STATE_FILE}: field 'files' must map file names to sizes and hashes")
    for name, want in files.items():
        if not _listed_name(name):
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


def _read_safely(path: Path):
    """A file that accelerate wrote with ``torch.save``, read with ``weights_only=True``: tensors,
    containers and the NumPy arrays of an RNG state, nothing that runs code. Memory-mapped, so that checking
    an optimizer state of many gigabytes costs no memory."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # what accelerate's own loader allows, no more

    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, a pickle that names anything else: any reason it cannot be read
        raise CheckpointError(
            f"{path}: cannot be read safely ({type(e).__name__}: {str(e)[:300]}); a checkpoint is never "
            "unpickled into arbitrary objects"
        ) from None


def load_checkpoint(accelerator, path: str | Path, *, registered: list[str], **legacy) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the objects prepared and registered with
    ``accelerator`` (``registered``: their names, in the order registered); returns the saved state (step,
    epoch, position ...). A checkpoint of the older format is restored through ``legacy`` (the run's
    ``model``, ``optimizer``, ``scheduler``, ``extra_modules``, ``stateful``).

    Every file is verified and read before anything is restored, so a bad checkpoint leaves the run as it was.
    """
    path = Path(path)
    state = verify_checkpoint(path)
    from .checkpoint_legacy import is_legacy, load_legacy_checkpoint

    if is_legacy(path, state):
        return load_legacy_checkpoint(accelerator, path, state, **legacy)
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path / STATE_FILE}: field 'format' is {state.get('format')!r}; this version reads format {FORMAT} "
            "(and the older checkpoints without one). Resume it with the version of hkd4vlm that wrote it"
        )
    world = accelerator.num_processes
    if state.get("processes") != world:
        raise CheckpointError(
            f"{path}: written by {state.get('processes')} process(es), and this run has {world}; every process "
            f"resumes its own RNG state, so resume with {state.get('processes')} (accelerate launch --num_processes)"
        )
    if state.get("registered") != list(registered):
        raise CheckpointError(
            f"{path / STATE_FILE}: holds the state of {state.get('registered')}, and this run checkpoints "
            f"{list(registered)}; was it written by another recipe or stage?"
        )
    rng = None
    for name in state["files"]:
        if name.endswith(_PICKLED):
            loaded = _read_safely(path / name)
            if name == f"random_states_{accelerator.process_index}.pkl":
                rng = loaded
    if not isinstance(rng, dict) or not isinstance(rng.get("torch_manual_seed"), torch.Tensor):
        raise CheckpointError(f"{path / f'random_states_{accelerator.process_index}.pkl'}: missing or not an RNG state")
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # a weight of another shape or name
        raise CheckpointError(
            f"{path}: does not fit this run ({type(e).__name__}: {str(e)[:300]}); was it written for another model?"
        ) from None
    # accelerate says nothing when it cannot restore an RNG state (it logs and carries on): check
    if not torch.equal(torch.get_rng_state(), rng["torch_manual_seed"]):
        raise CheckpointError(
            f"{path / f'random_states_{accelerator.process_index}.pkl'}: its RNG state was not restored"
        )
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
