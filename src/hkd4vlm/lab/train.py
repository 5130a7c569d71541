"""Training a language model on a rung: fresh examples every step, a fixed held-out set, a curve.

The model is a real ``transformers`` causal LM built from config (Qwen2, as the LLaVA presets' text model;
Llama, as Idefics3's; LFM2, whose short convolutions alternate with attention), at any width and depth or
at a registered preset's text sizes. The answer is read at the last position as logits over the rung's
answer words. The held-out examples are drawn from a string seed, the training stream from an integer
seed, so the two streams never share a generator state.

    result = run_rung(LabConfig(rung="retrieve", layout="ask-first", steps=3000), out="runs/lab/x")
    result.steps_to[0.9]   # first evaluated step at >= 0.90 held-out, or None
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..files import write_text_atomic
from .rungs import ANSWER, AT_STOPS, DENSE_HOPS, GRID, Example, get_rung, words

if TYPE_CHECKING:
    from torch import Tensor

THRESHOLDS = (0.9, 0.95)
#: the text model of each registered VLM family
TEXT_FAMILY = {"llava": "qwen2", "idefics3": "llama", "paligemma": "gemma", "paligemma-qwen2": "qwen2"}
#: the VLM families whose prompt attends bidirectionally (the lab's prefix attention)
PREFIX_FAMILIES = {"paligemma", "paligemma-qwen2"}
SPECIALS = ("<pad>", "<unk>", "<bg>")
#: examples drawn (from a fixed seed) to build a rung's vocabulary, beside its answer words
VOCAB_DRAWS = 3000


class LabConfig(BaseModel):
    """One lab run. ``rung`` may name several rungs joined by ``+`` (a mixture, drawn uniformly)."""

    model_config = ConfigDict(extra="forbid")

    rung: str
    layout: str = "ask-first"
    cue: bool = True  # end with "Answer :" (the answer is read there); else at the last segment's last token
    scene: Literal["words", "grid"] = "words"  # a scene written out, or placed on the image's patch grid
    # qwen3: Qwen2 with each head's queries and keys RMS-normalised (QK-norm) and no projection biases
    family: Literal["qwen2", "qwen3", "llama", "lfm2", "gemma"] = "qwen2"
    # causal, or bidirectional over the whole prompt as PaliGemma attends over image and prompt (a prefix LM);
    # None: a preset's family's (prefix for PaliGemma), else causal
    attention: Literal["causal", "prefix"] | None = None
    init_from: str | None = None  # a finished run's --out: start from its model (its sizes replace the fields below)
    preset: str | None = None  # a registered preset: its text sizes and family replace the fields below
    layers: int = Field(2, ge=1)
    hidden: int = Field(64, ge=8)
    heads: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    # the rate of the input-like weights, whose fan-in does not grow with width (the input embeddings, norms,
    # biases, LFM2's per-channel convolutions), as muP for Adam keeps them at the base rate while the hidden and
    # output matrices' rate shrinks with width; None: lr
    input_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    # the MLP's matrices' rate (gate, up and down projections; LFM2's w1, w2, w3), apart from attention's and
    # the output's; None: lr
    mlp_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    batch_size: int = Field(64, ge=1)
    steps: int = Field(2000, ge=1)
    warmup: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    init_std: float | None = Field(
        None, gt=0, allow_inf_nan=False
    )  # the config's initializer_range (transformers' default 0.02)
    # the weights that write into the residual stream (attention's output projection, the MLP's down
    # projection) initialised at the std scaled down by depth: "gpt2" / sqrt(2 x layers), as GPT-2 and Megatron
    # do; "depth" / sqrt(layers); "family" the family's own (every linear layer at the same std)
    residual_init: Literal["family", "gpt2", "depth"] = "family"
    # Qwen3 only: the initial value of QK-norm's gains (each head's query and key RMSNorm weights; the family's
    # own: 1). At 1 the normalised queries and keys give the untrained model sharp, random attention; a smaller
    # gain starts it near uniform, as a model without QK-norm starts (docs/lab.md, "QK-norm with the depth
    # initialisation, and QK-norm's gains")
    qk_norm_init: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Qwen3 only: QK-norm's gains' own rate (they set how sharp attention can be; None: with the other vectors,
    # at input_lr or lr)
    qk_norm_lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Qwen3 only, with qk_norm_init: over this many steps a scale on the normalised queries and keys rises
    # linearly from qk_norm_init to 1 (the gains themselves start at 1 and train throughout), so attention starts
    # near uniform and may be sharp later; the saved model holds the scale folded into its gains
    qk_norm_ramp: int | None = Field(None, ge=1)
    # Qwen3 only, with qk_norm_init: the head width at which qk_norm_init holds; at another head width the gains
    # start at qk_norm_init x (this / head width) ** 0.25, so that the untrained attention's largest logit,
    # sqrt(head width) x gain ** 2, is the same at every head width (the presets' heads: 32 wide at S and M, 48 at L)
    qk_norm_head_width: int | None = Field(None, ge=1)
    # Gemma only: its input embeddings times the square root of its width, as Gemma does (False: times 1)
    embed_scale: bool = True
    lm_weight: float = Field(
        0.0, ge=0, allow_inf_nan=False
    )  # a next-token loss on every prompt token, beside the answer's
    hop_weight: float = Field(
        0.0, ge=0, allow_inf_nan=False
    )  # the intermediate targets' loss (rungs with hops: fact), beside the answer's
    sentence_hops: bool = False  # also train the matching hops (fact: one per context sentence)
    binding_hops: bool = False  # also train the binding hops (fact: each sentence's own colour and person)
    # also train the colour the name is looked up by where it is looked up (fact: the claimed shape's, at the
    # context's last word; retrieve: the asked one, where the answer is read)
    carry_hop: bool = False
    eval_every: int = Field(250, ge=1)
    held_out: int = Field(256, ge=1)
    stop_at: float | None = Field(None, gt=0, le=1)  # stop once held-out accuracy reaches this
    seed: int = 0

    @model_validator(mode="after")
    def _known(self) -> LabConfig:
        for name in self.rungs:
            rung = get_rung(name)
            if self.layout not in rung.layouts:
                raise ValueError(f"rung {name!r} has no layout {self.layout!r}; choose one of {sorted(rung.layouts)}")
        if self.preset is not None:
            from ..models.registry import get_preset

            get_preset(self.preset)
        if self.sentence_hops and self.binding_hops:
            raise ValueError(
                "sentence hops and binding hops sit at the same full stops among the same names: choose one"
            )
        if self.carry_hop and self.binding_hops and not self.cue and "retrieve" in self.rungs:
            raise ValueError(
                "without the cue retrieve's answer is read at the last full stop, where the binding hops' colour "
                "sits: the carry hop (the asked colour there) contradicts it, choose one"
            )
        if self.prefix and self.lm_weight:
            raise ValueError(
                "a next-token loss (lm_weight) needs causal attention: prefix attention sees the next token"
            )
        if not self.embed_scale and (self.init_from is not None or self.sizes()[0] != "gemma"):
            raise ValueError("--no-embed-scale is Gemma's (a fresh gemma family or preset): others do not scale")
        if self.residual_init != "family" and self.init_from is not None:
            raise ValueError("--residual-init sets a fresh model's initialisation: not with --init-from")
        if self.qk_norm_init is not None and (self.init_from is not None or self.sizes()[0] != "qwen3"):
            raise ValueError("--qk-norm-init sets a fresh Qwen3 model's QK-norm gains: only with --family qwen3")
        if self.qk_norm_ramp is not None and self.qk_norm_init is None:
            raise ValueError("--qk-norm-ramp raises QK-norm's scale from --qk-norm-init to 1: give --qk-norm-init")
        if self.qk_norm_head_width is not None and self.qk_norm_init is None:
            raise ValueError("--qk-norm-head-width scales --qk-norm-init by the head width: give --qk-norm-init")
        if self.qk_norm_lr is not None and self.init_from is None and self.sizes()[0] != "qwen3":
            raise ValueError("--qk-norm-lr is the rate of Qwen3's QK-norm gains: only with --family qwen3")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self

    @property
    def rungs(self) -> list[str]:
        return self.rung.split("+")

    @property
    def prefix(self) -> bool:
        """Whether every position attends to the whole prompt."""
        if self.attention is not None:
            return self.attention == "prefix"
        if self.preset is None:
            return False
        from ..models.registry import preset_family

        return preset_family(self.preset) in PREFIX_FAMILIES

    def qk_norm_start(self) -> float | None:
        """QK-norm's gains' initial value (or the ramp's start) at this config's head width."""
        if self.qk_norm_init is None or self.qk_norm_head_width is None:
            return self.qk_norm_init
        _, _, hidden, heads = self.sizes()
        return self.qk_norm_init * (self.qk_norm_head_width / (hidden // heads)) ** 0.25

    def sizes(self) -> tuple[str, int, int, int]:
        """(family, layers, hidden, heads), a preset's where one is named."""
        if self.preset is None:
            return self.family, self.layers, self.hidden, self.heads
        return preset_text_sizes(self.preset)


def preset_text_sizes(preset: str) -> tuple[str, int, int, int]:
    """(family, layers, hidden, heads) of a registered preset's text model."""
    from ..models.registry import get_preset, preset_family

    p = get_preset(preset)
    return TEXT_FAMILY[preset_family(preset)], p.text_layers, p.text_hidden, p.heads


@dataclass
class LabResult:
    config: dict
    parameters: int
    curve: list[dict] = field(default_factory=list)  # {step, loss, held_out, per_rung, seconds}
    steps_to: dict[float, int | None] = field(default_factory=dict)
    seconds: float = 0.0
    model: dict = field(default_factory=dict)  # the trained model's type and sizes (a started-from model's)

    @property
    def best(self) -> float:
        return max((p["held_out"] for p in self.curve), default=0.0)

    @property
    def final(self) -> float:
        return self.curve[-1]["held_out"] if self.curve else 0.0

    def summary(self) -> dict:
        return {
            "config": self.config,
            "parameters": self.parameters,
            "model": self.model,
            "steps_to": {f"{t:.2f}": s for t, s in self.steps_to.items()},
            "best": self.best,
            "final": self.final,
            "seconds": round(self.seconds, 1),
            "seconds_per_step": round(self.seconds / max(1, self.curve[-1]["step"] if self.curve else 1), 4),
        }


class Vocabulary:
    """Word -> id over a rung's words (drawn from a fixed seed) and its answer words; after ``base`` (the
    vocabulary of a model a run starts from, whose ids it keeps)."""

    def __init__(self, rungs: list[str], base: list[str] | None = None):
        seen: dict[str, None] = dict.fromkeys(base or SPECIALS)
        seen.update(dict.fromkeys(SPECIALS))
        seen.update(dict.fromkeys(words("Answer :")))
        for name in rungs:
            rung = get_rung(name)
            rng = random.Random(f"lab-vocab:{name}")
            for _ in range(VOCAB_DRAWS):
                ex = rung.draw(rng)
                for text in ex.segments.values():
                    seen.update(dict.fromkeys(words(text)))
                seen.update(dict.fromkeys(ex.answers))
                for hop in ex.hops:
                    seen.update(dict.fromkeys(hop.answers))
        self.ids = {w: i for i, w in enumerate(seen)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def words(self) -> list[str]:
        return list(self.ids)

    def encode(self, text: str) -> list[int]:
        unk = self.ids["<unk>"]
        return [self.ids.get(w, unk) for w in words(text)]


#: the names of the weights that write a block's output into the residual stream, in every family the lab
#: builds (Qwen2, Llama, Gemma: o_proj, down_proj; LFM2: out_proj of attention and convolution, w2)
RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "w2.weight")
#: QK-norm's gains: Qwen3's per-head RMSNorm weights of the queries and the keys
QK_NORMS = ("q_norm.weight", "k_norm.weight")


def build_lm(config: LabConfig, vocab_size: int, pad_id: int):
    """A causal LM of the config's family and sizes, randomly initialised with its seed."""
    import torch

    model = _build_lm(config, vocab_size, pad_id)
    writers = model.config.num_hidden_layers * (2 if config.residual_init == "gpt2" else 1)
    start = config.qk_norm_start()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if config.residual_init != "family" and name.endswith(RESIDUAL_OUTPUTS):
                p.mul_(writers**-0.5)
            if start is not None and config.qk_norm_ramp is None and name.endswith(QK_NORMS):
                p.fill_(start)
    return model


class QKNormRamp:
    """A scale on QK-norm's outputs (the normalised queries and keys, after their gains) that rises linearly
    from ``start`` at step 1 to 1 at step ``steps + 1`` (``LabConfig.qk_norm_ramp``): forward hooks on every
    ``q_norm`` and ``k_norm``, so the model stays a plain ``transformers`` Qwen3 model; :meth:`fold` multiplies
    the scale into the gains and removes the hooks, leaving the same function."""

    def __init__(self, model: Any, start: float, steps: int) -> None:
        self.start, self.steps, self.scale = start, steps, start
        self.norms = [m for n, m in model.named_modules() if f"{n}.weight".endswith(QK_NORMS)]
        if not self.norms:
            raise ValueError(f"a QK-norm ramp, but {type(model).__name__} has no QK-norm")
        self.hooks = [m.register_forward_hook(lambda _m, _i, out: out * self.scale) for m in self.norms]

    def at(self, step: int) -> None:
        """Set the scale of training step ``step`` (1-based); evaluations after it use the same."""
        self.scale = self.start + (1.0 - self.start) * min(1.0, (step - 1) / self.steps)

    def fold(self) -> None:
        import torch

        for h in self.hooks:
            h.remove()
        with torch.no_grad():
            for m in self.norms:
                m.weight.mul_(self.scale)
        self.hooks, self.scale = [], 1.0


def input_like(name: str, p: Any) -> bool:
    """Whether a parameter's fan-in stays the same as the model widens: the input embeddings, every vector
    (norms, biases) and per-channel convolutions (one input channel each)."""
    return "embed_tokens" in name or p.dim() < 2 or p.shape[1] == 1


def mlp_matrix(name: str, p: Any) -> bool:
    """Whether a parameter is one of an MLP's matrices (Qwen2's, Llama's and Gemma's ``mlp``, LFM2's
    ``feed_forward``); its vectors are input-like."""
    return (".mlp." in name or ".feed_forward." in name) and not input_like(name, p)


def param_groups(
    model: Any, lr: float, input_lr: float | None, mlp_lr: float | None = None, qk_norm_lr: float | None = None
) -> list[dict]:
    """The optimiser's groups: QK-norm's gains (:data:`QK_NORMS`) at ``qk_norm_lr``, the other input-like
    weights (:func:`input_like`) at ``input_lr``, the MLP's matrices (:func:`mlp_matrix`) at ``mlp_lr``, the rest
    (attention's and the output's matrices; with a rate None the weights it would set too) at ``lr``."""
    named = list(model.named_parameters())
    gains = [p for n, p in named if qk_norm_lr is not None and n.endswith(QK_NORMS)]
    if qk_norm_lr is not None and not gains:
        raise ValueError(f"a rate for QK-norm's gains, but {type(model).__name__} has no QK-norm")
    inputs = [p for n, p in named if input_lr is not None and input_like(n, p) and not n.endswith(QK_NORMS)]
    mlp = [p for n, p in named if mlp_lr is not None and mlp_matrix(n, p)]
    chosen = {id(p) for p in gains + inputs + mlp}
    groups = [{"params": [p for _, p in named if id(p) not in chosen], "lr": lr}]
    for params, rate in ((gains, qk_norm_lr), (inputs, input_lr), (mlp, mlp_lr)):
        if params:
            groups.append({"params": params, "lr": rate})
    return groups


def _build_lm(config: LabConfig, vocab_size: int, pad_id: int):
    import torch

    family, layers, hidden, heads = config.sizes()
    sizes: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=pad_id,
    )
    if config.init_std is not None:
        sizes["initializer_range"] = config.init_std
    torch.manual_seed(config.seed)
    if family == "lfm2":
        from transformers import Lfm2Config, Lfm2ForCausalLM

        types = ["conv" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return Lfm2ForCausalLM(Lfm2Config(**sizes, layer_types=types, block_auto_adjust_ff_dim=False))
    if family == "gemma":  # PaliGemma's text model
        from transformers import GemmaConfig, GemmaForCausalLM

        model = GemmaForCausalLM(GemmaConfig(**sizes, head_dim=hidden // heads))
        if not config.embed_scale:  # a buffer, not saved: such a run cannot be an --init-from (checked above)
            model.model.embed_tokens.embed_scale.fill_(1.0)
        return model
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(**sizes, head_dim=hidden // heads))
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**sizes))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**sizes))


