"""The text stage: the language model learns both tasks in the project's own prompt with the image given
as words, before it ever sees a pixel.

Every image token holds the sum of the input embeddings of the words naming the object whose centre
falls in its patch (its size, colour and shape), or of ``background`` where none does: the *word grid*,
what a vision tower aligned to the language model's embeddings hands it (docs/lab.md, "Scene formats").
A step costs what the language model costs (no vision tower runs), so the many steps the tasks'
composition needs are spent where they are cheap; alignment then trains the tower and projector to emit
this grid from pixels (``align``), and task SFT finishes the model.

The records are the benchmark generator's, drawn fresh for every step from seeds disjoint from every
split (``textstage:SEED:EPOCH:INDEX``; the splits are drawn from ``SEED:TASK:SPLIT:I``), in the project's
prompt (models.prompt). Besides the option readout's cross-entropy the loss has:

- ``bce_options``: each option's score against whether the option holds (the readout's one meaning, in
  both tasks: a fact-checking verdict holds or not, a hallucination statement holds or not);
- intermediate targets where each hop of fact checking happens (docs/lab.md, which measured each):
  the claimed shape's colour (or ``none``) at the claim's shape word (``colour``), the person the context
  credits with that colour (or ``nobody``) at the context's last full stop (``name``), and what each
  other context sentence says at its full stop, its colour and its person (``bind-colour``,
  ``bind-name``; ``none`` and ``nobody`` for a sentence crediting no one). They are read through the
  language model's output head over their answer words.
"""

from __future__ import annotations

import collections
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

#: the word at a patch where no object's centre falls
BACKGROUND = "background"
#: answer words of the hops that name no colour or no person
NO_COLOUR, NOBODY = "none", "nobody"
#: words the text stage needs in the tokenizer beyond the benchmark's own
TEXT_STAGE_WORDS = (BACKGROUND, NO_COLOUR, NOBODY)
HOP_KINDS = ("colour", "name", "bind-colour", "bind-name")


@dataclass(frozen=True)
class HopTarget:
    """An intermediate target: the token that ends at character ``end`` of the prompt should name
    ``answer`` among ``answers``."""

    end: int
    answer: str
    answers: tuple[str, ...]
    kind: str


def draw_record(rng: random.Random, task: str, level_name: str = "medium"):
    """One fresh record of ``task`` (its kind and its correct letter drawn uniformly) and its scene."""
    from . import factuality, hallucination
    from .levels import LEVELS

    level = LEVELS[level_name]
    if task == "hallucination":
        htype = rng.choice(hallucination.HALLUCINATION_TYPES)
        return hallucination.make_record(rng, level, "textstage.jpg", htype, rng.randrange(4))
    key = rng.choice(factuality.VERDICT_KEYS)
    return factuality.make_record(rng, level, "textstage.jpg", key, rng.randrange(4))


def fact_hops(record, prompt: str) -> list[HopTarget]:
    """The fact-checking hops of ``record`` in ``prompt`` (its rendering, models.prompt)."""
    from .factuality import NAMES, attributions, parse_claim
    from .scene import COLOURS, Scene

    scene = Scene.from_dict(record.extra["synth"]["scene"])
    colours, names = (*COLOURS, NO_COLOUR), (*NAMES, NOBODY)
    size, shape, _ = parse_claim(record.claim)
    found = scene.find(shape=shape, size=size)
    colour = found[0].colour if found else NO_COLOUR
    credits = attributions(record.context)
    claim_at = _located(prompt, record.claim, "claim")
    shape_end = claim_at + max(m.end() for m in re.finditer(rf"\b{shape}\b", record.claim))
    hops = [HopTarget(shape_end, colour, colours, "colour")]
    context_at = _located(prompt, record.context, "context")
    stops = [m.end() for m in re.finditer(r"\.(?=\s|$)", record.context)]
    start = 0
    for k, stop in enumerate(stops):
        sentence = record.context[start:stop]
        start = stop
        if k == len(stops) - 1:
            credited = credits.get(colour, NOBODY) if found else NOBODY
            hops.append(HopTarget(context_at + stop, credited, names, "name"))
            continue
        said = attributions(sentence)
        c, n = next(iter(said.items())) if said else (NO_COLOUR, NOBODY)
        hops += [
            HopTarget(context_at + stop, c, colours, "bind-colour"),
            HopTarget(context_at + stop, n, names, "bind-name"),
        ]
    return hops


