"""Distillation stages (docs/method.md). A stage is a callable the training loop calls per micro-batch
with the student's answer scores; it returns a dict of named loss terms with ``"total"`` their
weighted sum, and the coupling weights' mean where there are any. Every term is logged.

Teachers are :class:`Teacher` (online) or ``distill.cache.CachedTeacher`` (offline); both are
:class:`AnswerTeacher` objects (``scores(items, images, keys=...)``, ``hidden_size``). Online teachers
score the same (augmented) batch as the student, in eval mode, under ``torch.inference_mode`` (no graph,
no gradient), each through its own processor, so that teacher and student may be different families:
the answer distribution is over option letters either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

import torch

from ..engine.distributed import average_gradients
from ..models.scoring import AnswerScores, answer_distribution
from .losses import FeatureProjector, feature_cosine, forward_kl, rectify_teacher


@runtime_checkable
class AnswerTeacher(Protocol):
    """What a stage needs from a teacher, online (:class:`Teacher`) or cached (``distill.cache.CachedTeacher``)."""

    name: str

    @property
    def hidden_size(self) -> int:
        """Width of the answer-position feature (``AnswerScores.hidden``'s last dim)."""
        ...

    def scores(self, items, images, *, keys=None) -> AnswerScores:
        """The answer distribution of a batch; ``keys``: its (record index, epoch) pairs."""
        ...


def model_hidden_size(model) -> int:
    """Hidden size at the answer position of a model (peft-wrapped or not)."""
    return model.config.get_text_config().hidden_size


@dataclass
class Teacher:
    """A frozen model of the pyramid and its processor (an :class:`AnswerTeacher`)."""

    model: Any
    processor: Any
    name: str = "teacher"

    def __post_init__(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return model_hidden_size(self.model)

    def scores(self, items, images, *, keys=None) -> AnswerScores:
        with torch.inference_mode():
            return answer_distribution(self.model, self.processor, items, images)


def _labels(items, device) -> torch.Tensor:
    return torch.tensor([it.label for it in items], device=device)


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    """``start`` at step 0 to ``end`` at ``total``."""
    t = min(1.0, step / max(1, total))
    return start + t * (end - start)


def pyramid_weights(n_teachers: int, gamma: float) -> list[float]:
    """w_j ∝ γ^(k−1−j) for teachers j = 1..k−1 ordered largest first; the nearest (last) weighs most.
    γ = 0 keeps only the nearest teacher (a plain chain)."""
    raw = [gamma ** (n_teachers - 1 - j) if gamma > 0 else float(j == n_teachers - 1) for j in range(n_teachers)]
    total = sum(raw)
    return [w / total for w in raw]


class PPODStage:
    """Pyramid-like Progressive Online Distillation, one level of the pyramid:

        q = Σ_j w_j · p_j^τ,   L = α · L_ce + (1 − α) · τ² · D(q ‖ p_S^τ)

    with τ and α moving linearly from their start to their end value over ``total_steps``. ``loss`` is
    the divergence D (a function of ``distill.losses``, e.g. ``get_loss(name)`` with its settings bound;
    default forward KL); the mixture q is handed to it as ``teacher_probs``.

    ``mutual_lr``: the nearest teacher keeps learning too (deep mutual learning): after scoring the
    batch for q, it takes its own AdamW step on L_ce + τ² · D(p_S^τ ‖ p_T^τ) (the same divergence with the
    roles swapped, student detached), its gradients averaged over processes. Its weights and optimizer are checkpointed through
    ``state_dict`` (pass the stage to the loop's ``stateful``).
    """

    def __init__(
        self,
        teachers: list[AnswerTeacher],
        *,
        gamma: float = 0.5,
        tau: tuple[float, float] = (4.0, 1.0),
        alpha: tuple[float, float] = (0.2, 0.5),
        total_steps: int = 1,
        mutual_lr: float | None = None,
        loss: Callable = forward_kl,
    ):
        if not teachers:
            raise ValueError("PPOD needs at least one teacher")
        self.teachers, self.weights = teachers, pyramid_weights(len(teachers), gamma)
        self.tau, self.alpha, self.total_steps, self.loss = tau, alpha, total_steps, loss
        self.mutual = None
        if mutual_lr is not None:
            nearest = teachers[-1]
            if not isinstance(nearest, Teacher):
                raise ValueError("mutual learning needs the nearest teacher online, not from a cache")
            nearest.model.train()
            params = [p for p in nearest.model.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
            self.mutual = torch.optim.AdamW(params, lr=mutual_lr)

    def _mutual_step(
        self, student_logits: torch.Tensor, items, images, tau: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score with the nearest teacher with gradients, update it, return its (detached) logits and loss."""
        nearest = cast(Teacher, self.teachers[-1])  # __init__: mutual learning needs an online nearest teacher
        assert self.mutual is not None
        scores = answer_distribution(nearest.model, nearest.processor, items, images)
        labels = _labels(items, scores.logits.device)
        loss = torch.nn.functional.cross_entropy(scores.logits, labels) + tau**2 * self.loss(
            scores.logits, student_logits.detach().to(scores.logits.device), tau=tau
        )
        self.mutual.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(p for group in self.mutual.param_groups for p in group["params"])
        self.mutual.step()
        self.mutual.zero_grad(set_to_none=True)
        return scores.logits.detach(), loss.detach()

    def state_dict(self) -> dict:
        if self.mutual is None:
            return {}
        nearest = cast(Teacher, self.teachers[-1])  # online whenever there is a mutual optimizer
        return {"teacher": nearest.model.state_dict(), "optimizer": self.mutual.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.mutual is not None and state:
            cast(Teacher, self.teachers[-1]).model.load_state_dict(state["teacher"])
            self.mutual.load_state_dict(state["optimizer"])

    def __call__(
        self, scores: AnswerScores, items, *, images, step: int = 0, keys=None, **_
    ) -> dict[str, torch.Tensor]:
        tau = linear_schedule(*self.tau, step, self.total_steps)
        alpha = linear_schedule(*self.alpha, step, self.total_steps)
        device = scores.logits.device
        q: torch.Tensor | int = 0
        terms = {}
        for j, (w, teacher) in enumerate(zip(self.weights, self.teachers)):
            if self.mutual is not None and j == len(self.teachers) - 1:
                t_logits, terms["mutual_teacher_loss"] = self._mutual_step(scores.logits, items, images, tau)
                t_logits = t_logits.to(device)
            else:
                t_logits = teacher.scores(items, images, keys=keys).logits.to(device)
            q = q + w * torch.softmax(t_logits / tau, dim=-1)  # (B, n)
        ce = torch.nn.functional.cross_entropy(scores.logits, _labels(items, device))
        kd = self.loss(scores.logits, teacher_probs=q, tau=tau)
        total = alpha * ce + (1 - alpha) * tau**2 * kd
        return {"total": total, "ce": ce, "kd": kd, "tau": torch.tensor(tau), "alpha": torch.tensor(alpha), **terms}


def coupling_weight(p_teacher: torch.Tensor, p_assistant: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """c ∈ [0, 1] per sample: √(p_T(i*) · p_A(i*)) where teacher and assistant agree and are right, else 0.

    ``p_teacher``, ``p_assistant``: (B, n); ``labels``: (B,). Where both agree on the right answer with
    confidence, distillation dominates; where they disagree (or agree on a wrong one), the ground truth does.
    """
    rows = torch.arange(labels.shape[0], device=labels.device)
    top_t, top_a = p_teacher.argmax(-1), p_assistant.argmax(-1)
    right = (top_t == labels) & (top_a == labels)
    conf = torch.sqrt(p_teacher[rows, labels] * p_assistant[rows, labels])
    return torch.where(right, conf, torch.zeros_like(conf))


class TCRDStage:
    """Ternary-Coupled Refinement Distillation:

        L = λ_gt · (1 − c) · L_ce + λ_resp · c · τ² · D(r_T ‖ p_S^τ) + λ_feat · (1 − cos(P·h_S, h_A))

    ``teacher`` gives the rectified response r_T (handed to the divergence ``loss`` as ``teacher_probs``;
    default forward KL), ``assistant`` the feature target h_A (and, with the teacher, the coupling c). ``projector`` maps the student's hidden size to the assistant's; it is
    trained with the student (pass it to the loop's ``extra_modules``).
    """

    def __init__(
        self,
        teacher: AnswerTeacher,
        assistant: AnswerTeacher,
        projector: FeatureProjector,
        *,
        tau: float = 2.0,
        lambda_gt: float = 1.0,
        lambda_resp: float = 1.0,
        lambda_feat: float = 0.5,
        rectify: bool = True,
        coupled: bool = True,
        loss: Callable = forward_kl,
    ):
        self.teacher, self.assistant, self.projector, self.loss = teacher, assistant, projector, loss
        self.tau, self.lambda_gt, self.lambda_resp, self.lambda_feat = tau, lambda_gt, lambda_resp, lambda_feat
        self.rectify, self.coupled = rectify, coupled

    def __call__(self, scores: AnswerScores, items, *, images, keys=None, **_) -> dict[str, torch.Tensor]:
        device = scores.logits.device
        labels = _labels(items, device)
        t, a = self.teacher.scores(items, images, keys=keys), self.assistant.scores(items, images, keys=keys)
        p_t = torch.softmax(t.logits.to(device) / self.tau, dim=-1)
        r_t = rectify_teacher(p_t, labels) if self.rectify else p_t
        c = (
            coupling_weight(t.probs.to(device), a.probs.to(device), labels)
            if self.coupled
            else torch.full_like(labels, 0.5, dtype=torch.float32)
        )
        ce = torch.nn.functional.cross_entropy(scores.logits, labels, reduction="none")  # (B,)
        resp = self.loss(scores.logits, teacher_probs=r_t, tau=self.tau, reduction="none")  # (B,)
        feat = feature_cosine(scores.hidden, a.hidden.to(device).float(), self.projector)
        total = (
            (self.lambda_gt * (1 - c) * ce).mean()
            + (self.lambda_resp * c * self.tau**2 * resp).mean()
            + self.lambda_feat * feat
        )
        return {"total": total, "ce": ce.mean(), "resp": resp.mean(), "feat": feat, "coupling_mean": c.mean()}
