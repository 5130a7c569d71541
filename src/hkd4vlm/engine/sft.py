"""Supervised fine-tuning (SFT), the pieces a run needs: records of a dataset split, the cross-entropy stage, accuracy on the eval split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.layout import read_split
from ..data.tasks import Task
from .config import TrainConfig
from .loop import train
from .sources import RecordSource


def split_eval(
    root: str | Path,
    tasks: Sequence[Task],
    split: str,
    *,
    limit: int | None = None,
    batch_size: int = 64,
    skip_invalid: bool = False,
):
    """An evaluate callback: accuracy on ``split`` of each task (and their mean)."""
    from ..infer.predict import accuracy, predict_split

    splits = [read_split(root, task, split, skip_invalid=skip_invalid) for task in tasks]
    for s in splits:
        if s.skipped:
            n = len({(p.file, p.record) for p in s.skipped})
            print(
                f"--skip-invalid: {n} invalid record(s) of {s.task}/{s.name} left out of evaluation "
                f"({len(s.skipped)} problem(s)):"
            )
            for p in s.skipped:
                print(f"  {p}")

    def evaluate(model, processor) -> dict:
        out = {}
        for s in splits:
            out[f"accuracy_{s.task}"] = accuracy(predict_split(model, processor, s, batch_size=batch_size, limit=limit))
        out["accuracy"] = sum(out.values()) / len(out)
        return out

    return evaluate


def run_sft(cfg: TrainConfig, *, resume: bool = False, **kwargs) -> Path:
    source = RecordSource(
        cfg.data.root,
        cfg.data.tasks,
        cfg.data.split,
        augment=cfg.augment,
        seed=cfg.seed,
        skip_invalid=cfg.data.skip_invalid,
    )
    evaluate = None
    if cfg.data.eval_split:
        evaluate = split_eval(
            cfg.data.root,
            cfg.data.tasks,
            cfg.data.eval_split,
            limit=cfg.data.eval_limit,
            skip_invalid=cfg.data.skip_invalid,
        )
    return train(cfg, source, evaluate=evaluate, resume=resume, **kwargs)
