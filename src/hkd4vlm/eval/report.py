"""Evaluating a predictions JSONL: the metrics of ``eval.metrics`` and a confusion-matrix plot."""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import classification_report

REQUIRED = ("image", "pred_ans", "choice")


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions JSONL; a malformed line is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: record {row.get('image', '?')!r} lacks field(s) {missing}")
            if not isinstance(row["pred_ans"], str) or not row["pred_ans"][:1].isalpha():
                raise ValueError(f"{path}:{n}: record {row['image']!r}: pred_ans {row['pred_ans']!r} does not start with a letter")
            rows.append(row)
    return rows


def pred_letter(row: dict) -> str:
    """The predicted letter: ``pred_letter`` if present, else what ``pred_ans`` ("B: ...") starts with."""
    return row.get("pred_letter") or row["pred_ans"].split(":", 1)[0].strip()


def evaluate_predictions(rows: list[dict], source: str = "predictions") -> dict:
    labelled = [r for r in rows if r.get("choice")]
    if not labelled:
        raise ValueError(f"{source}: no record has a gold letter ('choice'); nothing to evaluate")
    gold = [r["choice"] for r in labelled]
    pred = [pred_letter(r) for r in labelled]
    letters = sorted({l for r in labelled for l in r.get("probs", {})} | set(gold) | set(pred))
    confidence = None
    if all("probs" in r for r in labelled):
        confidence = [float(r["probs"].get(p, 0.0)) for r, p in zip(labelled, pred)]
    report = classification_report(gold, pred, confidence=confidence, letters=letters)
    report["unlabelled"] = len(rows) - len(labelled)
    return report


def plot_confusion(report: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    letters = report["confusion_matrix"]["letters"]
    m = np.asarray(report["confusion_matrix"]["matrix"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(letters), 1.0 + 0.8 * len(letters)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(letters)), letters)
    ax.set_yticks(range(len(letters)), letters)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(letters)):
        for j in range(len(letters)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(title or f"accuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
