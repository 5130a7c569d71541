"""Models named by a Hugging Face Hub id (``Qwen/Qwen2.5-VL-3B-Instruct``, optionally ``@revision``): any
name ``from_pretrained`` accepts, wherever a model path is accepted.

A Hub id is turned into a local snapshot folder (``huggingface_hub.snapshot_download``, which reuses the
Hub cache) and that folder is then checked and loaded like any other model folder. ``HF_HUB_OFFLINE=1`` or
``local_files_only=True`` keep it local: only what is already in the cache is used, and a model that is
not there is one error naming the id and the command that downloads it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelError

#: ``name`` or ``org/name`` as the Hub spells repository ids, with an optional ``@revision`` (a branch, tag or
#: commit); a revision may hold ``/`` (``refs/pr/1``)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?)(@(?P<revision>[\w./-]+))?$")

#: the files a model folder is loaded from (weights as safetensors only: no pickled .bin is fetched or run)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def split_hub_id(ref: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``ref`` reads as a Hub id (``org/name`` or ``org/name@rev``) and is not a
    local path that exists; None otherwise (a path: absolute, ``./`` or ``~`` relative, or of three parts or
    more, or a folder that is there)."""
    text = str(ref)
    if os.path.exists(text) or text.startswith((".", "/", "~")) or text.endswith("/"):
        return None
    m = _HUB_ID.match(text)
    if m is None or m["repo"].endswith((".", "-")) or ".." in m["repo"]:
        return None
    return m["repo"], m["revision"]


def is_hub_id(ref: str | os.PathLike) -> bool:
    return split_hub_id(ref) is not None


def offline(local_files_only: bool | None = None) -> bool:
    """Whether the Hub may not be asked: ``local_files_only`` when given, else ``HF_HUB_OFFLINE`` (read now, so
    that a process which sets it after importing huggingface_hub is still kept offline)."""
    if local_files_only is not None:
        return local_files_only
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"`hf download {repo_id}{rev}` (or `huggingface-cli download {repo_id}{rev}`)"


def hub_snapshot(ref: str | os.PathLike, *, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """The local folder of Hub model ``ref`` (``org/name`` or ``org/name@rev``; ``revision`` overrides the
    ``@rev``), downloaded into the Hub cache unless it is there or the Hub may not be asked (:func:`offline`).

    ModelError naming the id (and revision) when the model is neither cached nor downloadable, saying how to
    download it."""
    parts = split_hub_id(ref)
    if parts is None:
        raise ModelError(f"{ref}: not a Hub model id (org/name or org/name@revision)")
    repo_id, revision = parts[0], revision or parts[1]
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local = offline(local_files_only)
    named = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=local)
        )
    except GatedRepoError as e:  # a RepositoryNotFoundError: it must come first
        raise ModelError(
            f"Hub model {named} is gated: accept its terms on huggingface.co and log in (`hf auth login`), then "
            f"download it with {download_hint(repo_id, revision)} ({str(e).splitlines()[0]})"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"Hub model {repo_id} has no revision {revision!r} (a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{repo_id}: no model folder of that name, and no Hub model {named} (the id is wrong, or the "
            "repository is private: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        why = (
            "the Hub may not be asked (HF_HUB_OFFLINE=1 or local_files_only)"
            if local
            else "the Hub could not be reached"
        )
        raise ModelError(
            f"{repo_id}: no model folder of that name, and Hub model {named} is not in the local Hub cache "
            f"({why}); download it first with {download_hint(repo_id, revision)}, or give the path of a "
            "downloaded model folder"
        ) from None
    except (HFValidationError, ValueError) as e:
        raise ModelError(f"{ref}: not a usable Hub model id ({e})") from None
    except OSError as e:  # a network failure on the way: say which model and how to get it another way
        raise ModelError(
            f"Hub model {named} could not be downloaded ({type(e).__name__}: {str(e)[:200]}); download it with "
            f"{download_hint(repo_id, revision)} or set HF_HUB_OFFLINE=1 to use only the local cache"
        ) from None
