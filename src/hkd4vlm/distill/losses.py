"""Distillation losses as functions over tensors (docs/method.md), and the registry that recipes pick a
divergence from by name (``loss: {name: generalized_jsd, kwargs: {beta: 0.5}}`` in a PPOD or TCRD stage).

Conventions, shared by every divergence here:

- ``student_logits``: ``(B, n)`` (or ``(..., n)``) logits over the ``n`` classes (the option letters);
  the student's distribution is ``softmax(student_logits / tau)``.
- The target is either ``teacher_logits`` (same shape; ``softmax(teacher_logits / tau)``) or
  ``teacher_probs``, a distribution already at temperature τ (a mixture of teachers, a rectified
  teacher), used as it is. The τ² factor that keeps gradient sizes comparable across temperatures is
  applied by the stages, not here.
- ``mask``: optional ``(B,)`` bool, True for the samples that count.
- ``reduction``: ``"mean"`` over the counted samples (a finite 0 when none count) or ``"none"`` for the
  per-sample values ``(B,)`` (0 where masked).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: name -> divergence ``fn(student_logits, teacher_logits=None, *, teacher_probs=None, tau, mask, reduction, **kw)``
LOSSES: dict[str, Callable] = {}
#: the arguments every registered divergence takes; the others are its own settings (``kwargs`` in a recipe)
COMMON_ARGS = frozenset({"student_logits", "teacher_logits", "teacher_probs", "tau", "mask", "reduction"})


def register_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a divergence selectable by ``name`` in a recipe (``get_loss(name)``)."""

    def add(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name].__qualname__})")
        missing = {"student_logits", "teacher_logits", "teacher_probs", "tau"} - set(inspect.signature(fn).parameters)
        if missing:
            raise TypeError(f"loss {name!r} must take {sorted(missing)} like the divergences in distill.losses")
        LOSSES[name] = fn
        return fn

    return add


def get_loss(name: str) -> Callable:
    """The divergence registered as ``name``; an unknown name is an error that lists the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None


def loss_settings(name: str) -> dict[str, object]:
    """A registered loss's own settings (the ``kwargs`` a recipe may give) -> default value."""
    params = inspect.signature(get_loss(name)).parameters.values()
    return {p.name: p.default for p in params if p.name not in COMMON_ARGS and p.kind is not p.VAR_KEYWORD}


def _reduce(per_sample: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if mask is not None:
        per_sample = torch.where(mask, per_sample, torch.zeros_like(per_sample))
    if reduction == "none":
        return per_sample
    count = per_sample.numel() if mask is None else mask.sum()
    return per_sample.sum() / torch.clamp(torch.as_tensor(count, device=per_sample.device), min=1)


def _log_probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return F.log_softmax(logits.float() / tau, dim=-1)


def _target_log_probs(
    teacher_logits: torch.Tensor | None, teacher_probs: torch.Tensor | None, tau: float
) -> torch.Tensor:
    """log p_T: from logits at temperature τ, or from a distribution given as it is (renormalised, with
    probabilities floored at 1e-12 so that a zero stays finite)."""
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError("give exactly one of teacher_logits and teacher_probs")
    if teacher_probs is None:
        assert teacher_logits is not None  # exactly one of the two is given (checked above)
        return _log_probs(teacher_logits, tau)
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return F.log_softmax(torch.log(teacher_probs.float().clamp_min(1e-12)), dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim, from log-probabilities; 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


@register_loss("forward_kl")
def forward_kl(
    student_logits, teacher_logits=None, *, teacher_probs=None, tau: float = 1.0, mask=None, reduction: str = "mean"
):
    """KL(p_T ‖ p_S): mass-covering, the classic distillation loss (Hinton et al., 2015)."""
    per = _kl(_target_log_probs(teacher_logits, teacher_probs, tau), _log_probs(student_logits, tau))
    return _reduce(per, mask, reduction)


@register_loss("reverse_kl")
def reverse_kl(
    student_logits, teacher_logits=None, *, teacher_probs=None, tau: float = 1.0, mask=None, reduction: str = "mean"
):
    """KL(p_S ‖ p_T): mode-seeking (MiniLLM)."""
    per = _kl(_log_probs(student_logits, tau), _target_log_probs(teacher_logits, teacher_probs, tau))
    return _reduce(per, mask, reduction)


@register_loss("generalized_jsd")
def generalized_jsd(
    student_logits,
    teacher_logits=None,
    beta: float = 0.5,
    tau: float = 1.0,
    *,
    teacher_probs=None,
    mask=None,
    reduction: str = "mean",
):
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024, Eq. 1; as TRL computes it):
    β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m) with m = β·p_T + (1−β)·p_S; β=0 is KL(p_T ‖ p_S) (forward),
    β=1 is KL(p_S ‖ p_T) (reverse)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    log_s, log_t = _log_probs(student_logits, tau), _target_log_probs(teacher_logits, teacher_probs, tau)
    if beta == 0.0:
        per = _kl(log_t, log_s)
    elif beta == 1.0:
        per = _kl(log_s, log_t)
    else:
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
        per = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    return _reduce(per, mask, reduction)


