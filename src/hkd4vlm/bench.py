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

import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

TASKS = ("hallucination", "factuality")
INFERENCE_VARIANTS = ("plain", "msei_prefix", "msei_naive", "generate")
TRAINING_VARIANTS = ("sft", "online_kd", "offline_kd")
#: the top-level figures of bench.json, each a ratio of two raw figures in the same file
FIGURES = ("msei_cost_ratio", "msei_naive_cost_ratio", "letter_vs_generate_speedup", "student_teacher_throughput_ratio",
           "online_kd_vs_sft", "offline_kd_vs_sft", "msei_cost_ratio_batch1", "letter_vs_generate_speedup_batch1")
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
#: what the forkserver imports once, so that every measurement process starts fast from the same baseline
#: (what ``load_model`` of a tiny LLaVA and the training loop import lazily, ~4 s per process otherwise)
PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "transformers.generation.utils",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.processing_auto",
           "transformers.models.llava.modeling_llava", "transformers.models.llava.processing_llava",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.clip.modeling_clip",
           "transformers.models.clip.image_processing_pil_clip", "accelerate", "torch.utils.tensorboard",
           "hkd4vlm.models.loading", "hkd4vlm.models.scoring", "hkd4vlm.infer.msei", "hkd4vlm.engine.loop",
           "hkd4vlm.distill.stages", "hkd4vlm.distill.cache"]
_LETTER = re.compile(r"\b([A-Z])\b")


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
QUICK = dict(records=16, batch_size=8, latency_records=4, rounds=2, train_records=16, train_batch_size=8,
             train_steps=3, train_warmup=2)


@dataclass
class ModelSet:
    dirs: dict[str, Path]  # label -> model folder, student first, teacher last
    source: str  # "run", "models" or "presets"
    data: Path | None  # dataset to take the records from (None: generate a synthetic one)


# -- which models, which records -------------------------------------------------------------------------

def quickstart_models(run: Path) -> dict[str, Path]:
    """Student, assistant and teacher folders of a finished quickstart run (its first seed)."""
    seeds = sorted(p for p in Path(run).glob("seed*") if p.is_dir())
    if not seeds:
        raise BenchError(f"{run} holds no seed*/ folder: not a finished quickstart run "
                         f"(hkd4vlm quickstart --out {run})")
    dirs = {label: seeds[0] / rel for label, rel in QUICKSTART_MODELS.items()}
    missing = [str(d) for d in dirs.values() if not (d / "config.json").is_file()]
    if missing:
        raise BenchError(f"{run} is not a finished quickstart run: no model in {', '.join(missing)}")
    return dirs


def resolve_models(run: Path | None, models: list[Path], student: Path | None, teacher: Path | None,
                   data: Path | None) -> ModelSet:
    """The models to measure: ``--models`` (first = student, last = teacher unless ``--student`` /
    ``--teacher`` say otherwise), a quickstart run, or (with neither) tiny presets built later."""
    if run is not None and (models or student or teacher):
        raise BenchError("give either --run or --models/--student/--teacher, not both")
    if run is not None:
        dirs = quickstart_models(run)
        return ModelSet(dirs, "run", data or (run / "data" if (run / "data").is_dir() else None))
    listed = list(dict.fromkeys(Path(m) for m in models))
    if not listed and not student and not teacher:
        return ModelSet({}, "presets", data)
    student = Path(student) if student else (listed[0] if listed else None)
    teacher = Path(teacher) if teacher else (listed[-1] if listed else None)
    if student is None or teacher is None:
        raise BenchError("name both a student and a teacher (--models S T, or --student and --teacher)")
    if student.resolve() == teacher.resolve():
        raise BenchError(f"student and teacher are the same model ({student}); give at least two model folders")
    for d in {student, teacher, *listed}:
        if not (d / "config.json").is_file():
            raise BenchError(f"{d} is not a model folder (no config.json)")
    others = [m for m in listed if m.resolve() not in (student.resolve(), teacher.resolve())]
    names = ["assistant"] if len(others) == 1 else [f"assistant{i + 1}" for i in range(len(others))]
    return ModelSet({"student": student, **dict(zip(names, others)), "teacher": teacher}, "models", data)


