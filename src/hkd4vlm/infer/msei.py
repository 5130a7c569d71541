"""Mapping-shift-enhanced inference (docs/method.md): score a record under several option→letter mappings,
map each mapping's letter probabilities back to the options, and aggregate.

A *mapping* is a permutation ``perm`` of the record's options: letter ``j`` shows option ``perm[j]``. The
default set is the n cyclic shifts (``perm[j] = (j + k) mod n``); a subset of shifts or seeded random
permutations can be chosen instead.

Cost: the prompt puts everything shared (text, image, instruction) before the options
(models.prompt), so all mappings of a record share that prefix. ``prefix_reuse`` encodes the prefix
once per record (one forward pass that includes the vision tower), copies its KV cache to the record's
mappings and runs only the option lines and the answer cue for every mapping, all rows in one batched
call. Models whose rotary positions depend on the image layout (Qwen2-VL's M-RoPE) take the plain path:
one full pass per mapping, batched.
"""

from __future__ import annotations

import itertools
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch

from ..data.records import Record
from ..models.prompt import option_line, prompt_with_option_ends
from ..models.scoring import (
    answer_distribution,
    get_readout,
    kept_positions,
    masked_letter_logits,
    option_end_offsets,
    option_scores,
    option_signs,
    verdict_token_id,
)
from .shifts import DEFAULT_SHIFTS, Shifts, parse_shifts  # noqa: F401  (DEFAULT_SHIFTS: also read from here)

Aggregate = Literal["logmean", "mean", "vote"]
AGGREGATES = ("logmean", "mean", "vote")
#: model types whose position ids are not a plain running index (prefix reuse would need their own rope deltas),
#: and those whose prompt attends bidirectionally (a prefix encoded alone would not see the options after it)
_NO_PREFIX_REUSE = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "paligemma"}


