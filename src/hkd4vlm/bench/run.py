"""The benchmark run: measure every model and variant, derive the ratios, check the targets, print the table."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .measure import build_teacher_cache, measure_inference, measure_training
from .process import environment, in_fresh_process
from .settings import FIGURES, INFERENCE_VARIANTS, PRESET_MODELS, TARGETS, TRAINING_VARIANTS, BenchError, BenchSettings
from .workload import build_presets, prepare_data, quickstart_models, resolve_models


def _versions() -> dict:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
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
        "msei_cost_ratio_batch1": inference["msei_prefix"]["latency_ms"]["p50"]
        / inference["plain"]["latency_ms"]["p50"],
        "letter_vs_generate_speedup_batch1": inference["generate"]["latency_ms"]["p50"]
        / inference["plain"]["latency_ms"]["p50"],
    }


def summarize(models: dict, training: dict, student: str, teacher: str) -> dict:
    """The top-level figures, each a ratio of raw figures of the same result (the student's for inference)."""
    stu, tea = models[student]["inference"], models[teacher]["inference"]
    return {
        **inference_ratios(stu),
        "student_teacher_throughput_ratio": stu["plain"]["records_per_s"] / tea["plain"]["records_per_s"],
        "online_kd_vs_sft": training["online_kd"]["samples_per_s"] / training["sft"]["samples_per_s"],
        "offline_kd_vs_sft": training["offline_kd"]["samples_per_s"] / training["sft"]["samples_per_s"],
        "loader_1_worker_vs_0": training["sft_1_worker"]["samples_per_s"] / training["sft"]["samples_per_s"],
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


def run_bench(
    s: BenchSettings,
    *,
    run: Path | None = None,
    models: list[Path] | tuple = (),
    student: Path | None = None,
    teacher: Path | None = None,
    data: Path | None = None,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Every measurement, each in a fresh process; returns the result that ``bench.json`` holds."""
    from ..models.zoo import code_commit

    chosen = resolve_models(run, list(models), student, teacher, data)
    env = in_fresh_process(environment, requested_device=s.device, requested_threads=s.threads)
    s = replace(s, device=env["device"], threads=env["threads"])
    common: dict[str, Any] = {"threads": s.threads, "device": s.device}
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
                r = in_fresh_process(
                    measure_inference, model_dir=str(model_dir), data=str(root), variant=variant, s=s, **common
                )
                results[label]["inference"][variant] = r
                log(
                    f"{label:<10} {variant:<12} {r['records_per_s']:9.1f} rec/s  p50 {r['latency_ms']['p50']:7.1f} ms  "
                    f"peak {r['peak_memory_mb']:7.0f} MB"
                )
            results[label]["params"] = results[label]["inference"]["plain"]["params"]
            results[label]["ratios"] = inference_ratios(results[label]["inference"])

        cache = work / "teacher_cache"
        training = {
            "cache_build": in_fresh_process(
                build_teacher_cache, teacher_dir=str(dirs[teacher_label]), data=str(root), out=str(cache), s=s, **common
            )
        }
        cb = training["cache_build"]
        log(f"teacher cache: {cb['records']} records in {cb['seconds']:.1f} s")
        for kind in TRAINING_VARIANTS:
            r = in_fresh_process(
                measure_training,
                kind=kind,
                student_dir=str(dirs[student_label]),
                teacher_dir=str(dirs[teacher_label]),
                data=str(root),
                cache=str(cache),
                work=str(work / "train"),
                s=s,
                **common,
            )
            training[kind] = r
            log(f"training   {kind:<12} {r['samples_per_s']:9.1f} samples/s  peak {r['peak_memory_mb']:7.0f} MB")

    ratios = summarize(results, training, student_label, teacher_label)
    settings = {
        **asdict(s),
        "quick": quick,
        "device_name": env["device_name"],
        "torch_threads": results[student_label]["inference"]["plain"]["torch_threads"],
        "source": chosen.source,
        "student": student_label,
        "teacher": teacher_label,
        "data": str(chosen.data) if chosen.data else "synthetic (generated)",
        "memory": "torch.cuda.max_memory_allocated" if env["cuda"] else "ru_maxrss of a fresh process",
        "cpu_count": os.cpu_count(),
        **_versions(),
        "commit": code_commit(),
    }
    return {**ratios, "targets": targets(ratios), "settings": settings, "models": results, "training": training}


def format_table(result: dict) -> str:
    """The figures of a result as a readable table."""
    st = result["settings"]
    names = {
        "plain": "1 pass",
        "msei_prefix": "{k} shifts, prefix reuse",
        "msei_naive": "{k} shifts, naive",
        "generate": "generate {t} tok + parse",
    }
    lines = [
        f"hkd4vlm bench: {st['device']} ({st['device_name']}), {st['torch_threads']} torch threads, "
        f"batch {st['batch_size']}, {st['records']} records, latency at batch 1 over {st['latency_records']}",
        "",
        f"{'model':<11}{'params':>10}  {'variant':<26}{'rec/s':>9}{'ms/rec':>9}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'peak MB':>9}",
    ]
    for label, m in result["models"].items():
        first = True
        for variant, r in m["inference"].items():
            k = r.get("shifts", "")
            name = names[variant].format(k=k, t=r.get("new_tokens_forced", ""))
            head = f"{label:<11}{m['params']:>10,}" if first else " " * 21
            lines.append(
                f"{head}  {name:<26}{r['records_per_s']:>9.1f}{r['s_per_record'] * 1e3:>9.2f}"
                f"{r['latency_ms']['p50']:>9.2f}{r['latency_ms']['p95']:>9.2f}{r['peak_memory_mb']:>9.0f}"
            )
            first = False
    tr = result["training"]
    lines += [
        "",
        f"{'training the student, batch ' + str(st['train_batch_size']):<42}{'samples/s':>10}{'vs SFT':>9}"
        f"{'peak MB':>9}",
    ]
    kinds = {
        "sft": "SFT (records read on the training thread)",
        "sft_1_worker": "SFT, 1 DataLoader worker",
        "online_kd": "online KD (teacher forward)",
        "offline_kd": "offline KD (cache)",
    }
    for kind, name in kinds.items():
        r, sft = tr[kind], tr["sft"]["samples_per_s"]
        lines.append(
            f"  {name:<40}{r['samples_per_s']:>10.1f}{r['samples_per_s'] / sft:>9.2f}{r['peak_memory_mb']:>9.0f}"
        )
    cb = tr["cache_build"]
    lines.append(f"  (teacher cache built first: {cb['records']} records in {cb['seconds']:.1f} s, not counted)")
    lines += ["", f"{'figure':<36}{'value':>9}  {'target':<9}met"]
    for key in FIGURES:
        t = result["targets"].get(key)
        lines.append(
            f"{key:<36}{result[key]:>9.2f}  {t['target'] if t else '-':<9}{('yes' if t['met'] else 'no') if t else '-'}"
        )
    return "\n".join(lines)


def run_serve_bench(
    s: BenchSettings,
    *,
    requests: int,
    concurrency: int,
    run: Path | None = None,
    models: list[Path] | tuple = (),
    student: Path | None = None,
    data: Path | None = None,
    large_image_share: float = 0.0,
    log: Callable[[str], None] = print,
) -> dict:
    """The HTTP service's load test (``bench.load.bench_serve``) on the student model, replaying the
    benchmark's records (a share ``large_image_share`` with a 4000 x 4000 image): ``{"serve": {...}}``,
    with the server's resident memory before, at the peak of and after the round."""
    import torch

    from ..infer.detector import Detector
    from .load import bench_serve

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
        return {
            "serve": bench_serve(
                detector, requests=requests, concurrency=concurrency, images=root, large_image_share=large_image_share
            )
        }