def _located(prompt: str, text: str, field: str) -> int:
    at = prompt.find(text)
    if not text or at < 0:
        raise ValueError(f"text stage: the record's {field} {text!r} is not in its prompt")
    return at


def record_hops(record, prompt: str) -> list[HopTarget]:
    return fact_hops(record, prompt) if record.task == "factuality" else []


class TextStageSource:
    """Fresh records of the tasks for every draw (alternating tasks), each with its word grid's classes
    per patch (``record.extra["textstage"]["patches"]``, synth.dense's classes) and a blank image (the
    pixels are not read). An item depends only on (seed, epoch, index), so runs resume exactly."""

    def __init__(
        self,
        draws: int,
        image_size: int,
        *,
        tasks: tuple[str, ...] = ("hallucination", "factuality"),
        level: str = "medium",
        seed: int = 0,
        grid: int = 8,
    ):
        self.draws, self.tasks, self.level, self.seed, self.grid = draws, tasks, level, seed, grid
        self.blank = Image.new("RGB", (image_size, image_size), (128, 128, 128))

    def __len__(self) -> int:
        return self.draws

    def order(self, epoch: int) -> list[int]:
        return list(range(self.draws))  # every item is fresh already

    def get(self, index: int, epoch: int = 0):
        rng = random.Random(f"textstage:{self.seed}:{epoch}:{index}")
        record, scene = draw_record(rng, self.tasks[index % len(self.tasks)], self.level)
        return with_grid(record, scene, self.grid), self.blank


def with_grid(record, scene, grid: int):
    from .dense import patch_targets

    record.extra["textstage"] = {"patches": patch_targets(scene, grid).tolist()}
    return record


class WordGrid:
    """The word grid of a batch of records (``image_features`` of engine.loop.train): per patch, the sum of
    the model's input embeddings of its object's size, colour and shape words, or of ``background``."""

    def __init__(self, tokenizer):
        from .dense import DENSE_TARGETS, _classes

        classes = _classes()
        self.ids = [torch.tensor([word_id(tokenizer, w) for w in classes[k]]) for k in DENSE_TARGETS]
        self.none = [len(classes[k]) for k in DENSE_TARGETS]
        self.background = word_id(tokenizer, BACKGROUND)

    def __call__(self, model, items) -> torch.Tensor:
        patches = torch.as_tensor(np.stack([r.extra["textstage"]["patches"] for r in items])).long()  # (B, N, 3)
        empty = patches[..., 0] == self.none[0]  # (B, N)
        ids = torch.stack([self.ids[k][patches[..., k].clamp(max=len(self.ids[k]) - 1)] for k in range(3)], -1)
        ids[..., 0] = ids[..., 0].masked_fill(empty, self.background)
        use = torch.ones_like(ids, dtype=torch.bool)
        use[..., 1:] = ~empty[..., None]
        embedding = model.get_input_embeddings()
        device = embedding.weight.device
        vectors = embedding(ids.to(device)) * use.to(device).unsqueeze(-1)
        return vectors.sum(2)  # (B, N, H)


def word_id(tokenizer, word: str) -> int:
    """The id of ``word`` as one known token."""
    from ..models.scoring import _single_token_id

    found = _single_token_id(tokenizer, word)
    if found is None:
        raise ValueError(
            f"text stage: {word!r} is not one token of this tokenizer; build the base with the text "
            "stage's words (synth.textstage.vocabulary_texts)"
        )
    return found


