"""Writing output files atomically: a temporary file beside the target, then a rename, so that a reader
(or a run killed mid-write, or a full disk) never sees a half-written file where a complete one was."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) atomically; the folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):  # name the output, not the temporary file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    return path