@dataclass
class Batch:
    ids: Tensor  # (B, T) long, left-padded; in the grid scene format (B, T, 3), -1 where a slot holds fewer
    mask: Tensor  # (B, T)
    candidates: Tensor  # (B, K) answer word ids, padded with -1
    target: Tensor  # (B,) index of the answer among the candidates
    rungs: list[str]
    hop_at: Tensor  # (B, H) the position of each intermediate target, -1 where a row has fewer
    hop_candidates: Tensor  # (B, H, K) its answer word ids, padded with -1
    hop_target: Tensor  # (B, H) index of its answer among them
    hop_kinds: list[list[str]]  # each row's hops' kinds (Hop.kind)


def _positions(
    ex: Example, layout: tuple[str, ...], cue: bool, scene: str, vocab: Vocabulary
) -> tuple[list[tuple[int, ...]], list[int]]:
    """The prompt as token positions, each one word id or, for a grid scene's slot, the ids whose embeddings
    are summed there (an object's size, colour and shape; ``<bg>`` for an empty patch); and the position of
    each of the example's hops (``Example.hops``)."""
    bg = vocab.ids["<bg>"]
    out: list[tuple[int, ...]] = []
    start: dict[str, tuple[int, int]] = {}
    for name in layout:  # segment by segment: words() splits the joined prompt the same way
        if name == "scene" and scene == "grid":
            slots: list[tuple[int, ...]] = [(bg,)] * (GRID * GRID)
            for size, colour, shape, cell in ex.objects:
                slots[cell] = (vocab.ids[size], vocab.ids[colour], vocab.ids[shape])
            out += [(i,) for i in vocab.encode("Scene :")] + slots
            continue
        ids = vocab.encode(ex.segments[name])
        start[name] = (len(out), len(ids))
        out += [(i,) for i in ids]
    if cue:
        out += [(i,) for i in vocab.encode("Answer :")]
    start[ANSWER] = (len(out) - 1, 1)
    hops = []
    for hop in ex.hops:
        at, n = start[hop.segment]
        hops.append(at + (hop.index if hop.index >= 0 else n + hop.index))
    return out, hops


