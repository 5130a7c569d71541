"""Prediction over a split: one answer-scoring pass per batch, exported as the JSONL other teams' scorers
read (``image, question, answer, choice, pred_ans, status``) plus the per-option probabilities.

``status`` is the *inference* status, as those scorers read it: ``"success"``, or ``"error"`` for a record
that could not be scored (the reason in ``error``; such a record counts as wrong). Whether the prediction
is right is its own field, ``correct`` (null when the record has no gold letter). No line holds a NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.layout import Split
from ..data.records import Record
from ..files import write_text_atomic
from ..models.scoring import answer_distribution
from .msei import Aggregate, MappingSpec, score_shifts
from .sharding import Processes, gather_parts


@dataclass
class Prediction:
    image: str
    question: str
    answer: str | None  # gold option text, when known
    choice: str | None  # gold letter, when known
    pred_ans: str  # "B: red circle"; "" when status is "error"
    pred_letter: str | None
    status: str  # "success", or "error" when the record could not be scored (why: ``error``)
    correct: bool | None  # pred_letter == choice; None when unlabelled; False for a labelled "error"
    probs: dict[str, float] | None  # letter -> probability; None when status is "error"
    task: str
    agreement: float | None = None  # mapping-shift inference: share of mappings that voted for the prediction
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, allow_nan=False)


def question_of(record: Record) -> str:
    return record.system2_question if record.task == "hallucination" else record.question


def to_prediction(
    record: Record, probs: list[float], *, winner: int | None = None, agreement: float | None = None
) -> Prediction:
    labelled = record.correct_choice is not None
    common: dict[str, Any] = dict(
        image=record.image_id,
        question=question_of(record),
        answer=record.correct_answer,
        choice=record.correct_choice,
        task=record.task,
    )
    if not all(math.isfinite(p) for p in probs) or (agreement is not None and not math.isfinite(agreement)):
        return Prediction(
            **common,
            pred_ans="",
            pred_letter=None,
            status="error",
            correct=False if labelled else None,
            probs=None,
            error=f"the model gave non-finite probabilities {[float(p) for p in probs]}",
        )
    best = max(range(len(probs)), key=probs.__getitem__) if winner is None else winner
    letter = record.letters[best]
    return Prediction(
        **common,
        pred_ans=f"{letter}: {record.options[best]}",
        pred_letter=letter,
        status="success",
        correct=letter == record.correct_choice if labelled else None,
        probs={letter: float(p) for letter, p in zip(record.letters, probs)},
        agreement=agreement,
    )


#: the most tokens (the model's tokenizer) a record's text fields may hold together, as the service's
#: ``--max-request-tokens`` default: the model's time and memory grow with the prompt
MAX_RECORD_TOKENS = 2_048


def check_record_tokens(split: Split, records: list[Record], processor, max_tokens: int) -> None:
    """DatasetError naming the file, record and field of every record whose text fields pass ``max_tokens``
    together (the field at which the count passes it)."""
    from ..data.layout import split_file
    from ..data.records import DatasetError, Problem
    from .detector import record_text_fields

    tokenizer = getattr(processor, "tokenizer", processor)
    problems = []
    for r in records:
        fields = record_text_fields(r)
        counts = [len(ids) for ids in tokenizer([t for _, t in fields], add_special_tokens=False)["input_ids"]]
        total = 0
        for (name, _), n in zip(fields, counts):
            total += n
            if total > max_tokens:
                problems.append(
                    Problem(
                        str(split_file(split.root, split.task, split.name)),
                        r.image_id,
                        name,
                        f"the record's text reaches {sum(counts):,} tokens, over the limit of {max_tokens:,} for "
                        "all its text fields together (predict --max-record-tokens)",
                    )
                )
                break
    if problems:
        raise DatasetError(problems)


def predict_split(
    model,
    processor,
    split: Split,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = False,
    spec: MappingSpec = MappingSpec(1),
    aggregate: Aggregate = "logmean",
    max_record_tokens: int | None = MAX_RECORD_TOKENS,
    procs: Processes | None = None,
) -> list[Prediction]:
    """Predictions for every record of ``split`` (in order), scored ``batch_size`` records at a time.

    ``procs`` (``infer.sharding.processes()`` under ``accelerate launch``): this process scores only its
    share of the batches and every process returns the merged list, the same as one process's.

    ``spec``: the option→letter mappings to score each record under, aggregated (mapping-shift inference,
    with prefix reuse; the predictions then carry the mappings' agreement). A spec of one mapping
    (``MappingSpec(1)``, the default) is one plain pass. A record whose text passes ``max_record_tokens``
    (None: no bound) is refused before anything is scored (DatasetError naming it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    records = split.records[:limit] if limit else split.records
    if max_record_tokens is not None:
        check_record_tokens(split, records, processor, max_record_tokens)
    procs = procs or Processes()
    starts = range(0, len(records), batch_size)
    mine = procs.mine(len(starts))
    parts: dict[int, list[Prediction]] = {}
    bar = None
    if progress and procs.is_main:
        from tqdm.auto import tqdm

        desc = f"predict {split.task}/{split.name}" + (f" (process 0 of {procs.world})" if procs.world > 1 else "")
        bar = tqdm(total=sum(len(records[starts[b] : starts[b] + batch_size]) for b in mine), desc=desc, unit="rec")
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for b in mine:
            chunk = records[starts[b] : starts[b] + batch_size]
            out: list[Prediction] = []
            parts[b] = out
            images = [split.load_image(r) for r in chunk]
            if spec.is_plain:
                probs = answer_distribution(model, processor, chunk, images).probs
                for r, p in zip(chunk, probs.cpu().tolist()):
                    out.append(to_prediction(r, p[: len(r.choices)]))
            else:
                res = score_shifts(model, processor, chunk, images, spec=spec, how=aggregate)
                for i, r in enumerate(chunk):
                    out.append(
                        to_prediction(
                            r,
                            res.probs[i, : len(r.choices)].tolist(),
                            winner=int(res.winner[i]),
                            agreement=float(res.agreement[i]),
                        )
                    )
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return [p for part in gather_parts(procs, parts) for p in part]


def write_jsonl(preds: list[Prediction], path: str | Path) -> Path:
    """Write the predictions JSONL atomically (files.write_text_atomic: no partial file, even on a full disk)."""
    return write_text_atomic(path, "".join(p.to_json() + "\n" for p in preds))


def accuracy(preds: list[Prediction]) -> float:
    """Share of the labelled predictions that are correct (one that could not be scored counts as wrong)."""
    labelled = [p for p in preds if p.correct is not None]
    return sum(bool(p.correct) for p in labelled) / len(labelled) if labelled else 0.0
