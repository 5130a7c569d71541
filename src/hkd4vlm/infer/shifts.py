"""Mapping-shift-enhanced inference, plain version: score a record under cyclic shifts of its
option→letter mapping, map each shift's letter probabilities back to the options, and average the
log-probabilities. (Each shift is a full pass here; prefix reuse comes with the inference module.)"""

from __future__ import annotations

import torch

from ..models.scoring import answer_distribution


def shifted_options(options: list[str], k: int) -> list[str]:
    """Options under shift ``k``: letter j shows option (j + k) mod n."""
    n = len(options)
    return [options[(j + k) % n] for j in range(n)]


def msei_probs(model, processor, records, images, *, shifts: int | None = None) -> torch.Tensor:
    """(B, n) option probabilities averaged (in log space) over the first ``shifts`` cyclic shifts (all n
    by default); records in a batch must have the same option count."""
    n = len(records[0].choices)
    if any(len(r.choices) != n for r in records):
        raise ValueError("mapping-shift inference needs one option count per batch")
    k_max = n if shifts is None else min(shifts, n)
    logs = []
    for k in range(k_max):
        opts = [shifted_options(r.options, k) for r in records]
        p = answer_distribution(model, processor, records, images, options=opts).probs  # (B, n) over letters
        back = torch.empty_like(p)
        back[:, [(j + k) % n for j in range(n)]] = p  # letter j showed option (j + k) mod n
        logs.append(torch.log(back.clamp_min(1e-12)))
    return torch.softmax(torch.stack(logs).mean(0), dim=-1)