def encode_batch(
    examples: list[tuple[str, Example]], layout: str, vocab: Vocabulary, cue: bool = True, scene: str = "words"
) -> Batch:
    import torch

    built = [_positions(ex, get_rung(r).layouts[layout], cue, scene, vocab) for r, ex in examples]
    seqs = [s for s, _ in built]
    width = max(map(len, seqs))
    depth = max(len(p) for s in seqs for p in s)
    # left padding: the answer is read at the last position; a position's word ids, then -1 up to depth (one
    # tensor built from nested lists: filling it position by position cost more than the model's step)
    pad = [vocab.ids["<pad>"]] + [-1] * (depth - 1)
    ids = torch.tensor(
        [[pad] * (width - len(s)) + [[*pos, *[-1] * (depth - len(pos))] if pos else pad for pos in s] for s in seqs],
        dtype=torch.long,
    )
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)

    def padded(answers: tuple[str, ...], k: int) -> list[int]:
        return [vocab.ids[a] for a in answers] + [-1] * (k - len(answers))

    k = max(len(ex.answers) for _, ex in examples)
    candidates = torch.tensor([padded(ex.answers, k) for _, ex in examples], dtype=torch.long).view(len(seqs), k)
    target = torch.tensor([ex.answers.index(ex.answer) for _, ex in examples], dtype=torch.long)
    n_hops = max(len(ex.hops) for _, ex in examples)
    k_hops = max((len(h.answers) for _, ex in examples for h in ex.hops), default=0)
    missing = n_hops * [-1]  # a row's hops, then -1 (no hop) up to n_hops
    hop_at = torch.tensor(
        [[width - len(s) + where for where in at] + missing[len(at) :] for s, at in built], dtype=torch.long
    ).view(len(seqs), n_hops)
    hop_candidates = torch.tensor(
        [
            [padded(h.answers, k_hops) for h in ex.hops] + [[-1] * k_hops] * (n_hops - len(ex.hops))
            for _, ex in examples
        ],
        dtype=torch.long,
    ).view(len(seqs), n_hops, k_hops)
    hop_target = torch.tensor(
        [[h.answers.index(h.answer) for h in ex.hops] + [0] * (n_hops - len(ex.hops)) for _, ex in examples],
        dtype=torch.long,
    ).view(len(seqs), n_hops)
    return Batch(
        ids[:, :, 0] if depth == 1 else ids,
        mask,
        candidates,
        target,
        [r for r, _ in examples],
        hop_at,
        hop_candidates,
        hop_target,
        [[h.kind for h in ex.hops] for _, ex in examples],
    )


