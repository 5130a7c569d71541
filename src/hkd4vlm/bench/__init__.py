"""Speed and memory benchmarks, measured side by side in one run (``hkd4vlm bench``).

Per model (student, assistant, teacher), on the same records:

* **inference**: records/s at ``batch_size`` (the median batch of ``rounds`` timed passes over the records, after
  ``warmup`` untimed batches) and the latency per record at batch 1 (p50 / p95), for

  - ``plain``: one pass of letter scoring (``models.scoring.answer_distribution``);
  - ``msei_prefix``: K = n cyclic shifts with prefix reuse (``infer.msei.score_shifts``); the json
    records whether the prefix path really ran;
  - ``msei_naive``: the same K shifts as full prompts, all B x K rows in one batched call;
  - ``generate``: generate-then-parse, what other teams run: greedy ``model.generate`` of
    ``new_tokens`` tokens (a short rationale and the answer), decoded, and the first option letter
    found by a regex. ``min_new_tokens`` is set to the same number: a model that emits EOS at once (an
    untrained one does) would make generation look cheap, so every record pays for the full length;
    the mean generated length is reported.

  Times include the processor (tokenization, image preprocessing): what a caller pays. Images are
  decoded beforehand.
* **training** of the student (samples/s): the real ``engine.loop.train`` run for ``train_warmup +
  train_steps`` optimizer steps and timed step by step through its ``on_step`` hook (median step; no
  checkpoint is written inside the timed steps; no augmentation), with SFT, online distillation (``PPODStage`` with the
  teacher online: a frozen teacher forward in inference mode on every batch) and offline distillation
  (``PPODStage`` reading a ``CachedTeacher``; the cache is built first by ``build_cache``, on the CPU,
  and its time is reported apart, not counted).
* **peak memory**: every measurement runs in a fresh process, forked from a forkserver that has only
  imported the libraries, so each starts from the same baseline (``start_rss_mb``): ``ru_maxrss`` on
  CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Torch threads are fixed in every process.

Models come from a quickstart run folder, from model folders, or (with neither) are built untrained
at the preset sizes: speed does not depend on training. The records are copied into (or generated
in) a small dataset in a temp folder, so the same records serve every variant.
"""

from __future__ import annotations

from .measure import build_teacher_cache, generate_then_parse, measure_inference, measure_training, parse_letter
from .process import PRELOAD, environment, in_fresh_process
from .run import default_run, format_table, inference_ratios, run_bench, run_serve_bench, summarize, targets
from .settings import (
    FIGURES,
    INFERENCE_VARIANTS,
    PRESET_MODELS,
    QUICK,
    QUICKSTART_MODELS,
    TARGETS,
    TRAINING_VARIANTS,
    BenchError,
    BenchSettings,
    ModelSet,
)
from .workload import bench_records, build_presets, prepare_data, quickstart_models, resolve_models

__all__ = [
    "BenchError",
    "BenchSettings",
    "FIGURES",
    "INFERENCE_VARIANTS",
    "ModelSet",
    "PRELOAD",
    "PRESET_MODELS",
    "QUICK",
    "QUICKSTART_MODELS",
    "TARGETS",
    "TRAINING_VARIANTS",
    "bench_records",
    "build_presets",
    "build_teacher_cache",
    "default_run",
    "environment",
    "format_table",
    "generate_then_parse",
    "in_fresh_process",
    "inference_ratios",
    "measure_inference",
    "measure_training",
    "parse_letter",
    "prepare_data",
    "quickstart_models",
    "resolve_models",
    "run_bench",
    "run_serve_bench",
    "summarize",
    "targets",
]
