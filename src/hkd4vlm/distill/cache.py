"""Offline teachers: answer distributions and answer-position hidden states precomputed per (record,
augmentation variant), for teachers that do not fit beside the student.

Layout of a cache folder::

    manifest.json        model hash, data hash, prompt version, augmentation, seed, variants, shards
    shard-00000.safetensors   index (N,), variant (N,), logits (N, n_options), hidden (N, H)
    building.json        only while it is built: the plan an interrupted build resumes (build_cache)

A cache is only used for the model, data, prompt layout and augmentation it was computed with; anything
else is refused with an error that says what differs (a stale cache would silently teach the wrong
thing). Training with a cache repeats the cached augmentations every ``variants`` epochs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.augment import augment_spec
from ..data.tasks import Task
from ..errors import UserError
from ..files import atomic_path, write_text_atomic
from ..infer.sharding import Processes, barrier
from ..models.prompt import PROMPT_VERSION
from ..models.scoring import AnswerScores

MANIFEST = "manifest.json"


class StaleCacheError(UserError, ValueError):
    pass


def _add_file(h, path: Path) -> None:
    """Stream a file's bytes into the running hash ``h`` (``hashlib.file_digest`` reads in blocks)."""
    with open(path, "rb") as f:
        hashlib.file_digest(f, lambda: h)


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        _add_file(h, p)
    return h.hexdigest()[:20]


def model_hash(model_dir: str | Path) -> str:
    """Hash of a checkpoint's weights and config (what decides its outputs)."""
    from ..models.loading import resolve_model

    d = resolve_model(model_dir)
    files = list(d.glob("*.safetensors")) + [d / "config.json"]
    return _hash_files([f for f in files if f.is_file()])


def data_hash(root: str | Path, tasks: Sequence[Task], split: str) -> str:
    """Hash of what the teacher saw: each task's split file and the contents of every image its records name
    (a cache must not outlive a changed image any more than a changed caption)."""
    from ..data.layout import images_dir, load_raw, split_file

    h = hashlib.sha256()
    for task in tasks:
        path = split_file(root, task, split)
        h.update(f"{task}/{path.name}".encode())
        _add_file(h, path)
        raw, _ = load_raw(path)
        names = {r.get("image_id") for r in raw if isinstance(r, dict)}
        for name in sorted(n for n in names if isinstance(n, str)):
            image = images_dir(root, task) / name
            h.update(b"\0image\0" + name.encode("utf-8", "surrogatepass"))
            if image.is_file():
                _add_file(h, image)
    return h.hexdigest()[:20]


def _expected(model_dir, root, tasks, split, augment, seed, variants, skip_invalid) -> dict:
    return {
        "model_hash": model_hash(model_dir),
        "data_hash": data_hash(root, tasks, split),
        "prompt_version": PROMPT_VERSION,
        "tasks": list(tasks),
        "split": split,
        "augment": dict(sorted(augment_spec(augment).items())),
        "seed": seed,
        "variants": variants,
        "skip_invalid": skip_invalid,
    }