def held_out(config: LabConfig) -> list[tuple[str, Example]]:
    """The rung's fixed held-out examples, every hop of theirs scored (trained or not)."""
    return draw(random.Random(f"lab-held-out:{config.rung}"), config.rungs, config.held_out, None)


def draw(rng: random.Random, rungs: list[str], n: int, dense: Collection[str] | None = ()) -> list[tuple[str, Example]]:
    """``n`` examples of the rungs (drawn uniformly for a mixture), with their fixed hops and the dense hops
    of the kinds in ``dense`` (None: every kind)."""
    out = []
    for _ in range(n):
        name = rungs[0] if len(rungs) == 1 else rng.choice(rungs)
        ex = get_rung(name).draw(rng)
        if dense is not None:
            ex = replace(ex, hops=tuple(h for h in ex.hops if not h.dense or h.kind in dense))
        out.append((name, ex))
    return out


def dense_kinds(config: LabConfig) -> set[str]:
    """The dense hop kinds a config trains."""
    return {kind for kind, flag in DENSE_HOPS.items() if getattr(config, flag)}


def prefix_mask(mask: Tensor) -> Tensor:
    """(B, 1, T, T) boolean attention mask, True where attended: every position sees every real token of its
    row, before it or after it (a prefix LM's attention over its prefix, here the whole prompt)."""
    return mask.bool()[:, None, None, :].expand(-1, 1, mask.size(1), -1)


