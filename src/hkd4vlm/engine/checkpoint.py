"""Checkpoints of a training run: model, optimizer, scheduler, every process's RNG and the data position,
written to a temporary folder and renamed into place, so that a killed run never leaves a half-written
checkpoint that looks complete."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.json"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (a folder is complete once it has its state)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(accelerator, root: str | Path, step: int, *, model, optimizer, scheduler, state: dict,
                    extra_modules: dict | None = None, stateful: dict | None = None, keep: int = 2) -> Path:
    """Write ``root/step-{step}`` atomically; every process calls this (each saves its RNG)."""
    root = Path(root)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        torch.save({k: v.detach().cpu() for k, v in unwrapped.state_dict().items()}, tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for name, module in (extra_modules or {}).items():
            torch.save(accelerator.unwrap_model(module).state_dict(), tmp / f"{name}.pt")
        for name, obj in (stateful or {}).items():
            torch.save(obj.state_dict(), tmp / f"{name}.state.pt")
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # the state file goes last: its presence marks the folder complete
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path, *, model, optimizer, scheduler, extra_modules: dict | None = None,
                    stateful: dict | None = None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the saved state (step, epoch, position ...)."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    accelerator.unwrap_model(model).load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    for name, module in (extra_modules or {}).items():
        accelerator.unwrap_model(module).load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))
    for name, obj in (stateful or {}).items():
        obj.load_state_dict(torch.load(path / f"{name}.state.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file} is missing: the checkpoint was written by fewer processes than this run has; "
            "resume with the same number of processes"
        )
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state
