"""Answer scoring: one forward pass gives, per record, the distribution over its options and a per-record
feature, in one of two readouts chosen per model and saved in its config (``hkd4vlm_readout``):

- ``letter``: the letter tokens' logits at the answer cue, ``p(i | x) = softmax_i z(x)[tok(letter_i)]``; the
  feature is the hidden state at the answer position. The paper's way, and the default: real pretrained
  VLMs already answer multiple-choice questions by letter.
- ``option``: one score per option, the logit of a fixed *verdict token* (``hkd4vlm_verdict_token``,
  "Yes" by default) at the last token of the option's text, ``p(i | x) = softmax_i s_i(x)``; the feature is
  the mean of the hidden states there. Small models trained from scratch learn it at once, where the
  letter readout needs a long plateau to form its find-and-copy circuit (docs/models.md, "Readouts"; docs/experiments.md).

The option score has one meaning in pretraining and in every task: "this option holds" (a statement is
true of the image, a verdict fits the claim). A task whose question asks for the option that does *not*
hold (hallucination detection: "Which option is hallucinated?") answers with the option scored lowest,
``p(i | x) = softmax_i(-s_i(x))`` (``option_signs``; ``data.tasks.ASKS_FOR_UNSUPPORTED``), so tuning a
base on it starts from what the base knows instead of driving every score through the uniform point.

A verdict token's logit rather than a separate head: it is a linear head over the last hidden state
that already lives in the model (the output embedding's row), so it is saved, loaded, LoRA-merged,
DDP-wrapped and sharded by the model's own code, with no extra weights file that a checkpoint could be
missing; and for a pretrained VLM the word "Yes" gives the readout a meaningful start.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..data.records import Record
from ..data.tasks import ASKS_FOR_UNSUPPORTED
from .prompt import prompt_with_option_ends

READOUTS = ("letter", "option")
#: config attributes that carry the readout with a checkpoint
READOUT_KEY = "hkd4vlm_readout"
VERDICT_KEY = "hkd4vlm_verdict_token"
DEFAULT_VERDICT_TOKEN = "Yes"

#: logit given to the letters a record does not have (finite, so that 0 * log p stays 0 in losses)
MASKED = -1e4


class LetterTokenError(ValueError):
    pass


class ReadoutError(ValueError):
    pass


@dataclass(frozen=True)
class Readout:
    kind: str = "letter"
    verdict_token: str = DEFAULT_VERDICT_TOKEN


def _config(model):
    return getattr(model, "module", model).config  # DDP wraps the model in .module; peft forwards .config


def get_readout(model) -> Readout:
    """The readout a model was trained with (``letter`` when its config names none)."""
    config = _config(model)
    kind = getattr(config, READOUT_KEY, None) or "letter"
    if kind not in READOUTS:
        raise ReadoutError(f"model config has {READOUT_KEY}={kind!r}; expected one of {READOUTS}")
    verdict = getattr(config, VERDICT_KEY, None) or DEFAULT_VERDICT_TOKEN
    if not isinstance(verdict, str):
        raise ReadoutError(f"model config has {VERDICT_KEY}={verdict!r}; expected a token (a string such as 'Yes')")
    return Readout(kind, verdict)


def set_readout(model, kind: str, verdict_token: str | None = None) -> Readout:
    """Choose the model's readout; it is written into the config and so saved with the checkpoint."""
    if kind not in READOUTS:
        raise ReadoutError(f"unknown readout {kind!r}; choose one of {READOUTS}")
    config = _config(model)
    setattr(config, READOUT_KEY, kind)
    setattr(config, VERDICT_KEY, verdict_token or getattr(config, VERDICT_KEY, None) or DEFAULT_VERDICT_TOKEN)
    return get_readout(model)