def answer_loss(model, batch: Batch, lm_weight: float = 0.0, hop_weight: float = 0.0, prefix: bool = False):
    """(loss, hits (B,), hop hits (B, H), -1 where a row has no such hop): cross-entropy over each example's
    answer words at the last position, plus ``hop_weight`` times that of its intermediate targets at theirs
    and ``lm_weight`` times a next-token loss on the prompt (causal attention only: with ``prefix`` every
    position sees the whole prompt)."""
    import torch
    import torch.nn.functional as F

    if prefix and lm_weight:
        raise ValueError("a next-token loss needs causal attention: prefix attention sees the next token")
    attention = prefix_mask(batch.mask) if prefix else batch.mask
    if batch.ids.dim() == 3:  # grid slots: the sum of their words' embeddings
        slots = batch.ids  # (B, T, 3)
        embedded = model.get_input_embeddings()(slots.clamp(min=0)) * (slots >= 0).unsqueeze(-1)
        logits = model(inputs_embeds=embedded.sum(2), attention_mask=attention).logits  # (B, T, V)
        tokens = slots[:, :, 0].masked_fill((slots[:, :, 1] >= 0), -100)  # no LM target on slots
    else:
        logits = model(input_ids=batch.ids, attention_mask=attention).logits  # (B, T, V)
        tokens = batch.ids
    last = logits[:, -1]  # (B, V)
    valid = batch.candidates >= 0
    scores = last.gather(1, batch.candidates.clamp(min=0))  # (B, K)
    scores = scores.masked_fill(~valid, float("-inf"))
    loss = F.cross_entropy(scores, batch.target)
    if lm_weight:
        target = tokens[:, 1:].masked_fill(batch.mask[:, 1:] == 0, -100)
        loss = loss + lm_weight * F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1))
    hop_hits = torch.full(batch.hop_at.shape, -1.0)
    if batch.hop_at.numel():
        present = batch.hop_at >= 0  # (B, H)
        rows = torch.arange(len(batch.hop_at))[:, None].expand_as(batch.hop_at)
        at = logits[rows, batch.hop_at.clamp(min=0)]  # (B, H, V)
        hop_scores = at.gather(2, batch.hop_candidates.clamp(min=0)).masked_fill(
            batch.hop_candidates < 0, float("-inf")
        )  # (B, H, K)
        if hop_weight:
            loss = loss + hop_weight * F.cross_entropy(hop_scores[present], batch.hop_target[present])
        hop_hits = torch.where(present, (hop_scores.argmax(-1) == batch.hop_target).float(), hop_hits)
    return loss, (scores.argmax(-1) == batch.target).float(), hop_hits


