"""Which models and which records the benchmarks run on: a quickstart run, model folders, or fresh presets."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..data.tasks import TASKS
from .settings import QUICKSTART_MODELS, BenchError, BenchSettings, ModelSet


def is_model(ref: Path) -> bool:
    """Whether ``ref`` is a model: a folder with a config.json, or a shipped model by its zoo name (which
    must match its manifest: ZooError otherwise)."""
    from ..models import zoo

    return (zoo.resolve(ref) / "config.json").is_file()


def quickstart_models(run: Path) -> dict[str, Path]:
    """Student, assistant and teacher folders of a finished quickstart run (its first seed); the teacher is
    the shipped judge the run started from where it did (``teacher_judge`` in its ``results.json``)."""
    seeds = sorted(p for p in Path(run).glob("seed*") if p.is_dir())
    if not seeds:
        raise BenchError(
            f"{run} holds no seed*/ folder: not a finished quickstart run (hkd4vlm quickstart --out {run})"
        )
    dirs = {label: seeds[0] / rel for label, rel in QUICKSTART_MODELS.items()}
    results = Path(run) / "results.json"
    judge = json.loads(results.read_text(encoding="utf-8")).get("teacher_judge") if results.is_file() else None
    if judge:  # loaded by its zoo name (in float32, as shipped models load everywhere)
        dirs["teacher"] = Path(judge)
    missing = [str(d) for d in dirs.values() if not is_model(d)]
    if missing:
        raise BenchError(f"{run} is not a finished quickstart run: no model in {', '.join(missing)}")
    return dirs


def resolve_models(
    run: Path | None, models: list[Path], student: Path | None, teacher: Path | None, data: Path | None
) -> ModelSet:
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
        if not is_model(d):
            raise BenchError(f"{d} is not a model folder (no config.json) nor a shipped model (zoo:NAME)")
    others = [m for m in listed if m.resolve() not in (student.resolve(), teacher.resolve())]
    names = ["assistant"] if len(others) == 1 else [f"assistant{i + 1}" for i in range(len(others))]
    return ModelSet({"student": student, **dict(zip(names, others)), "teacher": teacher}, "models", data)


def prepare_data(dest: Path, source: Path | None, s: BenchSettings) -> Path:
    """A small dataset at ``dest``: ``test`` (inference records) and ``train`` (training, cache) splits of
    both tasks, copied from the first records of ``source`` or generated (synthetic, medium level)."""
    n_test, n_train = math.ceil(s.records / 2), math.ceil(s.train_records / 2)
    if source is None:
        from ..synth.generate import generate

        generate(dest, level="medium", sizes={"train": n_train, "test": n_test}, seed=0, workers=1, baselines=False)
        return dest
    from ..data.layout import available_splits, images_dir, read_split, write_split

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
    from ..data.layout import read_split

    splits = [read_split(root, task, "test") for task in TASKS]
    pairs = [(s, r) for group in zip(*(s.records for s in splits)) for s, r in zip(splits, group)][:n]
    return [r for _, r in pairs], [s.load_image(r) for s, r in pairs]


def build_presets(data: str, out: str, presets: dict[str, str]) -> dict:
    from ..models.registry import init_model
    from ..synth.grounding import vocabulary_texts

    words = vocabulary_texts()
    return {
        label: str(init_model(preset, data, Path(out) / preset, extra_texts=words)) for label, preset in presets.items()
    }
