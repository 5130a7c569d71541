"""The quickstart: the whole method and its ablation on the synthetic benchmark, on a CPU.

Reads top to bottom: generate the medium benchmark, take the tiny pyramid's pretrained bases from the
zoo (or pretrain them, cached, when ``pretrain: true``), take the task-tuned teacher from the zoo
(``teacher_judge``; or tune the teacher's base here), then for each seed train the
student directly (SFT), by PPOD down the pyramid, by PPOD then
TCRD, and by PPOD then TCRD with augmentation (the full method); evaluate every model on the test split
of both tasks, the full method also with mapping-shift inference; write ``results.json`` and
``report.md`` (ablation table and training curves).
"""

from __future__ import annotations

import copy
import json
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, cast

from pydantic import Field, model_validator

from .data.tasks import TASKS
from .engine.config import AugmentSpec, StrictModel
from .files import atomic_path, write_text_atomic

ROWS = ("teacher_sft", "student_sft", "student_ppod", "student_ppod_tcrd", "student_hkd", "student_hkd_msei")


def default_config_path() -> Path:
    return Path(str(resources.files("hkd4vlm") / "configs" / "quickstart.yaml"))


@lru_cache(maxsize=1)
def _defaults() -> dict:
    import yaml

    return yaml.safe_load(default_config_path().read_text(encoding="utf-8"))


class QuickstartConfig(StrictModel):
    """The quickstart's settings. Their defaults live in one place, the embedded ``configs/quickstart.yaml``
    (``default_config_path``): a key that a config leaves out takes that file's value."""

    level: str
    sizes: dict[str, int]
    teacher: str
    assistant: str
    student: str
    bases: dict[str, str] = Field(
        description="role -> base checkpoint (a zoo name or a folder); used unless pretrain is true"
    )
    teacher_judge: str | None = Field(
        description="a task-tuned teacher (zoo:NAME or a folder): evaluated as teacher_sft and level 0 of the "
        "pyramid; null: tune the teacher's base here for sft_steps"
    )
    pretrain: bool = Field(description="pretrain the presets here instead of using the bases")
    pretrain_steps: dict[str, int]
    pretrain_dense_steps: dict[str, int] | None = Field(
        description="role -> dense vision steps (null: the preset's recipe)"
    )
    pretrain_pool: int = Field(ge=16, description="rendered curriculum questions")
    sft_steps: int = Field(ge=1)
    ppod_steps: int = Field(ge=1)
    tcrd_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    freeze_vision: bool = Field(description="keep the bases' pretrained vision towers fixed in every stage")
    augment: AugmentSpec
    sft_augment: bool = Field(
        description="augment in the SFT stages too (measured: every augmentation, even option "
        "permutation alone, keeps a tiny base on its initial plateau; docs/experiments.md, "
        "'Why SFT stayed at chance')"
    )
    eval_limit: int | None = Field(
        ge=1, description="score at most this many test records per task (null: the whole test split)"
    )
    msei_shifts: int | None
    progress: bool

    @model_validator(mode="before")
    @classmethod
    def _embedded_defaults(cls, data: Any) -> Any:
        # a key given replaces the default as a whole (augment: {hflip: 0.5} is only hflip), as a field default would
        return {**copy.deepcopy(_defaults()), **data} if isinstance(data, dict) else data


def _evaluate(model_dir: str, data: Path, *, limit: int | None, msei: bool, shifts: int | None) -> dict[str, dict]:
    from .data.layout import read_split
    from .eval.metrics import classification_report
    from .infer.msei import MappingSpec
    from .infer.predict import predict_split
    from .models.loading import load_model

    model, processor = load_model(model_dir)
    out: dict[str, dict] = {}
    for task in TASKS:
        preds = predict_split(
            model, processor, read_split(data, task, "test"), limit=limit, spec=MappingSpec(shifts if msei else 1)
        )
        # a record that could not be scored (status "error", no letter) counts as wrong
        gold = [cast(str, p.choice) for p in preds]  # the quickstart's synthetic test split is labelled
        letters = sorted(set(gold) | {p.pred_letter for p in preds if p.pred_letter})
        rep = classification_report(gold, [p.pred_letter or "" for p in preds], letters=letters)
        out[task] = {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "n": len(preds)}
    return out


