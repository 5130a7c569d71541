"""Classification metrics the way the challenge's scorers compute them: per letter (A-D) precision,
recall and F1, macro-F1, micro-F1, accuracy; plus expected calibration error and position bias."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def per_letter(gold: Sequence[str], pred: Sequence[str], letters: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each letter (0 where undefined, as scikit-learn's zero_division=0)."""
    out = {}
    for letter in letters:
        tp = sum(g == letter and p == letter for g, p in zip(gold, pred))
        fp = sum(g != letter and p == letter for g, p in zip(gold, pred))
        fn = sum(g == letter and p != letter for g, p in zip(gold, pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[letter] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """ECE with equal-width confidence bins: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return 0.0
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)  # conf = 1.0 falls in the last bin
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(hit[mask].mean() - conf[mask].mean())
    return float(ece)


def confusion_matrix(gold: Sequence[str], pred: Sequence[str], letters: Sequence[str]) -> list[list[int]]:
    """Rows: gold letter; columns: predicted letter."""
    index = {letter: i for i, letter in enumerate(letters)}
    m = [[0] * len(letters) for _ in letters]
    for g, p in zip(gold, pred):
        if g in index and p in index:
            m[index[g]][index[p]] += 1
    return m


def classification_report(
    gold: Sequence[str],
    pred: Sequence[str],
    *,
    confidence: Sequence[float] | None = None,
    letters: Sequence[str] | None = None,
) -> dict:
    """All metrics for gold and predicted letters (and the predicted letters' probabilities, for ECE)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    letters = list(letters) if letters is not None else sorted(set(gold) | set(pred))
    table = per_letter(gold, pred, letters)
    n = len(gold)
    correct = [g == p for g, p in zip(gold, pred)]
    counts = Counter(pred)
    report = {
        "n": n,
        "accuracy": sum(correct) / n if n else 0.0,
        "macro_f1": float(np.mean([t["f1"] for t in table.values()])) if table else 0.0,
        # single-label multi-class: micro-F1 equals accuracy when every prediction is a valid letter
        "micro_f1": _micro_f1(gold, pred, letters),
        "per_letter": table,
        "prediction_share": {letter: counts.get(letter, 0) / n if n else 0.0 for letter in letters},
        "gold_share": {letter: sum(g == letter for g in gold) / n if n else 0.0 for letter in letters},
        "confusion_matrix": {"letters": letters, "matrix": confusion_matrix(gold, pred, letters)},
    }
    if confidence is not None:
        report["ece"] = expected_calibration_error(confidence, correct)
    return report


def _micro_f1(gold: Sequence[str], pred: Sequence[str], letters: Sequence[str]) -> float:
    tp = sum(g == p and p in letters for g, p in zip(gold, pred))
    fp = sum(g != p and p in letters for g, p in zip(gold, pred))
    fn = sum(g != p and g in letters for g, p in zip(gold, pred))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