def prepare_data(dest: Path, source: Path | None, s: BenchSettings) -> Path:
    """A small dataset at ``dest``: ``test`` (inference records) and ``train`` (training, cache) splits of
    both tasks, copied from the first records of ``source`` or generated (synthetic, medium level)."""
    n_test, n_train = math.ceil(s.records / 2), math.ceil(s.train_records / 2)
    if source is None:
        from .data.synth.generate import generate

        generate(dest, level="medium", sizes={"train": n_train, "test": n_test}, seed=0, workers=1, baselines=False)
        return dest
    from .data.layout import available_splits, images_dir, read_split, write_split

    for task in TASKS:
        splits = available_splits(source, task)
        if not splits:
            raise BenchError(f"{source} has no {task} split to take benchmark records from")
        for name, n, prefer in (("test", n_test, ("test", "val")), ("train", n_train, ("train", "val"))):
            chosen = next(p for p in prefer + tuple(splits) if p in splits)
            split = read_split(source, task, chosen, check_images=False)
            records = split.records[:n]
            if name == "train" and any(r.correct_choice is None for r in records):
                raise BenchError(f"{split.root}/{task}/{split.name}: training needs labelled records")
            for r in records:
                target = images_dir(dest, task) / r.image_id
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(split.image_path(r), target)
            write_split(dest, task, name, records)
    return dest


def bench_records(root: Path, n: int) -> tuple[list, list]:
    """The first ``n`` test records of both tasks, alternating, and their decoded images."""
    from .data.layout import read_split

    splits = [read_split(root, task, "test") for task in TASKS]
    pairs = [(s, r) for group in zip(*(s.records for s in splits)) for s, r in zip(splits, group)][:n]
    return [r for _, r in pairs], [s.load_image(r) for s, r in pairs]


# -- measurements (each runs in a fresh process) ---------------------------------------------------------

def _local_device(device: str | None) -> str:
    """The device inside a measurement process: ``_child`` leaves one GPU visible there, ``cuda``."""
    return "cuda" if device and device.startswith("cuda") else "cpu"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def parse_letter(text: str, letters: list[str]) -> str | None:
    """The first standalone option letter in generated text."""
    return next((m.group(1) for m in _LETTER.finditer(text) if m.group(1) in letters), None)


def generate_then_parse(model, processor, records, images, new_tokens: int) -> tuple[list, list[int]]:
    """Greedy generation of exactly ``new_tokens`` tokens per record (EOS suppressed until then), decoded
    and parsed for a letter: (letters or None, generated length per record)."""
    import torch

    from .models.scoring import encode

    tok = processor.tokenizer
    batch = {k: v.to(model.device) for k, v in encode(processor, records, images).items()}
    out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]  # (B, T) tokens after the prompt
    texts = tok.batch_decode(new, skip_special_tokens=True)
    if tok.eos_token_id is None:
        lengths = [new.shape[1]] * len(records)
    else:  # up to and including the first EOS; after it generate only pads
        is_eos = new == tok.eos_token_id
        lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, new.shape[1]).tolist()
    return [parse_letter(t, r.letters) for t, r in zip(texts, records)], lengths


