"""The model zoo: pretrained tiny bases shipped with the package, the way users get base checkpoints from a
hub. Each base is a folder ``zoo/<name>/`` holding a checkpoint (safetensors, stored in half precision)
and ``manifest.json``: the preset, the pretraining recipe and its digest, the code commit, the steps, the
held-out accuracy per question kind, and the sha256 of every file. A base loads by name wherever a model
path is accepted: ``zoo:tiny-llava-l``. Files are checked against the manifest before loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from ..files import file_sha256 as sha256  # the package's one file digest

PREFIX = "zoo:"
ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
MANIFEST = "manifest.json"


class ZooError(ValueError):
    pass


def available() -> list[str]:
    """Names of the shipped bases."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / MANIFEST).is_file())


def is_zoo(path: str | os.PathLike) -> bool:
    return str(path).startswith(PREFIX)


def read_manifest(name: str) -> dict:
    folder = ZOO_DIR / name
    if not (folder / MANIFEST).is_file():
        raise ZooError(f"no zoo model {name!r}; the zoo has {available() or 'nothing'} (folder {ZOO_DIR})")
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def verify(name: str) -> list[str]:
    """Problems with a zoo model's files (missing, changed or unlisted), empty when it is intact."""
    folder = ZOO_DIR / name
    files = read_manifest(name).get("files", {})
    problems = []
    for rel, digest in files.items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"{f}: listed in the manifest but missing")
        elif sha256(f) != digest:
            problems.append(f"{f}: sha256 differs from the manifest (file changed or corrupt)")
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel != MANIFEST and rel not in files:
            problems.append(f"{f}: not listed in the manifest")
    return problems


def resolve(path: str | os.PathLike) -> Path:
    """A model directory: ``zoo:NAME`` is the zoo's folder of that name (checked against its manifest),
    anything else is returned as a path."""
    if not is_zoo(path):
        return Path(path)
    name = str(path)[len(PREFIX) :]
    read_manifest(name)
    problems = verify(name)
    if problems:
        raise ZooError(f"zoo model {name!r} does not match its manifest:\n  " + "\n  ".join(problems))
    return ZOO_DIR / name


def code_commit() -> str:
    """The package's git commit ("unknown" outside a git checkout); recorded with results and zoo bases."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ZOO_DIR.parent, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def publish(model, processor, name: str, *, manifest: dict, half: bool = True) -> Path:
    """Save a trained base (a float32 ``model`` and its ``processor``, e.g. from ``load_model``) into the zoo
    as ``name`` (replacing an older one), with ``manifest`` completed by the file hashes and the code
    commit. ``half``: store the weights in float16 (they load as float32)."""
    from .scoring import get_readout

    folder = ZOO_DIR / name
    tmp = folder.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if half:
        import torch

        model = model.to(torch.float16)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    files = {f.relative_to(tmp).as_posix(): sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
    full = {
        "name": name,
        **manifest,
        "readout": get_readout(model).kind,
        "dtype": "float16" if half else "float32",
        "code_commit": manifest.get("code_commit") or code_commit(),
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