@register_loss("total_variation")
def total_variation(
    student_logits, teacher_logits=None, *, teacher_probs=None, tau: float = 1.0, mask=None, reduction: str = "mean"
):
    """½ Σ_i |p_T(i) − p_S(i)|, in [0, 1]."""
    p_s = _log_probs(student_logits, tau).exp()
    p_t = _target_log_probs(teacher_logits, teacher_probs, tau).exp()
    return _reduce(0.5 * (p_t - p_s).abs().sum(-1), mask, reduction)


@register_loss("skew_kl")
def skew_kl(
    student_logits,
    teacher_logits=None,
    alpha: float = 0.1,
    *,
    teacher_probs=None,
    tau: float = 1.0,
    mask=None,
    reduction: str = "mean",
):
    """Skew KL (DistiLLM, Ko et al. 2024): KL(p_T ‖ α·p_T + (1−α)·p_S); α=0 is forward KL, and the skew
    keeps the loss and its gradient bounded where the student puts no mass."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    log_s, log_t = _log_probs(student_logits, tau), _target_log_probs(teacher_logits, teacher_probs, tau)
    if alpha == 0.0:
        log_mix = log_s
    else:
        log_mix = torch.logsumexp(torch.stack([log_t + math.log(alpha), log_s + math.log1p(-alpha)]), dim=0)
    return _reduce(_kl(log_t, log_mix), mask, reduction)


class FeatureProjector(nn.Module):
    """A learned linear map from the student's hidden size to the target's (identity-initialised when the
    sizes agree), for feature distillation between models of different widths."""

    def __init__(self, student_dim: int, target_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, target_dim)
        if student_dim == target_dim:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(student_dim))
                self.proj.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, H_s) -> (B, H_t)
        return self.proj(hidden)


def feature_cosine(
    student_hidden, target_hidden, projector: nn.Module | None = None, *, mask=None, reduction: str = "mean"
):
    """1 − cos(P·h_S, h_T) per sample; ``student_hidden`` (B, H_s), ``target_hidden`` (B, H_t)."""
    h = projector(student_hidden) if projector is not None else student_hidden
    per = 1 - F.cosine_similarity(h.float(), target_hidden.float(), dim=-1, eps=1e-8)
    return _reduce(per, mask, reduction)


def feature_mse(
    student_hidden, target_hidden, projector: nn.Module | None = None, *, mask=None, reduction: str = "mean"
):
    """Mean squared error between P·h_S and h_T, averaged over the hidden dimension, per sample."""
    h = projector(student_hidden) if projector is not None else student_hidden
    per = (h.float() - target_hidden.float()).pow(2).mean(-1)
    return _reduce(per, mask, reduction)


def rectify_teacher(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's distribution with the masses of its argmax and of the correct option swapped where
    the teacher is wrong (TCRD's rectified response); unchanged where it is right.

    ``probs``: (B, n) probabilities; ``labels``: (B,) correct option indices. Returns (B, n), still a
    distribution, whose argmax is the label (ties aside).
    """
    top = probs.argmax(-1)  # (B,)
    rows = torch.arange(probs.shape[0], device=probs.device)
    out = probs.clone()
    p_top, p_lab = probs[rows, top], probs[rows, labels]
    out[rows, labels] = p_top
    out[rows, top] = p_lab
    # where the teacher is right, top == labels and the two writes put back the same value
    return out