def measure_inference(model_dir: str, data: str, variant: str, s: BenchSettings) -> dict:
    """Throughput and batch-1 latency of one inference variant of one model, on ``s.device``."""
    import numpy as np
    import torch

    from .infer.msei import MappingSpec, score_shifts
    from .models.loading import count_parameters, load_model
    from .models.scoring import answer_distribution

    device = _local_device(s.device)
    model, processor = load_model(model_dir, device=device)
    model.eval()
    records, images = bench_records(Path(data), s.records)
    facts: dict[str, list] = {"prefix_reused": [], "shifts": [], "new_tokens": [], "parsed": []}

    def call(recs, ims) -> None:
        if variant == "plain":
            answer_distribution(model, processor, recs, ims).probs.argmax(-1).tolist()
        elif variant in ("msei_prefix", "msei_naive"):
            res = score_shifts(model, processor, recs, ims, spec=MappingSpec(None),
                               prefix_reuse=variant == "msei_prefix")
            facts["prefix_reused"].append(res.prefix_reused)
            facts["shifts"] += [len(m) for m in res.mappings]
        elif variant == "generate":
            letters, lengths = generate_then_parse(model, processor, recs, ims, s.new_tokens)
            facts["new_tokens"] += lengths
            facts["parsed"] += [x is not None for x in letters]
        else:
            raise ValueError(f"unknown inference variant {variant!r}; choose one of {INFERENCE_VARIANTS}")
        _sync(device)

    starts = range(0, len(records), s.batch_size)
    batches = [(records[i: i + s.batch_size], images[i: i + s.batch_size]) for i in starts]
    with torch.inference_mode():
        for k in range(s.warmup):
            call(*batches[k % len(batches)])
        for v in facts.values():
            v.clear()  # what the timed calls did, not the warm-up
        batch_s = []  # (seconds, records) of every timed batch
        for _ in range(s.rounds):
            for b in batches:
                t = time.perf_counter()
                call(*b)
                batch_s.append((time.perf_counter() - t, len(b[0])))
        latency = []  # one record at a time, after the warm-up calls
        for k in range(s.warmup + s.latency_records):
            i = k % len(records)
            t = time.perf_counter()
            call(records[i: i + 1], images[i: i + 1])
            if k >= s.warmup:
                latency.append(time.perf_counter() - t)
    # the median over batches: robust to other work that shares the machine for a moment
    s_per_record = statistics.median(t / n for t, n in batch_s)
    p50, p95 = (float(np.percentile(latency, q)) * 1e3 for q in (50, 95))
    out = {"params": count_parameters(model), "device": device, "records": len(records), "batch_size": s.batch_size,
           "records_per_s": 1.0 / s_per_record, "s_per_record": s_per_record, "batch_s": [t for t, _ in batch_s],
           "latency_ms": {"p50": p50, "p95": p95, "n": len(latency)}}
    if variant.startswith("msei"):
        out["prefix_reused"] = all(facts["prefix_reused"])
        out["prefix_reused_calls"] = sum(facts["prefix_reused"])
        out["shifts"] = max(facts["shifts"])
    if variant == "generate":
        out["new_tokens_forced"] = s.new_tokens
        out["mean_new_tokens"] = float(np.mean(facts["new_tokens"]))
        out["min_new_tokens_seen"] = int(min(facts["new_tokens"]))
        out["parsed_share"] = float(np.mean(facts["parsed"]))
    return out


def build_teacher_cache(teacher_dir: str, data: str, out: str, s: BenchSettings) -> dict:
    from .distill.cache import build_cache

    t = time.perf_counter()
    build_cache(teacher_dir, data, list(TASKS), "train", out, augment={}, seed=0, variants=1,
                batch_size=s.batch_size, progress=False)
    seconds = time.perf_counter() - t
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return {"seconds": seconds, "records": manifest["records"], "records_per_s": manifest["records"] / seconds,
            "device": "cpu"}


class _StopTraining(Exception):
    """Raised from ``on_step`` once the timed steps are done (nothing is saved after them)."""