def run_quickstart(out: str | Path, cfg: QuickstartConfig, seeds: list[int]) -> dict:
    from .distill.recipe import RecipeConfig, run_recipe
    from .models.loading import count_parameters, load_model
    from .synth.generate import generate
    from .synth.pretrain import pretrain

    out = Path(out)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    def timed(name: str, fn):
        t = time.perf_counter()
        result = fn()
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - t
        return result

    # 1. data (kept when it is already there)
    data = out / "data"
    if not (data / "stats.json").is_file():
        timed("synth", lambda: generate(data, level=cfg.level, sizes=cfg.sizes, seed=0, baselines=False))

    # 2. the pyramid's base checkpoints: shipped in the zoo, or pretrained here (cached by pretrain)
    bases = {}
    for role in ("teacher", "assistant", "student"):
        preset = getattr(cfg, role)
        if role == "teacher" and cfg.teacher_judge is not None:  # shipped tuned: its base is not needed
            bases[role] = cfg.teacher_judge
            continue
        if not cfg.pretrain:
            bases[role] = cfg.bases[role]
            continue
        bases[role] = str(
            timed(
                f"pretrain_{role}",
                lambda preset=preset, role=role: pretrain(
                    preset,
                    data,
                    out / "pretrain" / preset,
                    steps=cfg.pretrain_steps[role],
                    batch_size=cfg.batch_size,
                    dense_steps=(cfg.pretrain_dense_steps or {}).get(role),
                    pool_size=cfg.pretrain_pool,
                    progress=cfg.progress,
                ),
            )
        )
    params: dict[str, int] = {role: count_parameters(load_model(path)[0]) for role, path in bases.items()}

    def recipe(name: str, seed: int, pyramid: list[str], stages: list[dict]) -> dict[int, str]:
        rc = RecipeConfig.model_validate(
            {
                "pyramid": pyramid,
                "out": str(out / f"seed{seed}" / name),
                "seed": seed,
                "progress": cfg.progress,
                "data": {"root": str(data), "eval_split": "val", "eval_limit": 200},
                "stages": stages,
            }
        )
        return timed(name, lambda: run_recipe(rc))

    def stage(kind: str, level: int, steps: int, augment: bool, **settings) -> dict:
        train = {
            "steps": steps,
            "batch_size": cfg.batch_size,
            "optim": {"lr": cfg.lr, "warmup_steps": min(100, steps // 10)},
            "augment": cfg.augment if augment else {},
            "freeze_vision": cfg.freeze_vision,
        }
        return {"kind": kind, "level": level, **settings, "train": train}

    from .models.zoo import code_commit

    results: dict = {
        "commit": code_commit(),
        "seeds": seeds,
        "teacher": cfg.teacher_judge or f"{bases['teacher']}, tuned here ({cfg.sft_steps} SFT steps)",
        "teacher_judge": cfg.teacher_judge,  # the shipped teacher it started from (None: tuned here)
        "tasks": {t: {"rows": {}} for t in TASKS},
    }
    rows: dict[str, list[dict]] = {r: [] for r in ROWS}
    for seed in seeds:
        if cfg.teacher_judge is not None:
            teacher = cfg.teacher_judge
        else:
            teacher_sft = [stage("sft", 0, cfg.sft_steps, cfg.sft_augment)]
            teacher = recipe("teacher_sft", seed, [bases["teacher"]], teacher_sft)[0]
        student_sft = recipe(
            "student_sft", seed, [bases["student"]], [stage("sft", 0, cfg.sft_steps, cfg.sft_augment)]
        )[0]
        models = {"teacher_sft": teacher, "student_sft": student_sft}
        for name, augment in (("plain", False), ("hkd", True)):
            pyramid = [teacher, bases["assistant"], bases["student"]]
            stages = [
                stage("ppod", 1, cfg.ppod_steps, augment),
                stage("ppod", 2, cfg.ppod_steps, augment),
                stage("tcrd", 2, cfg.tcrd_steps, augment, teacher=0, assistant=1),
            ]
            if not augment:  # the PPOD-only row is the plain recipe's state after its second stage
                only_ppod = recipe(f"ppod_{name}", seed, pyramid, stages[:2])[2]
                models["student_ppod"] = only_ppod
            final = recipe(f"ppod_{name}", seed, pyramid, stages)[2]
            models["student_ppod_tcrd" if not augment else "student_hkd"] = final
        for row in ROWS:
            model_dir = models["student_hkd"] if row == "student_hkd_msei" else models[row]
            rows[row].append(
                timed(
                    f"eval_{row}",
                    lambda model_dir=model_dir, row=row: _evaluate(
                        model_dir, data, limit=cfg.eval_limit, msei=row == "student_hkd_msei", shifts=cfg.msei_shifts
                    ),
                )
            )
    for task in TASKS:
        for row in ROWS:
            role = "teacher" if row == "teacher_sft" else "student"
            results["tasks"][task]["rows"][row] = {
                "params": params[role],
                "accuracy": [r[task]["accuracy"] for r in rows[row]],
                "macro_f1": [r[task]["macro_f1"] for r in rows[row]],
                "n": [r[task]["n"] for r in rows[row]],
            }
    results["timing_s"] = {"total": time.perf_counter() - t_start, "per_stage": timing}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    write_report(out, results)
    return results


def write_report(out: Path, results: dict) -> Path:
    """``report.md``: the ablation table (mean ± spread over seeds) and the training curves' plot."""
    import numpy as np

    lines = [f"# Quickstart results (commit {results['commit'][:12]}, seeds {results['seeds']})", ""]
    for task, block in results["tasks"].items():
        lines += [f"## {task}", "", "| row | params | accuracy | macro-F1 |", "|---|---|---|---|"]
        for row, r in block["rows"].items():
            acc, f1 = np.array(r["accuracy"]), np.array(r["macro_f1"])
            lines.append(
                f"| {row} | {r['params']:,} | {acc.mean():.3f} ± {acc.std():.3f} | {f1.mean():.3f} ± {f1.std():.3f} |"
            )
        lines.append("")
    lines += [f"Total time {results['timing_s']['total']:.0f} s.", ""]
    plot = _plot_curves(out)
    if plot is not None:
        lines += [f"![training curves]({plot.name})", ""]
    return write_text_atomic(out / "report.md", "\n".join(lines))


def _plot_curves(out: Path) -> Path | None:
    """loss/total of every training run under ``out`` (TensorBoard), one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(p.parent for p in out.rglob("tb") if p.is_dir())
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for run in runs:
        events = EventAccumulator(str(run / "tb"))
        events.Reload()
        if "loss/total" not in events.Tags()["scalars"]:
            continue
        pts = events.Scalars("loss/total")
        ax.plot([p.step for p in pts], [p.value for p in pts], label=str(run.relative_to(out)), linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss/total")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "training_curves.png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