def run_rung(
    config: LabConfig, out: str | Path | None = None, *, log: Callable[[str], None] | None = print
) -> LabResult:
    """Train on ``config.rung`` and evaluate on its held-out set every ``eval_every`` steps; with ``out``,
    write ``curve.jsonl`` (as it goes), ``summary.json`` and ``curve.png`` there."""
    import torch

    rungs = config.rungs
    if config.init_from is not None:
        vocab, model = load_lm(config.init_from, rungs)
    else:
        vocab = Vocabulary(rungs)
        model = build_lm(config, len(vocab), vocab.ids["<pad>"])
    prefix = config.prefix
    result = LabResult(config.model_dump(), sum(p.numel() for p in model.parameters()))
    c = model.config
    result.model = {
        "type": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "heads": c.num_attention_heads,
        "attention": "prefix" if prefix else "causal",
    }
    result.steps_to = {t: None for t in THRESHOLDS}
    held = held_out(config)
    held_batches = [
        encode_batch(held[i : i + 128], config.layout, vocab, config.cue, config.scene)
        for i in range(0, len(held), 128)
    ]
    opt = torch.optim.AdamW(
        param_groups(model, config.lr, config.input_lr, config.mlp_lr, config.qk_norm_lr),
        weight_decay=config.weight_decay,
        betas=(0.9, 0.95),
    )

    from ..engine.loop import warmup_cosine  # the one schedule of every training loop

    def factor(step: int) -> float:
        if config.schedule == "constant":
            return min(1.0, (step + 1) / config.warmup) if config.warmup else 1.0
        return warmup_cosine(step, warmup=config.warmup, total=config.steps)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ramp, start = None, config.qk_norm_start()
    if config.qk_norm_ramp is not None and start is not None:  # the second: the config's own check
        ramp = QKNormRamp(model, start, config.qk_norm_ramp)
    curve_file = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        curve_file = out / "curve.jsonl"
        curve_file.write_text("", encoding="utf-8")
    rng = random.Random(config.seed)
    t0, losses = time.perf_counter(), []
    for step in range(1, config.steps + 1):
        model.train()
        if ramp is not None:
            ramp.at(step)
        loss, _, _ = answer_loss(
            model,
            encode_batch(
                draw(rng, rungs, config.batch_size, dense_kinds(config)),
                config.layout,
                vocab,
                config.cue,
                config.scene,
            ),
            config.lm_weight,
            config.hop_weight,
            prefix,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % config.eval_every and step != config.steps:
            continue
        point = _evaluate(model, held_batches, rungs, prefix, dense_kinds(config))
        point.update(step=step, loss=round(sum(losses) / len(losses), 4), seconds=round(time.perf_counter() - t0, 1))
        losses = []
        result.curve.append(point)
        for t in THRESHOLDS:
            if result.steps_to[t] is None and point["held_out"] >= t:
                result.steps_to[t] = step
        if curve_file is not None:
            with curve_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(point) + "\n")
        if log is not None:
            per = " ".join(f"{k} {v:.3f}" for k, v in point["per_rung"].items()) + " " if len(rungs) > 1 else ""
            per += "hops " + " ".join(f"{k} {v:.3f}" for k, v in point["hops"].items()) + " " if "hops" in point else ""
            log(
                f"step {step} loss {point['loss']:.3f} held-out {point['held_out']:.3f} {per}({point['seconds']:.0f} s)"
            )
        if config.stop_at is not None and point["held_out"] >= config.stop_at:
            break
    result.seconds = time.perf_counter() - t0
    if ramp is not None:
        ramp.fold()
    if out is not None:
        save_lm(model, vocab, Path(out) / "model")
        write_text_atomic(Path(out) / "summary.json", json.dumps(result.summary(), indent=2) + "\n")
        plot_curve(result, Path(out) / "curve.png")
    return result


