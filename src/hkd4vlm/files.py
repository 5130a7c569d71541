"""Output files and file digests, once for the whole package.

Every output file is written atomically: to a temporary file beside the target, then renamed, so that a reader
(or a run killed mid-write, or a full disk) never sees a half-written file where a complete one was.
``atomic_path`` is the one way to do it, for any writer (``fig.savefig``, ``safetensors.save_file``, ...);
``write_text_atomic`` is its common case."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without error,
    removed otherwise. The folder is created if needed. An OSError about the temporary file (a full disk)
    names ``path`` instead. The temporary name is ``.NAME.PID.tmp``: a writer that reads the format from the
    suffix (``fig.savefig``) must be told it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, str(tmp)):  # name the output, not the temporary file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8) atomically; the folder is created if needed."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex (``hashlib.file_digest``: read in blocks, never whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