def build_cache(
    model_dir: str | Path,
    root: str | Path,
    tasks: Sequence[Task],
    split: str,
    out: str | Path,
    *,
    augment: dict | None = None,
    seed: int = 0,
    variants: int = 1,
    batch_size: int = 32,
    shard_size: int = 4096,
    progress: bool = True,
    skip_invalid: bool = False,
    log=None,
    procs: Processes | None = None,
) -> Path:
    """Score every record of ``split`` under each of ``variants`` augmentation draws and write the cache.

    ``skip_invalid``: invalid records are left out (the cache's record indices are those of the records kept,
    as a run with ``data.skip_invalid`` numbers them) and listed in the manifest's ``skipped``; ``log(problems)``
    is called with them before scoring starts.

    The (record, variant) keys are scored ``batch_size`` at a time, and every ``ceil(shard_size / batch_size)``
    batches make one shard. ``procs`` (``infer.sharding.processes()`` under ``accelerate launch``): the shards are
    dealt out across the processes, each writes its own, and the main one writes the manifest once all are
    there; the folder is the one a single process writes, byte for byte. While a cache is being built its
    plan is in ``building.json``: a build that was interrupted resumes, keeping every shard that is there
    and intact and scoring only the missing ones (a plan that differs starts again from nothing)."""
    from ..engine.sources import RecordSource
    from ..models.loading import load_model

    procs = procs or Processes()
    out = Path(out)
    source = RecordSource(
        root, tasks, split, augment=augment, seed=seed, augment_epochs=variants, skip_invalid=skip_invalid
    )
    if log is not None and procs.is_main:
        log(source.skipped)
    keys = [(i, v) for v in range(variants) for i in range(len(source))]
    per_shard = -(-shard_size // batch_size) * batch_size  # whole batches: a shard never splits one
    shards = [keys[s : s + per_shard] for s in range(0, len(keys), per_shard)]
    names = [f"shard-{j:05d}.safetensors" for j in range(len(shards))]
    expected = _expected(model_dir, root, tasks, split, augment, seed, variants, skip_invalid)
    plan = {**expected, "records": len(source), "batch_size": batch_size, "shard_size": shard_size, "shards": names}
    if procs.is_main:
        _start_or_resume(out, plan)
    barrier(procs)
    todo = [j for j in procs.mine(len(shards)) if not _intact_shard(out / names[j], shards[j])]
    if todo:
        device = procs.device if procs.world > 1 else None
        model, processor = load_model(model_dir, device=device)
        model.eval()
        bar = None
        if progress and procs.is_main:
            from tqdm.auto import tqdm

            desc = "cache-teacher" + (f" (process 0 of {procs.world})" if procs.world > 1 else "")
            bar = tqdm(total=sum(len(shards[j]) for j in todo), desc=desc, unit="rec")
        for j in todo:
            _write_shard(out / names[j], shards[j], source, model, processor, batch_size, bar)
        if bar is not None:
            bar.close()
    barrier(procs)
    missing = []
    if procs.is_main:
        missing = [n for n, keys_j in zip(names, shards) if not _intact_shard(out / n, keys_j)]
    if procs.is_main and not missing:
        manifest = {
            **expected,
            "model": str(model_dir),
            "records": len(source),
            "shards": names,
            "skipped_records": len({(p.file, p.record) for p in source.skipped}),
            "skipped": [str(p) for p in source.skipped],
        }
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
        (out / BUILDING).unlink(missing_ok=True)
    barrier(procs)
    if missing:  # a process failed to write its shards: what is there stays, and the next run resumes
        raise StaleCacheError(
            f"{out}: {len(missing)} shard(s) were not written ({', '.join(missing[:3])}); run the same "
            "cache-teacher command again to score only those"
        )
    return out


#: the plan of a cache being built (removed when its manifest is written)
BUILDING = "building.json"


def _start_or_resume(out: Path, plan: dict) -> None:
    """Keep the shards of an interrupted build of the same plan; otherwise clear the folder's cache files
    and record the plan."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        same = json.loads((out / BUILDING).read_text(encoding="utf-8")) == plan
    except (OSError, UnicodeDecodeError, ValueError):
        same = False
    if same:
        return
    (out / MANIFEST).unlink(missing_ok=True)  # a finished cache is rebuilt, as it always was
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    write_text_atomic(out / BUILDING, json.dumps(plan, indent=2))


def _intact_shard(path: Path, keys: list[tuple[int, int]]) -> bool:
    """Whether ``path`` is a readable shard holding exactly ``keys``, in order (a resumed build keeps it)."""
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            index, variant = f.get_tensor("index").tolist(), f.get_tensor("variant").tolist()
            rows = {f.get_slice(k).get_shape()[0] for k in ("logits", "hidden")}
    except Exception:  # safetensors' own error type for a truncated file is not an OSError
        return False
    return list(zip(index, variant)) == [tuple(k) for k in keys] and rows == {len(keys)}


def _write_shard(path: Path, keys, source, model, processor, batch_size: int, bar) -> None:
    """Score ``keys`` (record index, variant) ``batch_size`` at a time and write them as one shard."""
    from safetensors.torch import save_file

    from ..models.scoring import answer_distribution

    logits, hidden = [], []
    with torch.inference_mode():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            items, images = zip(*(source.get(i, v) for i, v in chunk))
            scores = answer_distribution(model, processor, list(items), list(images))
            logits.append(scores.logits.float().cpu())
            hidden.append(scores.hidden.float().cpu())
            if bar is not None:
                bar.update(len(chunk))
    with atomic_path(path) as tmp:
        save_file(
            {
                "index": torch.tensor([i for i, _ in keys]),
                "variant": torch.tensor([v for _, v in keys]),
                "logits": torch.cat(logits),
                "hidden": torch.cat(hidden),
            },
            str(tmp),
        )


class CachedTeacher:
    """A teacher read from a cache (a ``distill.stages.AnswerTeacher``); ``scores(items, images, keys=...)``
    looks up (index, epoch) pairs."""

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        model_dir: str | Path,
        root: str | Path,
        tasks: Sequence[Task],
        split: str,
        augment: dict | None,
        seed: int,
        name: str = "cached",
        skip_invalid: bool = False,
    ):
        from safetensors.torch import load_file

        self.dir, self.name = Path(cache_dir), name
        path = self.dir / MANIFEST
        if not path.is_file():
            raise StaleCacheError(
                f"{self.dir} is not a teacher cache (no {MANIFEST}); build it with hkd4vlm cache-teacher"
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON object was expected, got {type(manifest).__name__}")
            shards, records, variants = manifest["shards"], manifest["records"], manifest.get("variants", 1)
            if not (isinstance(shards, list) and all(isinstance(x, str) and Path(x).name == x for x in shards)):
                raise ValueError("field 'shards' must be a list of file names")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (records, variants)):
                raise ValueError("fields 'records' and 'variants' must be non-negative integers")
        except (UnicodeDecodeError, ValueError, KeyError) as e:  # JSONDecodeError is a ValueError
            raise StaleCacheError(
                f"{path}: not a valid cache manifest ({type(e).__name__}: {e}); rebuild it with hkd4vlm cache-teacher"
            ) from None
        expected = _expected(model_dir, root, tasks, split, augment, seed, manifest.get("variants", 1), skip_invalid)
        if "skip_invalid" not in manifest:  # written before the option existed: every record was kept
            manifest["skip_invalid"] = False
        diff = {k: (manifest.get(k), v) for k, v in expected.items() if manifest.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: cache has {a!r}, this run needs {b!r}" for k, (a, b) in diff.items())
            raise StaleCacheError(
                f"teacher cache {self.dir} does not match this run ({what}); rebuild it with hkd4vlm cache-teacher"
            )
        self.variants = manifest["variants"]
        self.table: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for shard in manifest["shards"]:
            try:
                t = load_file(str(self.dir / shard))
                rows = len(t["index"])
                if any(len(t[k]) != rows for k in ("variant", "logits", "hidden")):
                    raise ValueError("its tensors hold different numbers of rows")
            except Exception as e:  # safetensors' own error type for a truncated file is not an OSError
                raise StaleCacheError(
                    f"{self.dir / shard}: unreadable cache shard, truncated or corrupt ({type(e).__name__}: "
                    f"{str(e)[:200]}); rebuild the cache with hkd4vlm cache-teacher"
                ) from None
            for j, (i, v) in enumerate(zip(t["index"].tolist(), t["variant"].tolist())):
                self.table[(i, v)] = (t["logits"][j], t["hidden"][j])
        if len(self.table) != manifest["records"] * self.variants:
            raise StaleCacheError(
                f"teacher cache {self.dir} is incomplete: {len(self.table)} entries, "
                f"expected {manifest['records'] * self.variants}"
            )

    @property
    def hidden_size(self) -> int:
        """Width of the cached answer-position features."""
        return next(iter(self.table.values()))[1].shape[-1]

    def scores(self, items, images=None, *, keys=None) -> AnswerScores:
        if keys is None:
            raise ValueError("a cached teacher needs the batch's (index, epoch) keys")
        rows = [self.table[(i, e % self.variants)] for i, e in keys]
        logits = torch.stack([r[0] for r in rows])  # (B, n)
        return AnswerScores(probs=torch.softmax(logits, -1), logits=logits, hidden=torch.stack([r[1] for r in rows]))
