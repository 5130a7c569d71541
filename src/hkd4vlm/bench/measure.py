"""The measurements, each run in a fresh process (bench.process): inference variants and training throughput."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data.tasks import TASKS
from .settings import INFERENCE_VARIANTS, TRAINING_VARIANTS, BenchSettings
from .workload import bench_records

_LETTER = re.compile(r"\b([A-Z])\b")


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

    from ..models.scoring import encode

    tok = processor.tokenizer
    batch = {k: v.to(model.device) for k, v in encode(processor, records, images).items()}
    out = model.generate(
        **batch,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    new = out[:, batch["input_ids"].shape[1] :]  # (B, T) tokens after the prompt
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

    from ..infer.msei import MappingSpec, score_shifts
    from ..models.loading import count_parameters, load_model
    from ..models.scoring import answer_distribution

    device = _local_device(s.device)
    model, processor = load_model(model_dir, device=device)
    model.eval()
    records, images = bench_records(Path(data), s.records)
    facts: dict[str, list] = {"prefix_reused": [], "shifts": [], "new_tokens": [], "parsed": []}

    def call(recs, ims) -> None:
        if variant == "plain":
            answer_distribution(model, processor, recs, ims).probs.argmax(-1).tolist()
        elif variant in ("msei_prefix", "msei_naive"):
            res = score_shifts(
                model, processor, recs, ims, spec=MappingSpec("all"), prefix_reuse=variant == "msei_prefix"
            )
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
    batches = [(records[i : i + s.batch_size], images[i : i + s.batch_size]) for i in starts]
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
            call(records[i : i + 1], images[i : i + 1])
            if k >= s.warmup:
                latency.append(time.perf_counter() - t)
    # the median over batches: robust to other work that shares the machine for a moment
    s_per_record = statistics.median(t / n for t, n in batch_s)
    p50, p95 = (float(np.percentile(latency, q)) * 1e3 for q in (50, 95))
    out = {
        "params": count_parameters(model),
        "device": device,
        "records": len(records),
        "batch_size": s.batch_size,
        "records_per_s": 1.0 / s_per_record,
        "s_per_record": s_per_record,
        "batch_s": [t for t, _ in batch_s],
        "latency_ms": {"p50": p50, "p95": p95, "n": len(latency)},
    }
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
    from ..distill.cache import build_cache

    t = time.perf_counter()
    build_cache(
        teacher_dir,
        data,
        list(TASKS),
        "train",
        out,
        augment={},
        seed=0,
        variants=1,
        batch_size=s.batch_size,
        progress=False,
    )
    seconds = time.perf_counter() - t
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    return {
        "seconds": seconds,
        "records": manifest["records"],
        "records_per_s": manifest["records"] / seconds,
        "device": "cpu",
    }


class _StopTraining(Exception):
    """Raised from ``on_step`` once the timed steps are done (nothing is saved after them)."""


def measure_training(
    kind: str, student_dir: str, teacher_dir: str, data: str, cache: str, work: str, s: BenchSettings
) -> dict:
    """Samples/s of the student's training loop with the SFT (records read on the training thread or by one
    DataLoader worker), online-KD or offline-KD stage."""
    from ..distill.cache import CachedTeacher
    from ..distill.stages import PPODStage, Teacher
    from ..engine.config import DataConfig, TrainConfig
    from ..engine.loop import sft_stage, train
    from ..engine.sources import RecordSource
    from ..models.loading import load_model

    device = _local_device(s.device)  # where the loop's Accelerator puts the student (the one visible GPU)
    total = s.train_warmup + s.train_steps
    model, processor = load_model(student_dir)
    stage: Callable[..., dict[str, Any]]
    if kind in ("sft", "sft_1_worker"):
        stage = sft_stage
    elif kind == "online_kd":
        stage = PPODStage([Teacher(*load_model(teacher_dir, device=device), name="teacher")], total_steps=total)
    elif kind == "offline_kd":
        stage = PPODStage(
            [
                CachedTeacher(
                    cache,
                    model_dir=teacher_dir,
                    root=data,
                    tasks=list(TASKS),
                    split="train",
                    augment={},
                    seed=0,
                    name="teacher",
                )
            ],
            total_steps=total,
        )
    else:
        raise ValueError(f"unknown training variant {kind!r}; choose one of {TRAINING_VARIANTS}")
    source = RecordSource(data, TASKS, "train", seed=0, augment_epochs=1 if kind == "offline_kd" else None)
    stamps: list[float] = []

    def on_step(step: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        if step == total:
            raise _StopTraining

    cfg = TrainConfig(
        model=student_dir,
        out=Path(work) / kind,
        data=DataConfig(root=Path(data), eval_split=None),
        steps=total + 1,
        batch_size=s.train_batch_size,
        save_every=10**9,
        log_every=10**9,
        progress=False,
        num_workers=1 if kind == "sft_1_worker" else 0,
    )
    try:
        train(cfg, source, stage=stage, model=model, processor=processor, on_step=on_step)
    except _StopTraining:
        pass
    step_s = [b - a for a, b in zip(stamps[s.train_warmup - 1 :], stamps[s.train_warmup :])]
    return {
        "samples_per_s": s.train_batch_size / statistics.median(step_s),
        "step_s": step_s,
        "batch_size": s.train_batch_size,
        "steps": len(step_s),
        "device": device,
    }