def measure_training(kind: str, student_dir: str, teacher_dir: str, data: str, cache: str, work: str,
                     s: BenchSettings) -> dict:
    """Samples/s of the student's training loop with the SFT, online-KD or offline-KD stage."""
    import torch

    from .distill.cache import CachedTeacher
    from .distill.stages import PPODStage, Teacher
    from .engine.config import DataConfig, TrainConfig
    from .engine.loop import sft_stage, train
    from .engine.sources import RecordSource
    from .models.loading import load_model

    device = _local_device(s.device)  # where the loop's Accelerator puts the student (the one visible GPU)
    total = s.train_warmup + s.train_steps
    model, processor = load_model(student_dir)
    if kind == "sft":
        stage = sft_stage
    elif kind == "online_kd":
        stage = PPODStage([Teacher(*load_model(teacher_dir, device=device), name="teacher")], total_steps=total)
    elif kind == "offline_kd":
        stage = PPODStage([CachedTeacher(cache, model_dir=teacher_dir, root=data, tasks=list(TASKS), split="train",
                                         augment={}, seed=0, name="teacher")], total_steps=total)
    else:
        raise ValueError(f"unknown training variant {kind!r}; choose one of {TRAINING_VARIANTS}")
    source = RecordSource(data, TASKS, "train", seed=0, augment_epochs=1 if kind == "offline_kd" else None)
    stamps: list[float] = []

    def on_step(step: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        if step == total:
            raise _StopTraining

    cfg = TrainConfig(model=student_dir, out=Path(work) / kind, data=DataConfig(root=data, eval_split=None),
                      steps=total + 1, batch_size=s.train_batch_size, save_every=10**9, log_every=10**9,
                      progress=False)
    try:
        train(cfg, source, stage=stage, model=model, processor=processor, on_step=on_step)
    except _StopTraining:
        pass
    step_s = [b - a for a, b in zip(stamps[s.train_warmup - 1:], stamps[s.train_warmup:])]
    return {"samples_per_s": s.train_batch_size / statistics.median(step_s), "step_s": step_s,
            "batch_size": s.train_batch_size, "steps": len(step_s), "device": device}


def build_presets(data: str, out: str, presets: dict[str, str]) -> dict:
    from .models.presets import init_model

    return {label: str(init_model(preset, data, Path(out) / preset)) for label, preset in presets.items()}


def environment(requested_device: str | None, requested_threads: int | None) -> dict:
    """The device and torch thread count that every measurement will use."""
    import torch

    device = requested_device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_name()
    return {"device": device, "device_name": name, "threads": requested_threads or torch.get_num_threads(),
            "cuda": device.startswith("cuda")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _child(conn, fn: Callable, kwargs: dict, threads: int | None, device: str | None) -> None:
    try:
        # one device visible, so that the training loop (accelerate picks the first GPU) uses it too
        if device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        elif device and device.startswith("cuda:"):
            index = int(device.split(":", 1)[1])
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        cuda = bool(device) and device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = _maxrss_mb()
        out = fn(**kwargs)
        out.update(start_rss_mb=start, peak_rss_mb=_maxrss_mb(), torch_threads=torch.get_num_threads())
        if cuda:
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        # the figure of the device the work ran on (the teacher cache is built on the CPU)
        out["peak_memory_mb"] = out["peak_cuda_mb"] if out.get("device") == "cuda" else out["peak_rss_mb"]
        conn.send(("ok", out))
    except BaseException:  # the parent re-raises it with the child's traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_fresh_process(fn: Callable, *, threads: int | None = None, device: str | None = None, **kwargs) -> dict:
    """``fn(**kwargs)`` in a new process forked from a forkserver that has only imported the libraries
    (a clean start and its own peak-memory counters); its dict gets the memory figures added."""
    # a CUDA check while the server imports must not initialise CUDA there: its forks could not use it
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    ctx = multiprocessing.get_context("forkserver")  # Linux and macOS (peak memory needs ``resource`` anyway)
    ctx.set_forkserver_preload(PRELOAD)  # only takes effect before the server starts
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, kwargs, threads, device))
    proc.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        proc.join()
        raise BenchError(f"the {fn.__name__} process died (exit code {proc.exitcode}); out of memory?") from None
    proc.join()
    if status != "ok":
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "s")
        raise BenchError(f"{fn.__name__}({args}) failed:\n{payload}")
    return payload


# -- the run ---------------------------------------------------------------------------------------------

def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def inference_ratios(inference: dict) -> dict:
    """One model's cost ratios from its raw figures: per-record time of K shifts (with and without prefix
    reuse) over one pass, and letter scoring's throughput over generate-then-parse's, at the batch size
    (the headline figures) and, with ``_batch1``, from the p50 latency of one record at a time."""
    return {
        "msei_cost_ratio": inference["msei_prefix"]["s_per_record"] / inference["plain"]["s_per_record"],
        "msei_naive_cost_ratio": inference["msei_naive"]["s_per_record"] / inference["plain"]["s_per_record"],
        "letter_vs_generate_speedup": inference["plain"]["records_per_s"] / inference["generate"]["records_per_s"],
        # the same comparisons one record at a time (p50 latency at batch 1)
        "msei_cost_ratio_batch1": inference["msei_prefix"]["latency_ms"]["p50"] / inference["plain"]["latency_ms"]["p50"],
        "letter_vs_generate_speedup_batch1": inference["generate"]["latency_ms"]["p50"] / inference["plain"]["latency_ms"]["p50"],
    }


