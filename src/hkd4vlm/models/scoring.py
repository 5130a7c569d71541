"""Answer scoring: one forward pass gives, per record, the distribution over the option letters and
the hidden state at the answer position (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..data.records import Record
from .prompt import build_prompt


#: logit given to the letters a record does not have (finite, so that 0 * log p stays 0 in losses)
MASKED = -1e4


class LetterTokenError(ValueError):
    pass


def letter_token_ids(tokenizer, letters: list[str] | tuple[str, ...]) -> list[int]:
    """The single token id of each option letter as it follows the answer cue (" A" or "A")."""
    return list(_letter_ids(tokenizer, tuple(letters)))


@lru_cache(maxsize=64)
def _letter_ids(tokenizer, letters: tuple[str, ...]) -> tuple[int, ...]:
    ids = []
    for letter in letters:
        found = None
        for form in (f" {letter}", letter):
            toks = tokenizer.encode(form, add_special_tokens=False)
            if len(toks) == 1 and toks[0] != tokenizer.unk_token_id:
                found = toks[0]
                break
        if found is None:
            raise LetterTokenError(
                f"option letter {letter!r} is not a single token for this tokenizer "
                f"({tokenizer.encode(f' {letter}', add_special_tokens=False)} / {tokenizer.encode(letter, add_special_tokens=False)}); "
                "answer scoring reads one logit per letter, so use a tokenizer with single-token capital letters"
            )
        ids.append(found)
    if len(set(ids)) != len(ids):
        raise LetterTokenError(f"option letters {letters} do not map to distinct tokens: {ids}")
    return tuple(ids)


@dataclass
class AnswerScores:
    probs: torch.Tensor  # (B, n_options) answer distribution
    logits: torch.Tensor  # (B, n_options) letter logits
    hidden: torch.Tensor  # (B, H) last-layer hidden state at the answer position
    vocab_logits: torch.Tensor | None = None  # (B, V) all logits at the answer position


def encode(processor, records: list[Record], images: list, options: list[list[str]] | None = None) -> dict:
    """Batch of model inputs, left padded so that the answer position is the last one."""
    texts = [build_prompt(processor, r, None if options is None else options[i]) for i, r in enumerate(records)]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def masked_letter_logits(last: torch.Tensor, tokenizer, records: list[Record], counts: list[int]) -> torch.Tensor:
    """(B, n) logits of the option letters from the answer position's (B, V) logits, n the most options in
    the batch; row i's letters beyond ``counts[i]`` get ``MASKED``."""
    n = max(counts)
    letters = next(r.letters for r, c in zip(records, counts) if c == n)[:n]
    ids = torch.tensor(letter_token_ids(tokenizer, letters), device=last.device)
    letter_logits = last[:, ids].float()
    if min(counts) < n:
        missing = torch.arange(n, device=last.device)[None, :] >= torch.tensor(counts, device=last.device)[:, None]
        letter_logits = letter_logits.masked_fill(missing, MASKED)
    return letter_logits


def answer_distribution(model, processor, records: list[Record], images: list, *, temperature: float = 1.0,
                        options: list[list[str]] | None = None) -> AnswerScores:
    """p(i | x) = softmax_i z(x)[tok(letter_i)] at the answer position; differentiable when called with
    gradients enabled.

    Records may have different option counts: the batch is scored over the letters of the longest
    one, and a record's missing letters get probability 0 (their logits are set to ``MASKED``).
    """
    counts = [len(r.choices) if options is None else len(options[i]) for i, r in enumerate(records)]
    batch = encode(processor, records, images, options)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(**batch, output_hidden_states=True, logits_to_keep=1)
    last = out.logits[:, -1, :]  # (B, V)
    letter_logits = masked_letter_logits(last, processor.tokenizer, records, counts)
    probs = torch.softmax(letter_logits / temperature, dim=-1)
    hidden = out.hidden_states[-1][:, -1, :]  # (B, H)
    return AnswerScores(probs=probs, logits=letter_logits, hidden=hidden, vocab_logits=last)
