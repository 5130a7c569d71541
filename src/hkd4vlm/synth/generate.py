"""``hkd4vlm synth``: write both tasks of the benchmark in the challenge layout, with ``stats.json``."""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..data.layout import images_dir, write_split
from ..data.records import Record, parse_record
from ..data.tasks import TASKS, Task
from . import factuality, hallucination
from .baselines import run_baselines
from .levels import LEVELS
from .scene import render

#: records per split used to train and score the text-only baselines (enough to find a shortcut)
BASELINE_TRAIN_CAP = 4000
#: how far (accuracy, absolute) a text-only baseline may sit above chance before a dataset is flagged
SHORTCUT_TOLERANCE = 0.05


def _schedule(task: Task, n: int, rng: random.Random) -> list[tuple[str, int]]:
    """(type or verdict, letter) per record: every pair equally often, in random order."""
    kinds = hallucination.HALLUCINATION_TYPES if task == "hallucination" else factuality.VERDICT_KEYS
    pairs = [(kinds[i % len(kinds)], (i // len(kinds)) % 4) for i in range(n)]
    rng.shuffle(pairs)
    return pairs


def _make_chunk(args: tuple) -> list[dict]:
    """Generate, render and save a run of records (one worker's share)."""
    task, level_name, split, seed, out, items = args
    level = LEVELS[level_name]
    maker = hallucination.make_record if task == "hallucination" else factuality.make_record
    folder = images_dir(out, task)
    records = []
    for i, kind, letter in items:
        rng = random.Random(f"{seed}:{task}:{split}:{i}")
        record, scene = maker(rng, level, f"{split}_{i:06d}.jpg", kind, letter)
        render(scene, level).save(folder / record.image_id, format="JPEG", quality=95, subsampling=0)
        records.append(record.to_dict())
    return records


def generate_split(out: Path, task: Task, level: str, split: str, n: int, seed: int, workers: int) -> list[Record]:
    images_dir(out, task).mkdir(parents=True, exist_ok=True)
    schedule = _schedule(task, n, random.Random(f"{seed}:{task}:{split}:schedule"))
    items = [(i, kind, letter) for i, (kind, letter) in enumerate(schedule)]
    chunk = max(1, -(-len(items) // (workers * 4)))
    jobs = [(task, level, split, seed, str(out), items[k : k + chunk]) for k in range(0, len(items), chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            raw = [r for part in pool.map(_make_chunk, jobs) for r in part]
    else:
        raw = [r for job in jobs for r in _make_chunk(job)]
    records = [parse_record(r, task) for r in raw]
    write_split(out, task, split, records)
    return records


def split_stats(task: Task, records: list[Record]) -> dict:
    synth = [r.extra["synth"] for r in records]
    kind_key = "hallucination_type" if task == "hallucination" else "verdict"
    widths = [s["scene"]["width"] for s in synth]
    heights = [s["scene"]["height"] for s in synth]
    return {
        "n": len(records),
        "letters": dict(sorted(Counter(r.correct_choice for r in records).items())),
        ("hallucination_types" if task == "hallucination" else "verdicts"): dict(
            sorted(Counter(s[kind_key] for s in synth).items())
        ),
        "objects_per_image": dict(sorted(Counter(len(s["scene"]["objects"]) for s in synth).items())),
        "image_width": {"min": min(widths), "max": max(widths), "mean": round(sum(widths) / len(widths), 1)},
        "image_height": {"min": min(heights), "max": max(heights), "mean": round(sum(heights) / len(heights), 1)},
    }


def generate(
    out: str | os.PathLike,
    *,
    level: str = "medium",
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    tasks: tuple[Task, ...] = TASKS,
    workers: int | None = None,
    baselines: bool = True,
) -> dict:
    """Write the benchmark under ``out`` and return (and save as ``out/stats.json``) its statistics."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {sorted(LEVELS)}")
    sizes = sizes if sizes is not None else {"train": 4000, "val": 500, "test": 1000}
    workers = workers or min(os.cpu_count() or 1, 4)
    out = Path(out)
    t0 = time.perf_counter()
    stats: dict = {"level": level, "seed": seed, "sizes": sizes, "chance": 0.25, "tasks": {}}
    for task in tasks:
        by_split = {split: generate_split(out, task, level, split, n, seed, workers) for split, n in sizes.items() if n}
        task_stats: dict = {"splits": {s: split_stats(task, recs) for s, recs in by_split.items()}}
        eval_split = "test" if "test" in by_split else next((s for s in ("val",) if s in by_split), None)
        if baselines and "train" in by_split and eval_split:
            train = by_split["train"][:BASELINE_TRAIN_CAP]
            accs = run_baselines(train, by_split[eval_split])
            task_stats["text_only_baselines"] = {
                "split": eval_split,
                "train_records": len(train),
                "accuracy": {k: round(v, 4) for k, v in accs.items()},
                "within_tolerance": all(abs(v - 0.25) <= SHORTCUT_TOLERANCE for v in accs.values()),
            }
        stats["tasks"][task] = task_stats
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