def save_lm(model, vocab: Vocabulary, path: Path) -> None:
    """The trained model (safetensors) and its vocabulary, for a later run's ``init_from``."""
    model.save_pretrained(path, safe_serialization=True)
    write_text_atomic(path / "vocab.json", json.dumps(vocab.words) + "\n")


def load_lm(run: str | Path, rungs: list[str]):
    """(vocabulary, model) of a finished run's ``model/``, the vocabulary extended by ``rungs``' words (the
    embeddings of new words freshly initialised)."""
    from transformers import AutoModelForCausalLM

    path = Path(run) / "model"
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(f"{path}: no model of a finished lab run here (vocab.json missing)")
    base = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    vocab = Vocabulary(rungs, base=base)
    model = AutoModelForCausalLM.from_pretrained(path)
    if len(vocab) > len(base):
        model.resize_token_embeddings(len(vocab), mean_resizing=False)
    return vocab, model


def _evaluate(
    model, batches: list[Batch], rungs: list[str], prefix: bool = False, trained: Collection[str] = ()
) -> dict:
    """Held-out accuracy, overall and per rung, and per kind of hop: the fixed hops, the carry hop, and the
    dense kinds at the full stops (``AT_STOPS``) trained (``trained``) or, where none of them is, every one
    (they share positions and words, so an untrained kind beside a trained one would only read the trained
    one's answer)."""
    import torch

    model.eval()
    hits: dict[str, list[float]] = {r: [] for r in rungs}
    hops: dict[str, list[float]] = {}
    with torch.no_grad():
        for b in batches:
            _, hit, hop_hits = answer_loss(model, b, prefix=prefix)
            for r, h in zip(b.rungs, hit.tolist()):
                hits[r].append(h)
            for kinds, row in zip(b.hop_kinds, hop_hits.tolist()):
                for kind, h in zip(kinds, row):
                    if kind not in AT_STOPS or not AT_STOPS.intersection(trained) or kind in trained:
                        hops.setdefault(kind, []).append(h)
    every = [h for v in hits.values() for h in v]
    point = {
        "held_out": round(sum(every) / len(every), 4),
        "per_rung": {r: round(sum(v) / len(v), 4) for r, v in hits.items() if v},
    }
    if hops:  # accuracy of each kind of intermediate target, whether or not it was trained
        point["hops"] = {kind: round(sum(v) / len(v), 4) for kind, v in hops.items()}
    return point


def plot_curve(result: LabResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [p["step"] for p in result.curve]
    ax.plot(steps, [p["held_out"] for p in result.curve], marker="o", label="held-out")
    chance = sum(get_rung(r).chance for r in cfg["rung"].split("+")) / len(cfg["rung"].split("+"))
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.axhline(0.9, color="green", linestyle="--", linewidth=0.8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{cfg['rung']} ({cfg['layout']}), lr {cfg['lr']:g}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
