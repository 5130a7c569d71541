"""What the benchmarks measure and with which settings: variants, figures, targets, run sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

INFERENCE_VARIANTS = ("plain", "msei_prefix", "msei_naive", "generate")
#: ``sft_1_worker``: SFT with one DataLoader worker reading and encoding the records (``sft`` reads them on the
#: training thread, ``num_workers: 0``)
TRAINING_VARIANTS = ("sft", "sft_1_worker", "online_kd", "offline_kd")
#: the top-level figures of bench.json, each a ratio of two raw figures in the same file
FIGURES = (
    "msei_cost_ratio",
    "msei_naive_cost_ratio",
    "letter_vs_generate_speedup",
    "student_teacher_throughput_ratio",
    "online_kd_vs_sft",
    "offline_kd_vs_sft",
    "loader_1_worker_vs_0",
    "msei_cost_ratio_batch1",
    "letter_vs_generate_speedup_batch1",
)
#: top-level figure -> (comparison, target); reported, not enforced
TARGETS = {
    "msei_cost_ratio": ("<=", 1.5),
    "letter_vs_generate_speedup": (">=", 10.0),
    "student_teacher_throughput_ratio": (">=", 5.0),
    "online_kd_vs_sft": (">=", 0.6),
    "offline_kd_vs_sft": (">=", 0.9),
}
#: model folders of a finished quickstart run, per seed folder (quickstart.py, distill/recipe.py)
QUICKSTART_MODELS = {
    "student": "ppod_hkd/stage-2-tcrd-level2/model",
    "assistant": "ppod_hkd/stage-0-ppod-level1/model",
    "teacher": "teacher_sft/stage-0-sft-level0/model",
}
PRESET_MODELS = {"student": "tiny-llava-s", "assistant": "tiny-llava-m", "teacher": "tiny-llava-l"}


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class BenchSettings:
    records: int = 64  # inference records, both tasks alternating
    batch_size: int = 16
    latency_records: int = 24  # records timed one by one at batch 1
    rounds: int = 3  # timed passes over the records (the median batch counts)
    warmup: int = 2  # untimed calls before each timing
    new_tokens: int = 64  # generate-then-parse: tokens generated per record
    train_records: int = 128  # training split size (both tasks)
    train_batch_size: int = 32
    train_steps: int = 20  # timed optimizer steps
    train_warmup: int = 2  # untimed optimizer steps first
    #: torch threads; 1 by default: tiny models gain little from more, and one thread is the least disturbed by
    #: other work on the machine (0: torch's own default)
    threads: int = 1
    device: str | None = None  # default: cuda when available, else cpu

    def __post_init__(self) -> None:
        minimum = {"warmup": 0, "threads": 0}  # every other count must be at least 1
        bad = {k: v for k, v in asdict(self).items() if k != "device" and v < minimum.get(k, 1)}
        if bad:
            raise ValueError(f"benchmark settings must be at least 1 (warmup and threads: 0): {bad}")


#: ``--quick``: a smaller run (tests); without models it builds only the student and teacher presets
QUICK: dict[str, Any] = dict(
    records=16,
    batch_size=8,
    latency_records=4,
    rounds=2,
    train_records=16,
    train_batch_size=8,
    train_steps=3,
    train_warmup=2,
)


@dataclass
class ModelSet:
    dirs: dict[str, Path]  # label -> model folder, student first, teacher last
    source: str  # "run", "models" or "presets"
    data: Path | None  # dataset to take the records from (None: generate a synthetic one)
