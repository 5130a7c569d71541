"""Supervised fine-tuning (SFT), the pieces a run needs: records of a dataset split, the cross-entropy stage, accuracy on the eval split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.layout import read_split
from ..data.tasks import Task
from .card import write_card
from .config import TrainConfig
from .distributed import barrier, is_main_process
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
    """An evaluate callback: accuracy on ``split`` of each task (``accuracy_TASK``, over ``n_TASK`` labelled
    records) and their mean (``accuracy``)."""
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
        out: dict = {}
        for s in splits:
            preds = predict_split(model, processor, s, batch_size=batch_size, limit=limit)
            out[f"accuracy_{s.task}"] = accuracy(preds)
            out[f"n_{s.task}"] = sum(p.correct is not None for p in preds)  # the records accuracy is over
        out["accuracy"] = sum(out[f"accuracy_{s.task}"] for s in splits) / len(splits)
        return out

    return evaluate


def run_sft(cfg: TrainConfig, *, resume: bool = False, **kwargs) -> Path:
    """Train ``cfg.model`` on its data with the cross-entropy stage; returns RUN/model, which holds the model
    and its card (README.md, engine.card)."""
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
    final = train(cfg, source, evaluate=evaluate, resume=resume, **kwargs)
    if is_main_process():
        write_card(final)
    barrier()
    return final
