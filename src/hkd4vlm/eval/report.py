"""Evaluating a predictions JSONL: the metrics of ``eval.metrics`` and a confusion-matrix plot."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import UserError
from ..files import atomic_path
from .metrics import classification_report

REQUIRED = ("image", "pred_ans", "choice")
#: "B: red circle" or a bare "B": one capital letter, then a colon or the end
_PRED_ANS = re.compile(r"^\s*([A-Z])\s*(?::|$)")
#: inference statuses (the peer scorers' convention); the older correctness values read as "success"
STATUSES = ("success", "error")
_LEGACY_STATUSES = ("correct", "wrong", "unlabelled")


#: the suffixes the confusion plot may be written as (matplotlib's Agg backend writes these)
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


class PredictionsError(UserError, ValueError):
    """A predictions file that cannot be evaluated; the message names the file, line, record and field."""


def _is_letter(value) -> bool:
    return isinstance(value, str) and len(value) == 1 and "A" <= value <= "Z"


def check_row(row, where: str) -> None:
    """Raise :class:`PredictionsError` for the first malformed field of one predictions line."""
    if not isinstance(row, dict):
        raise PredictionsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise PredictionsError(f"{where}: record {row.get('image', '?')!r} lacks field(s) {missing}")

    def bad(field: str, msg: str) -> PredictionsError:
        return PredictionsError(f"{where}: record {row['image']!r}: field '{field}': {msg}")

    if not isinstance(row["image"], str):
        raise PredictionsError(f"{where}: field 'image': must be a string, got {type(row['image']).__name__}")
    if row["choice"] is not None and not _is_letter(row["choice"]):
        raise bad("choice", f"must be one capital letter A-Z or null, got {row['choice']!r}")
    status = row.get("status", "success")
    if status not in STATUSES + _LEGACY_STATUSES:
        raise bad("status", f"must be one of {list(STATUSES)}, got {status!r}")
    if status == "error":  # not scored: counts as wrong whatever else the line holds
        return
    m = _PRED_ANS.match(row["pred_ans"]) if isinstance(row["pred_ans"], str) else None
    if m is None:
        raise bad(
            "pred_ans", f'{row["pred_ans"]!r} does not start with one capital letter and a colon ("B: red circle")'
        )
    letter = row.get("pred_letter")
    if letter is not None:
        if not _is_letter(letter):
            raise bad("pred_letter", f"must be one capital letter A-Z, got {letter!r}")
        if letter != m.group(1):
            raise bad("pred_letter", f"{letter!r} disagrees with pred_ans {row['pred_ans']!r}")
    probs = row.get("probs")
    if probs is not None:
        if not isinstance(probs, dict):
            raise bad("probs", f"must be an object letter -> probability, got {type(probs).__name__}")
        for k, p in probs.items():
            if not _is_letter(k):
                raise bad("probs", f"key {k!r} is not one capital letter A-Z")
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 <= p <= 1:
                raise bad(f"probs.{k}", f"{p!r} is not a probability (a finite number in [0, 1])")


def read_predictions(path: str | Path) -> list[dict]:
    """Rows of a predictions JSONL; a malformed line is an error naming the file, line, record and field."""
    rows = []
    seen: dict[tuple, int] = {}  # (task, image) -> line: a record predicted twice would be scored twice
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PredictionsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PredictionsError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        except (RecursionError, ValueError) as e:  # nested too deeply; an integer of too many digits
            raise PredictionsError(
                f"{path}:{n}: JSON that cannot be read ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        check_row(row, f"{path}:{n}")
        key = (row.get("task"), row["image"])
        if key in seen:
            raise PredictionsError(
                f"{path}:{n}: record {row['image']!r} is predicted again (first at line {seen[key]}); each record "
                "must be scored once"
            )
        seen[key] = n
        rows.append(row)
    return rows


def pred_letter(row: dict) -> str:
    """The predicted letter: ``pred_letter`` if present, else what ``pred_ans`` ("B: ...") starts with; ""
    for a line whose status is "error" (it was not scored)."""
    if row.get("status") == "error":
        return ""
    if row.get("pred_letter"):
        return row["pred_letter"]
    m = _PRED_ANS.match(row["pred_ans"])
    assert m is not None  # check_row (read_predictions) refuses a pred_ans that does not match
    return m.group(1)


def evaluate_predictions(rows: list[dict], source: str = "predictions") -> dict:
    """Metrics over the lines with a gold letter; a line with status "error" counts as a wrong prediction."""
    labelled = [r for r in rows if r.get("choice")]
    if not labelled:
        raise PredictionsError(f"{source}: no record has a gold letter ('choice'); nothing to evaluate")
    gold = [r["choice"] for r in labelled]
    pred = [pred_letter(r) for r in labelled]
    letters = sorted({letter for r in labelled for letter in (r.get("probs") or {})} | set(gold) | set(pred) - {""})
    confidence = None
    if all(r.get("probs") is not None or r.get("status") == "error" for r in labelled):
        # an unscored line has no confidence in any letter
        confidence = [float((r.get("probs") or {}).get(p, 0.0)) for r, p in zip(labelled, pred)]
    report = classification_report(gold, pred, confidence=confidence, letters=letters)
    report["unlabelled"] = len(rows) - len(labelled)
    report["errors"] = sum(r.get("status") == "error" for r in labelled)
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
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # written whole, then renamed: never a half-written plot
            fig.savefig(tmp, dpi=100, format=path.suffix[1:] or "png")
    finally:
        plt.close(fig)
    return path