def summarize(models: dict, training: dict, student: str, teacher: str) -> dict:
    """The top-level figures, each a ratio of raw figures of the same result (the student's for inference)."""
    stu, tea = models[student]["inference"], models[teacher]["inference"]
    return {
        **inference_ratios(stu),
        "student_teacher_throughput_ratio": stu["plain"]["records_per_s"] / tea["plain"]["records_per_s"],
        "online_kd_vs_sft": training["online_kd"]["samples_per_s"] / training["sft"]["samples_per_s"],
        "offline_kd_vs_sft": training["offline_kd"]["samples_per_s"] / training["sft"]["samples_per_s"],
    }


def targets(ratios: dict) -> dict:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = ratios[key]
        out[key] = {"target": f"{op} {bound}", "value": value, "met": value <= bound if op == "<=" else value >= bound}
    return out


def default_run(log: Callable[[str], None] = print) -> Path | None:
    """``runs/quickstart`` when it holds a finished quickstart run, else None (tiny presets are built)."""
    run = Path("runs/quickstart")
    if not run.is_dir():
        return None
    try:
        quickstart_models(run)
    except BenchError as e:
        log(f"not using {run}: {e}; measuring untrained tiny presets instead")
        return None
    return run


def run_bench(s: BenchSettings, *, run: Path | None = None, models: list[Path] | tuple = (),
              student: Path | None = None, teacher: Path | None = None, data: Path | None = None,
              quick: bool = False, log: Callable[[str], None] = print) -> dict:
    """Every measurement, each in a fresh process; returns the result that ``bench.json`` holds."""
    from .quickstart import _commit

    chosen = resolve_models(run, list(models), student, teacher, data)
    env = in_fresh_process(environment, requested_device=s.device, requested_threads=s.threads)
    s = replace(s, device=env["device"], threads=env["threads"])
    common = {"threads": s.threads, "device": s.device}
    with tempfile.TemporaryDirectory(prefix="hkd4vlm-bench-") as tmp:
        work = Path(tmp)
        root = prepare_data(work / "data", chosen.data, s)
        dirs = dict(chosen.dirs)
        if chosen.source == "presets":
            presets = {k: v for k, v in PRESET_MODELS.items() if not quick or k != "assistant"}
            log(f"building untrained tiny models {', '.join(presets.values())} ...")
            built = in_fresh_process(build_presets, data=str(root), out=str(work / "models"), presets=presets, **common)
            dirs = {label: Path(built[label]) for label in presets}
        labels = list(dirs)
        student_label, teacher_label = labels[0], labels[-1]

        results: dict = {}
        for label, model_dir in dirs.items():
            results[label] = {"dir": str(model_dir), "inference": {}}
            if chosen.source == "presets":  # built in the temp folder, gone after the run
                results[label]["preset"] = PRESET_MODELS[label]
            for variant in INFERENCE_VARIANTS:
                r = in_fresh_process(measure_inference, model_dir=str(model_dir), data=str(root), variant=variant,
                                     s=s, **common)
                results[label]["inference"][variant] = r
                log(f"{label:<10} {variant:<12} {r['records_per_s']:9.1f} rec/s  p50 {r['latency_ms']['p50']:7.1f} ms  "
                    f"peak {r['peak_memory_mb']:7.0f} MB")
            results[label]["params"] = results[label]["inference"]["plain"]["params"]
            results[label]["ratios"] = inference_ratios(results[label]["inference"])

        cache = work / "teacher_cache"
        training = {"cache_build": in_fresh_process(build_teacher_cache, teacher_dir=str(dirs[teacher_label]),
                                                    data=str(root), out=str(cache), s=s, **common)}
        cb = training["cache_build"]
        log(f"teacher cache: {cb['records']} records in {cb['seconds']:.1f} s")
        for kind in TRAINING_VARIANTS:
            r = in_fresh_process(measure_training, kind=kind, student_dir=str(dirs[student_label]),
                                 teacher_dir=str(dirs[teacher_label]), data=str(root), cache=str(cache),
                                 work=str(work / "train"), s=s, **common)
            training[kind] = r
            log(f"training   {kind:<12} {r['samples_per_s']:9.1f} samples/s  peak {r['peak_memory_mb']:7.0f} MB")

    ratios = summarize(results, training, student_label, teacher_label)
    settings = {**asdict(s), "quick": quick, "device_name": env["device_name"],
                "torch_threads": results[student_label]["inference"]["plain"]["torch_threads"],
                "source": chosen.source, "student": student_label, "teacher": teacher_label,
                "data": str(chosen.data) if chosen.data else "synthetic (generated)",
                "memory": "torch.cuda.max_memory_allocated" if env["cuda"] else "ru_maxrss of a fresh process",
                "cpu_count": os.cpu_count(), **_versions(), "commit": _commit()}
    return {**ratios, "targets": targets(ratios), "settings": settings, "models": results, "training": training}