def check_readout(model, processor) -> Readout:
    """The model's readout, checked against its tokenizer before any record is scored: a known kind, and the
    token(s) it reads (the verdict token, or the first two option letters) single known tokens. ReadoutError
    or LetterTokenError (both ValueError) say what is wrong."""
    readout = get_readout(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    if readout.kind == "option":
        verdict_token_id(tokenizer, readout.verdict_token)
    else:
        letter_token_ids(tokenizer, ("A", "B"))  # every record has at least two options
    return readout


def _single_token_id(tokenizer, word: str) -> int | None:
    """The id of ``word`` as one known token, as it follows a space (" A") or on its own ("A"); None if neither."""
    for form in (f" {word}", word):
        toks = tokenizer.encode(form, add_special_tokens=False)
        if len(toks) == 1 and toks[0] != tokenizer.unk_token_id:
            return toks[0]
    return None


def verdict_token_id(tokenizer, token: str) -> int:
    """The single token id of the verdict token (" Yes" or "Yes")."""
    found = _single_token_id(tokenizer, token)
    if found is not None:
        return found
    raise ReadoutError(
        f"verdict token {token!r} is not a single known token for this tokenizer "
        f"({tokenizer.encode(token, add_special_tokens=False)}); choose one that is "
        "(set_readout(model, 'option', verdict_token=...))"
    )


def letter_token_ids(tokenizer, letters: list[str] | tuple[str, ...]) -> list[int]:
    """The single token id of each option letter as it follows the answer cue (" A" or "A")."""
    return list(_letter_ids(tokenizer, tuple(letters)))


@lru_cache(maxsize=64)
def _letter_ids(tokenizer, letters: tuple[str, ...]) -> tuple[int, ...]:
    ids = []
    for letter in letters:
        found = _single_token_id(tokenizer, letter)
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
    logits: torch.Tensor  # (B, n_options) letter logits (letter readout) or option scores (option readout)
    hidden: torch.Tensor  # (B, H) per-record feature: answer-position hidden state, or the option ends' mean
    vocab_logits: torch.Tensor | None = None  # (B, V) all logits at the answer position
    last_hidden: torch.Tensor | None = None  # (B, T, H) last-layer hidden states of the whole prompt
    input_ids: torch.Tensor | None = None  # (B, T) the prompt's tokens (image placeholders expanded)


def encode(processor, records: list[Record], images: list, options: list[list[str]] | None = None) -> dict:
    """Batch of model inputs, left padded so that the answer position is the last one."""
    return encode_prompts(processor, records, images, options)[0]


def encode_prompts(processor, records, images, options=None) -> tuple[dict, list[str], list[list[int]]]:
    """What :func:`answer_distribution` feeds the model for these records: the processor's batch (left
    padded), the prompts and, per prompt, where each option ends. Separate so that it can run ahead, in
    DataLoader workers (``encoded=``)."""
    built = [
        prompt_with_option_ends(processor, r, None if options is None else options[i]) for i, r in enumerate(records)
    ]
    texts = [t for t, _ in built]
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    batch.pop("labels", None)  # PaliGemma's processor adds them (all ignored: no suffix); the readout is ours
    return batch, texts, [e for _, e in built]


def option_end_offsets(
    tokenizer, prompts: list[str], ends: list[list[int]], input_ids: torch.Tensor
) -> list[list[int]]:
    """Per row, how many tokens follow each option's last token (``input_ids`` left padded, so a row ends on
    its last prompt token). Checked against ``input_ids``: the prompt's tail must tokenize the same on its
    own as inside the prompt, i.e. an option's end is a token boundary."""
    flat = [p[e:] for p, es in zip(prompts, ends) for e in es]
    suffix_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for row, es in enumerate(ends):
        offsets = []
        for _ in es:
            ids = suffix_ids[k]
            k += 1
            if ids and input_ids[row, -len(ids) :].tolist() != ids:
                raise ReadoutError(
                    "an option's end is not a token boundary for this tokenizer (the text after an "
                    "option tokenizes differently inside the prompt); the option readout needs one"
                )
            offsets.append(len(ids))
        out.append(offsets)
    return out


def kept_positions(offsets: list[list[int]], seq_len: int) -> torch.Tensor:
    """The sorted positions whose logits the option readout needs: every option's end and the last one."""
    return torch.tensor(sorted({seq_len - 1 - d for ds in offsets for d in ds} | {seq_len - 1}))


def option_signs(records: list[Record]) -> list[float]:
    """Per record, +1 where its question asks for the option that holds, -1 where it asks for the one that
    does not (the option readout's score always means "this option holds")."""
    return [-1.0 if r.task in ASKS_FOR_UNSUPPORTED else 1.0 for r in records]


def option_scores(
    kept: torch.Tensor,
    positions: torch.Tensor,
    seq_len: int,
    offsets: list[list[int]],
    verdict_id: int,
    n: int,
    signs: list[float] | None = None,
) -> torch.Tensor:
    """(B, n) verdict-token logits at each option's end from ``kept`` (B, K, V), the logits at ``positions``
    (K,), times the row's sign (``option_signs``: -1 where the question asks for the option that does not
    hold); a row's options beyond its own count get ``MASKED``; an open question (no options shown) gets a
    row of zeros (nothing to read; its loss does not use it)."""
    col = {int(p): j for j, p in enumerate(positions.tolist())}
    verdict = kept[:, :, verdict_id].float()  # (B, K)
    rows = []
    for b, ds in enumerate(offsets):
        idx = [col[seq_len - 1 - d] for d in ds]
        s = verdict[b, idx] if idx else verdict.new_zeros(0)
        if signs is not None and signs[b] != 1.0:
            s = s * signs[b]
        fill = MASKED if idx else 0.0
        rows.append(torch.cat([s, s.new_full((n - len(idx),), fill)]))
    return torch.stack(rows)


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


def given_image_features(batch: dict, features: torch.Tensor) -> dict:
    """Model inputs that hand ``features`` to the language model at the image tokens in place of the
    vision tower's output (transformers' ``mm_encoder_outputs``); the pixels are dropped."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    batch = {k: v for k, v in batch.items() if k != "pixel_values"}
    batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    return batch


def answer_distribution(
    model,
    processor,
    records: list[Record],
    images: list,
    *,
    temperature: float = 1.0,
    options: list[list[str]] | None = None,
    encoded: tuple[dict, list[str], list[list[int]]] | None = None,
    image_features: torch.Tensor | None = None,
) -> AnswerScores:
    """p(i | x) over each record's options in the model's readout (``get_readout``); differentiable when
    called with gradients enabled. ``encoded``: :func:`encode_prompts` of the same arguments, done ahead.
    ``image_features`` (B, image tokens, text hidden): what the image tokens hold, given instead of the
    vision tower's output (the text stage puts words there, synth.textstage); the pixels are not read.

    Records may have different option counts: the batch is scored over the letters of the longest
    one, and a record's missing letters get probability 0 (their logits are set to ``MASKED``).
    """
    counts = [len(r.choices) if options is None else len(options[i]) for i, r in enumerate(records)]
    readout = get_readout(model)
    batch, prompts, ends = encode_prompts(processor, records, images, options) if encoded is None else encoded
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # pinned: the copy overlaps
    if image_features is not None:
        batch = given_image_features(batch, image_features)
    if readout.kind == "letter":
        out = model(**batch, output_hidden_states=True, logits_to_keep=1)
        last = out.logits[:, -1, :]  # (B, V)
        letter_logits = masked_letter_logits(last, processor.tokenizer, records, counts)
        probs = torch.softmax(letter_logits / temperature, dim=-1)
        hidden = out.hidden_states[-1][:, -1, :]  # (B, H)
        return AnswerScores(
            probs=probs,
            logits=letter_logits,
            hidden=hidden,
            vocab_logits=last,
            last_hidden=out.hidden_states[-1],
            input_ids=batch["input_ids"],
        )
    seq_len = batch["input_ids"].shape[1]
    offsets = option_end_offsets(processor.tokenizer, prompts, ends, batch["input_ids"])
    positions = kept_positions(offsets, seq_len)
    out = model(**batch, output_hidden_states=True, logits_to_keep=positions.to(device))
    vid = verdict_token_id(processor.tokenizer, readout.verdict_token)
    scores = option_scores(out.logits, positions, seq_len, offsets, vid, max(counts), option_signs(records))
    probs = torch.softmax(scores / temperature, dim=-1)
    last_hidden = out.hidden_states[-1]  # (B, T, H)
    hidden = torch.stack(
        [
            last_hidden[b, [seq_len - 1 - d for d in ds]].mean(0) if ds else last_hidden[b, -1]
            for b, ds in enumerate(offsets)
        ]
    )  # (B, H)
    return AnswerScores(
        probs=probs,
        logits=scores,
        hidden=hidden,
        vocab_logits=out.logits[:, -1, :],
        last_hidden=last_hidden,
        input_ids=batch["input_ids"],
    )