def vocabulary_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Texts that put every word the text stage writes or reads into a tokenizer: fresh records of both
    tasks (from seeds of their own) and the hops' answer words."""
    from .factuality import NAMES
    from .scene import COLOURS, SHAPES, SIZES

    texts = [" ".join((*TEXT_STAGE_WORDS, *NAMES, *COLOURS, *SHAPES, *SIZES))]
    for i in range(n):
        record, _ = draw_record(random.Random(f"textstage-vocab:{seed}:{i}"), ("hallucination", "factuality")[i % 2])
        texts += [record.system2_question, record.system1_answer, record.context, record.claim, record.question]
        texts += record.options
    return [t for t in texts if t]


def hop_logits(scores, items, processor, head) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per hop kind: (logits over its answer words (M, K), the answers' indices (M,)), read through the
    output head ``head`` at each hop's token. A hop whose token is not where the prompt puts it is an
    error."""
    from ..models.prompt import build_prompt

    tokenizer = processor.tokenizer
    rows: dict[str, list] = collections.defaultdict(list)
    ids = scores.input_ids
    pad = tokenizer.pad_token_id
    for b, record in enumerate(items):
        prompt = build_prompt(processor, record)
        hops = record_hops(record, prompt)
        if not hops:
            continue
        lead = int((ids[b] == pad).long().cumprod(0).sum())  # left padding
        for hop in hops:
            prefix = prompt[: hop.end]
            toks = tokenizer(prefix, add_special_tokens=False)["input_ids"]
            pos = lead + len(toks) - 1
            if "<image>" in prefix or int(ids[b, pos]) != toks[-1]:
                raise ValueError(f"text stage: the {hop.kind} hop's token is not at position {pos} of the prompt")
            rows[hop.kind].append((b, pos, hop.answers.index(hop.answer), hop.answers))
    out = {}
    for kind, found in rows.items():
        answers = found[0][3]
        cand = torch.tensor([word_id(tokenizer, w) for w in answers], device=scores.last_hidden.device)
        hidden = scores.last_hidden[[b for b, *_ in found], [p for _, p, *_ in found]]  # (M, H)
        logits = head(hidden)[:, cand].float()
        out[kind] = (logits, torch.tensor([t for _, _, t, _ in found], device=logits.device))
    return out


def option_truths(items, n: int, device) -> torch.Tensor:
    """(B, n) 1 where an option holds: fact checking's correct verdict; every hallucination option but the
    hallucinated one."""
    truth = torch.zeros(len(items), n, device=device)
    for b, r in enumerate(items):
        truth[b, : len(r.choices)] = 1.0 if r.task == "hallucination" else 0.0
        truth[b, r.label] = 0.0 if r.task == "hallucination" else 1.0
    return truth


def text_stage(model, processor, *, hop_weight: float = 1.0, option_weight: float = 1.0):
    """The loss of the text stage (``stage`` of engine.loop.train): the option readout's cross-entropy,
    ``option_weight`` x each option's binary cross-entropy against whether it holds, and ``hop_weight`` x
    the hops' cross-entropies (their mean over kinds), read through ``model``'s output head."""
    from ..models.scoring import option_signs

    head = model.get_output_embeddings()

    def stage(scores, items, **_) -> dict[str, torch.Tensor]:
        logits = scores.logits.float()
        labels = torch.tensor([r.label for r in items], device=logits.device)
        ce = torch.nn.functional.cross_entropy(logits, labels)
        signs = torch.tensor(option_signs(items), device=logits.device)[:, None]
        truth = option_truths(items, logits.shape[1], logits.device)
        shown = torch.tensor(
            [[j < len(r.choices) for j in range(logits.shape[1])] for r in items], device=logits.device
        )
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits * signs, truth, reduction="none")
        terms = {"ce": ce, "bce_options": (bce * shown).sum() / shown.sum()}
        total = ce + option_weight * terms["bce_options"]
        if hop_weight:
            hops = hop_logits(scores, items, processor, head)
            for kind, (z, t) in hops.items():
                terms[f"hop_{kind}"] = torch.nn.functional.cross_entropy(z, t)
            if hops:
                total = total + hop_weight * sum(terms[f"hop_{k}"] for k in hops) / len(hops)
        terms["total"] = total
        return terms

    return stage


def text_stage_eval(n: int = 256, seed: int = 30_000, grid: int = 8, level: str = "medium"):
    """An evaluate callback: held-out accuracy per task on ``n`` fresh records of each, with the word grid,
    per fact-checking verdict and per hallucination type, and each hop's accuracy."""
    from ..models.scoring import answer_distribution

    records = []
    for task in ("hallucination", "factuality"):
        for i in range(n):
            record, scene = draw_record(random.Random(f"textstage-held:{seed}:{task}:{i}"), task, level)
            records.append(with_grid(record, scene, grid))

    def evaluate(model, processor) -> dict:
        words = WordGrid(processor.tokenizer)
        hits: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        blank = Image.new("RGB", (64, 64), (128, 128, 128))
        with torch.no_grad():
            for s in range(0, len(records), 64):
                chunk = records[s : s + 64]
                scores = answer_distribution(
                    model, processor, chunk, [blank] * len(chunk), image_features=words(model, chunk)
                )
                for r, p in zip(chunk, scores.probs.argmax(-1).tolist()):
                    synth = r.extra["synth"]
                    kind = synth.get("verdict") or synth.get("hallucination_type")
                    for key in (r.task, f"{r.task}_{kind}"):
                        hits[key] += p == r.label
                        counts[key] += 1
                for kind, (z, t) in hop_logits(scores, chunk, processor, model.get_output_embeddings()).items():
                    hits[f"hop_{kind}"] += int((z.argmax(-1) == t).sum())
                    counts[f"hop_{kind}"] += len(t)
        out = {f"accuracy_{k}": hits[k] / counts[k] for k in sorted(counts)}
        out["accuracy"] = (out["accuracy_hallucination"] + out["accuracy_factuality"]) / 2
        return out

    return evaluate


def run_text_stage(
    preset: str,
    data_root,
    out,
    *,
    steps: int,
    lr: float,
    batch_size: int = 64,
    warmup: int = 100,
    hop_weight: float = 1.0,
    option_weight: float = 1.0,
    seed: int = 0,
    eval_every: int = 250,
    held_out: int = 256,
    init: str | None = None,
    progress: bool = True,
    resume: bool = True,
):
    """Build ``preset`` (tokenizer from ``data_root``'s text and the text stage's words; or start from the
    model folder ``init``) and train it ``steps`` steps on the text stage; returns ``out/model``. The held-out
    curve is ``out/eval.jsonl``-style TensorBoard scalars and ``out/eval.json`` at the end."""
    from pathlib import Path

    from ..engine.config import DataConfig, OptimConfig, TrainConfig
    from ..engine.loop import train
    from ..models.loading import load_model
    from ..models.registry import TINY_READOUT, get_preset, init_model
    from ..models.scoring import set_readout

    out = Path(out)
    start = Path(init) if init else out / "init"
    if init is None and not (start / "config.json").is_file():
        init_model(preset, data_root, start, seed=seed, extra_texts=vocabulary_texts())
    model, processor = load_model(start)
    set_readout(model, TINY_READOUT)
    sizes = get_preset(preset)
    grid = sizes.image_size // sizes.patch_size
    cfg = TrainConfig(
        model=str(start),
        out=out,
        data=DataConfig(root=Path(data_root), eval_split=None),
        optim=OptimConfig(lr=lr, warmup_steps=warmup),
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        save_every=max(1, min(500, steps // 4)),
        log_every=10,
        progress=progress,
        eval_every=eval_every,
    )
    return train(
        cfg,
        TextStageSource(steps * batch_size, sizes.image_size, seed=seed, grid=grid),
        stage=text_stage(model, processor, hop_weight=hop_weight, option_weight=option_weight),
        model=model,
        processor=processor,
        evaluate=text_stage_eval(n=held_out, grid=grid),
        resume=resume,
        image_features=WordGrid(processor.tokenizer),
    )
