"""Text-only baselines that must stay near chance on the synthetic benchmark.

Each is a conditional-logit classifier over the options of a record (softmax over the options of
one record, cross-entropy on the correct one), trained on the train split, scored on another split.
They see text only, never the image:

- ``bow``: hashed bag of words and bigrams of each option, crossed with the option's overlap with the
  rest of the caption/context, plus bag of words of the caption/context/claim crossed with the option
  text (so it can learn "when the claim says X, pick verdict Y");
- ``length_position``: option length in characters and words, its length rank and its position.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from ..data.records import Record

DIM = 2048
_TOKEN = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> list[str]:
    words = _TOKEN.findall(text.lower())
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:])]


def _h(s: str) -> int:
    return zlib.crc32(s.encode()) % DIM


def _record_text(r: Record) -> str:
    if r.task == "hallucination":
        return f"{r.system1_answer} {r.system2_question}"
    return f"{r.context} {r.claim} {r.question}"


def bow_features(r: Record) -> np.ndarray:
    """(n_options, DIM) features of one record."""
    n = len(r.choices)
    x = np.zeros((n, DIM), dtype=np.float32)
    context_words = set(_TOKEN.findall(_record_text(r).lower()))
    shared = _tokens(_record_text(r))
    for i, option in enumerate(r.options):
        toks = _tokens(option)
        for t in toks:
            x[i, _h("o:" + t)] += 1.0
        words = _TOKEN.findall(option.lower())
        # how much of the option the rest of the text repeats (caption mentions counted once per option)
        rest = _record_text(r).lower().replace(option.lower(), " ", 1)
        rest_words = set(_TOKEN.findall(rest))
        overlap = sum(w in rest_words for w in words) / max(len(words), 1)
        x[i, _h(f"overlap:{round(overlap * 4)}")] += 1.0
        x[i, _h(f"inctx:{sum(w in context_words for w in words)}")] += 1.0
        # crossing text and option lets a verdict depend on the wording of the claim and context
        option_key = option.lower() if r.task == "factuality" else ""
        for t in shared:
            x[i, _h(f"x:{option_key}:{t}")] += 0.25
    return x


def length_position_features(r: Record) -> np.ndarray:
    n = len(r.choices)
    x = np.zeros((n, 16), dtype=np.float32)
    chars = np.array([len(o) for o in r.options], dtype=np.float32)
    words = np.array([len(o.split()) for o in r.options], dtype=np.float32)
    ranks = np.argsort(np.argsort(chars, kind="stable"), kind="stable")
    for i in range(n):
        x[i, min(i, 5)] = 1.0
        x[i, 6 + min(int(ranks[i]), 5)] = 1.0
        x[i, 12] = chars[i] / 40.0
        x[i, 13] = words[i] / 8.0
        x[i, 14] = (chars[i] - chars.mean()) / 40.0
        x[i, 15] = 1.0 if chars[i] == chars.max() else 0.0
    return x


FEATURES = {"bow": bow_features, "length_position": length_position_features}


def _stack(records: list[Record], featurize) -> tuple[np.ndarray, np.ndarray]:
    feats = np.stack([featurize(r) for r in records])  # (N, n_options, D)
    return feats, np.array([r.label for r in records])


def train_conditional_logit(
    x: np.ndarray, y: np.ndarray, *, steps: int = 300, lr: float = 0.05, l2: float = 1e-4
) -> np.ndarray:
    """Weights of a softmax-over-options linear scorer, fitted with full-batch Adam.

    ``x`` (N, n_options, D), ``y`` (N,) the correct option; returns ``w`` (D,).
    """
    n, k, d = x.shape
    flat = x.reshape(n * k, d).astype(np.float32)
    w = np.zeros(d, dtype=np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    onehot = np.zeros((n, k), dtype=np.float32)
    onehot[np.arange(n), y] = 1.0
    for t in range(1, steps + 1):
        scores = (flat @ w).reshape(n, k)
        scores -= scores.max(axis=1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=1, keepdims=True)
        grad = flat.T @ (p - onehot).reshape(-1) / n + l2 * w
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        w -= lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return w


def baseline_accuracy(train: list[Record], test: list[Record], name: str) -> float:
    featurize = FEATURES[name]
    xtr, ytr = _stack(train, featurize)
    xte, yte = _stack(test, featurize)
    w = train_conditional_logit(xtr, ytr)
    return float(((xte @ w).argmax(axis=1) == yte).mean())


def run_baselines(train: list[Record], test: list[Record]) -> dict[str, float]:
    """Accuracy on ``test`` of each text-only baseline trained on ``train``, and of the majority letter."""
    out = {name: baseline_accuracy(train, test, name) for name in FEATURES}
    letters = [r.correct_choice for r in train]
    majority = max(set(letters), key=letters.count)
    out["majority_letter"] = float(np.mean([r.correct_choice == majority for r in test]))
    return out