def cyclic_shifts(n: int, shifts: Shifts | Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Cyclic mappings of ``n`` options: all n (``"all"`` or ``None``), the first ``k`` (an int), or the
    listed shifts."""
    if n < 1:
        raise ValueError("a record needs at least one option")
    if shifts is None or shifts == "all":
        ks = list(range(n))
    elif isinstance(shifts, int):
        if shifts < 1:
            raise ValueError(f"shifts must be at least 1, got {shifts}")
        ks = list(range(min(shifts, n)))
    else:
        ks = list(dict.fromkeys(int(k) % n for k in shifts))
        if not ks:
            raise ValueError("an empty list of shifts")
    return [tuple((j + k) % n for j in range(n)) for k in ks]


def random_mappings(n: int, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """The identity and ``count - 1`` further distinct random permutations of ``n`` options (seeded)."""
    total = 1
    for i in range(2, n + 1):
        total *= i
    count = min(count, total)
    rng = random.Random(f"msei:{seed}:{n}")
    out = [tuple(range(n))]
    if count > total // 2:  # small n: draw from the full list
        rest = [p for p in itertools.permutations(range(n)) if p != out[0]]
        rng.shuffle(rest)
        return out + rest[: count - 1]
    while len(out) < count:
        p = tuple(rng.sample(range(n), n))
        if p not in out:
            out.append(p)
    return out


@dataclass
class MappingSpec:
    """Which mappings to score: ``mode`` "cyclic" (``shifts``: "all" = all n, an int = the first k, or a
    list of shifts) or "random" (``shifts`` permutations, all n by default, drawn with ``seed``).
    ``shifts`` is read by :func:`parse_shifts` (so ``None`` and ``"all"`` are the same); 1 is one plain pass."""

    shifts: Shifts | Sequence[int] | None = "all"
    mode: Literal["cyclic", "random"] = "cyclic"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("cyclic", "random"):
            raise ValueError(f"mapping mode must be 'cyclic' or 'random', got {self.mode!r}")
        if isinstance(self.shifts, (list, tuple)):
            if self.mode == "random":
                raise ValueError("random mappings take a count of permutations, not a list of shifts")
        else:
            self.shifts = parse_shifts(self.shifts)

    @property
    def is_plain(self) -> bool:
        """Whether every record is scored once, under its options as given (the identity mapping only)."""
        if isinstance(self.shifts, (list, tuple)):
            return {int(k) for k in self.shifts} == {0}
        return self.shifts == 1  # random mappings start with the identity too

    def for_options(self, n: int) -> list[tuple[int, ...]]:
        if self.mode == "cyclic":
            return cyclic_shifts(n, self.shifts)
        # random mode: __post_init__ refused a list, so shifts is a count or "all"
        return random_mappings(n, n if self.shifts == "all" else int(cast(int, self.shifts)), self.seed)


@dataclass
class ShiftResult:
    """Mapping-shift scores of a batch of B records (n = the most options in the batch)."""

    probs: torch.Tensor  # (B, n) aggregated distribution over each record's options, in their own order
    winner: torch.Tensor  # (B,) index of the predicted option
    agreement: torch.Tensor  # (B,) share of mappings whose own top option is the winner
    votes: torch.Tensor  # (B,) how many mappings voted for the winner
    per_shift: list[torch.Tensor]  # per record, (K, n_r): each mapping's probabilities, mapped back to options
    mappings: list[list[tuple[int, ...]]]  # per record, the K permutations scored
    prefix_reused: bool  # whether the shared prefix was encoded once (else one full pass per mapping)


def aggregate(per_shift: torch.Tensor, how: Aggregate = "logmean") -> tuple[torch.Tensor, int, int, float]:
    """(K, n) per-mapping option probabilities → (distribution (n,), winner, votes, agreement)."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    k, n = per_shift.shape
    logmean = torch.softmax(torch.log(per_shift.clamp_min(1e-12)).mean(0), dim=-1)
    counts = torch.bincount(per_shift.argmax(-1), minlength=n).to(per_shift.dtype)
    if how == "logmean":
        dist = logmean
        winner = int(dist.argmax())
    elif how == "mean":
        dist = per_shift.mean(0)
        winner = int(dist.argmax())
    else:  # majority vote; ties go to the higher mean log-probability
        dist = counts / k
        winner = int((counts + 0.5 * logmean).argmax())
    votes = int(counts[winner])
    return dist, winner, votes, votes / k


def score_shifts(
    model,
    processor,
    records: list[Record],
    images: list,
    *,
    spec: MappingSpec | None = None,
    how: Aggregate = "logmean",
    prefix_reuse: bool = True,
) -> ShiftResult:
    """Score every record under its mappings and aggregate (call under ``torch.inference_mode``).

    Records may have different option counts; each gets the mappings of its own count.
    """
    spec = spec or MappingSpec()
    mappings = [spec.for_options(len(r.choices)) for r in records]
    rows = [(i, m) for i, ms in enumerate(mappings) for m in ms]
    row_options = [[records[i].options[j] for j in m] for i, m in rows]
    letter_probs = None
    reused = False
    if prefix_reuse and len(rows) > len(records) and _supports_prefix_reuse(model):
        letter_probs = _prefix_reuse_probs(model, processor, records, images, rows, row_options)
        reused = letter_probs is not None
    if letter_probs is None:
        letter_probs = answer_distribution(
            model, processor, [records[i] for i, _ in rows], [images[i] for i, _ in rows], options=row_options
        ).probs
    n_max = max(len(r.choices) for r in records)
    per_shift: list[list[torch.Tensor]] = [[] for _ in records]
    for (i, m), p in zip(rows, letter_probs.float().cpu()):
        back = torch.zeros(len(m))
        back[list(m)] = p[: len(m)]  # letter j showed option m[j]
        per_shift[i].append(back)
    stacked = [torch.stack(ps) for ps in per_shift]
    probs = torch.zeros(len(records), n_max)
    winner, votes, agreement = [], [], []
    for i, ps in enumerate(stacked):
        dist, w, v, a = aggregate(ps, how)
        probs[i, : len(dist)] = dist
        winner.append(w)
        votes.append(v)
        agreement.append(a)
    return ShiftResult(
        probs=probs,
        winner=torch.tensor(winner),
        agreement=torch.tensor(agreement),
        votes=torch.tensor(votes),
        per_shift=stacked,
        mappings=mappings,
        prefix_reused=reused,
    )


def _supports_prefix_reuse(model) -> bool:
    config = getattr(model, "config", None)
    types = {getattr(config, "model_type", None), getattr(getattr(config, "text_config", None), "model_type", None)}
    return not (types & _NO_PREFIX_REUSE)


def _split_prompt(prompts: list[str], image_token: str) -> int | None:
    """Where the prompts of one record's mappings stop sharing text: the cut falls at the start of a line
    (or right after the image placeholder), so that it is a token boundary; None when the image is not
    in the shared part."""
    common = os.path.commonprefix(prompts)
    cut = common.rfind("\n") + 1
    img = common.rfind(image_token)
    if img < 0:
        return None
    return max(cut, img + len(image_token))


def _prefix_reuse_probs(model, processor, records, images, rows, row_options) -> torch.Tensor | None:
    """(rows, n_max) answer probabilities (in the model's readout) with one prefix pass per record; None when
    the prompts cannot be split on a token boundary (then the caller scores every row in full)."""
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    built = [prompt_with_option_ends(processor, records[i], opts) for (i, _), opts in zip(rows, row_options)]
    prompts = [p for p, _ in built]
    by_record: dict[int, list[int]] = {}
    for r, (i, _) in enumerate(rows):
        by_record.setdefault(i, []).append(r)
    prefixes: list[str] = [""] * len(records)
    suffixes: list[str] = [""] * len(rows)
    readout = get_readout(model)
    for i, rs in by_record.items():
        cut = _split_prompt([prompts[r] for r in rs], image_token)
        if cut is None:
            return None
        if readout.kind == "option":
            # every option's end must be in the part run per mapping, even where mappings share a first option:
            # cut at the start of the first option line at the latest
            first_line = min(built[r][1][0] - len(option_line(records[i].letters[0], row_options[r][0])) for r in rs)
            cut = min(cut, first_line)
        prefixes[i] = prompts[rs[0]][:cut]
        for r in rs:
            if prompts[r][:cut] != prefixes[i]:
                return None
            suffixes[r] = prompts[r][cut:]
    # the split must not change tokenization: tokens(prefix + suffix) == tokens(prefix) + tokens(suffix).
    # Checked on each record's first mapping: the others cut the same prefix at the same place and their
    # suffixes start with the same characters (the first letter line), and pre-tokenization is local.
    # Each list goes through the tokenizer in one batched call (per-string calls cost more than a tiny model).
    pre_ids = tokenizer(prefixes)["input_ids"]
    suf_ids = tokenizer(suffixes, add_special_tokens=False)["input_ids"]
    firsts = [rs[0] for rs in by_record.values()]
    full_ids = tokenizer([prompts[r] for r in firsts])["input_ids"]
    for r, ids in zip(firsts, full_ids):
        if ids != pre_ids[rows[r][0]] + suf_ids[r]:
            warnings.warn(
                "prompt split is not a token boundary for this tokenizer; scoring every mapping in full", stacklevel=3
            )
            return None

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    batch = processor(images=images, text=prefixes, return_tensors="pt", padding=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(**batch, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    record_of_row = torch.tensor([i for i, _ in rows], device=device)
    cache.reorder_cache(record_of_row)  # one copy of the record's prefix per mapping
    prefix_mask = batch["attention_mask"][record_of_row]  # (R, P)
    p_len = prefix_mask.shape[1]

    # suffixes padded on the left, right after the prefix: every row ends on its answer position; the
    # explicit positions continue each row's prefix, so the pad gap does not move any token
    s_max = max(len(s) for s in suf_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), s_max), pad, dtype=torch.long)
    s_mask = torch.zeros((len(rows), s_max), dtype=prefix_mask.dtype)
    for r, s in enumerate(suf_ids):
        ids[r, s_max - len(s) :] = torch.tensor(s)
        s_mask[r, s_max - len(s) :] = 1
    ids, s_mask = ids.to(device), s_mask.to(device)
    start = torch.full((len(rows), 1), p_len, device=device)  # the shared prefix fills positions < P
    positions = (start + s_mask.cumsum(-1) - 1).clamp_min(0)
    attention = torch.cat([prefix_mask, s_mask], dim=1)
    counts = [len(o) for o in row_options]
    if readout.kind == "option":
        # the suffix is the prompt's tail, so an option's distance from the end is the same as in the full prompt
        offsets = option_end_offsets(tokenizer, prompts, [e for _, e in built], ids)
        keep = kept_positions(offsets, s_max)
        out = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep.to(device),
        )
        scores = option_scores(
            out.logits,
            keep,
            s_max,
            offsets,
            verdict_token_id(tokenizer, readout.verdict_token),
            max(counts),
            option_signs([records[i] for i, _ in rows]),
        )
        return torch.softmax(scores, dim=-1)
    out = model(
        input_ids=ids,
        attention_mask=attention,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    letter_logits = masked_letter_logits(out.logits[:, -1, :], tokenizer, [records[i] for i, _ in rows], counts)
    return torch.softmax(letter_logits, dim=-1)