def format_table(result: dict) -> str:
    """The figures of a result as a readable table."""
    st = result["settings"]
    names = {"plain": "1 pass", "msei_prefix": "{k} shifts, prefix reuse", "msei_naive": "{k} shifts, naive",
             "generate": "generate {t} tok + parse"}
    lines = [f"hkd4vlm bench: {st['device']} ({st['device_name']}), {st['torch_threads']} torch threads, "
             f"batch {st['batch_size']}, {st['records']} records, latency at batch 1 over {st['latency_records']}",
             "", f"{'model':<11}{'params':>10}  {'variant':<26}{'rec/s':>9}{'ms/rec':>9}{'p50 ms':>9}{'p95 ms':>9}"
             f"{'peak MB':>9}"]
    for label, m in result["models"].items():
        first = True
        for variant, r in m["inference"].items():
            k = r.get("shifts", "")
            name = names[variant].format(k=k, t=r.get("new_tokens_forced", ""))
            head = f"{label:<11}{m['params']:>10,}" if first else " " * 21
            lines.append(f"{head}  {name:<26}{r['records_per_s']:>9.1f}{r['s_per_record'] * 1e3:>9.2f}"
                         f"{r['latency_ms']['p50']:>9.2f}{r['latency_ms']['p95']:>9.2f}{r['peak_memory_mb']:>9.0f}")
            first = False
    tr = result["training"]
    lines += ["", f"{'training the student, batch ' + str(st['train_batch_size']):<42}{'samples/s':>10}{'vs SFT':>9}"
                  f"{'peak MB':>9}"]
    kinds = {"sft": "SFT", "online_kd": "online KD (teacher forward)", "offline_kd": "offline KD (cache)"}
    for kind, name in kinds.items():
        r, sft = tr[kind], tr["sft"]["samples_per_s"]
        lines.append(f"  {name:<40}{r['samples_per_s']:>10.1f}{r['samples_per_s'] / sft:>9.2f}"
                     f"{r['peak_memory_mb']:>9.0f}")
    cb = tr["cache_build"]
    lines.append(f"  (teacher cache built first: {cb['records']} records in {cb['seconds']:.1f} s, not counted)")
    lines += ["", f"{'figure':<36}{'value':>9}  {'target':<9}met"]
    for key in FIGURES:
        t = result["targets"].get(key)
        lines.append(f"{key:<36}{result[key]:>9.2f}  {t['target'] if t else '-':<9}"
                     f"{('yes' if t['met'] else 'no') if t else '-'}")
    return "\n".join(lines)


def run_serve_bench(s: BenchSettings, *, requests: int, concurrency: int, run: Path | None = None,
                    models: list[Path] | tuple = (), student: Path | None = None, data: Path | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """The HTTP service's load test (``serve.bench_serve``) on the student model, replaying the
    benchmark's records: ``{"serve": {...}}``."""
    import torch

    from .serve import bench_serve
    from .detector import Detector

    if s.threads:
        torch.set_num_threads(s.threads)

    if run is not None:
        student_dir, data = quickstart_models(run)["student"], data or run / "data"
    elif student is not None or models:
        student_dir = Path(student or models[0])
    else:
        student_dir = None
    with tempfile.TemporaryDirectory(prefix="hkd4vlm-bench-") as tmp:
        root = prepare_data(Path(tmp) / "data", data if data and data.is_dir() else None, s)
        if student_dir is None:
            log(f"building an untrained {PRESET_MODELS['student']} ...")
            built = build_presets(str(root), str(Path(tmp) / "models"), {"student": PRESET_MODELS["student"]})
            student_dir = built["student"]
        detector = Detector.from_pretrained(student_dir)
        log(f"load test of the HTTP service on {student_dir}: {requests} requests, concurrency {concurrency} ...")
        return {"serve": bench_serve(detector, requests=requests, concurrency=concurrency, images=root)}
