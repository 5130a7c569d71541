"""Pretraining a from-scratch preset on the grounding curriculum (synth.grounding), with the same
engine and loss as SFT. The result is a base checkpoint that is cached: a second call with the same
preset, data, recipe and seed returns the existing one."""

from __future__ import annotations

import collections
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..engine.config import DataConfig, OptimConfig, TrainConfig
from ..engine.distributed import is_main_process
from ..engine.loop import train
from .sources import GroundingSource, VerifySource

#: per preset: dense vision steps, then curriculum steps and learning rate (docs/pretraining.md and docs/experiments.md, for what
#: was tried). The zoo's manifests record the digest of these; a change here means rebuilding the zoo.
PRETRAIN_RECIPES = {
    "tiny-llava-s": {"dense_steps": 3000, "steps": 3000, "lr": 2e-3},
    "tiny-llava-m": {"dense_steps": 3000, "steps": 3000, "lr": 2e-3},
    "tiny-llava-l": {"dense_steps": 4000, "steps": 2000, "lr": 2e-3},
}
#: learning rate of the verification stage (docs/experiments.md, "Why SFT stayed at chance": measured with it)
VERIFY_LR = 1e-3
DEFAULT_RECIPE = {"dense_steps": 0, "steps": 3000, "lr": 1e-3, "freeze_vision": True, "dense_word_weight": 1.0}


def pretrain_recipe(
    preset: str,
    *,
    steps: int | None = None,
    lr: float | None = None,
    dense_steps: int | None = None,
    verify_steps: int | None = None,
    verify_owner_share: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    pool_size: int = 12_000,
) -> dict:
    """Everything that decides a pretrained base, given its training data's tokenizer: the preset's
    architecture, the pretraining questions' prompt version, the stages' steps and learning rates, batch, pool and seed. The
    verification stage's keys appear only when it runs, so recipes without it keep their digests."""
    from dataclasses import asdict

    from ..models.prompt import GROUNDING_PROMPT_VERSION
    from ..models.registry import TINY_READOUT, get_preset

    sizes = get_preset(preset)  # unknown names are an error naming the registered ones
    recipe = {**DEFAULT_RECIPE, **PRETRAIN_RECIPES.get(preset, {})}
    for name, value in (
        ("steps", steps),
        ("lr", lr),
        ("dense_steps", dense_steps),
        ("verify_steps", verify_steps),
        ("verify_owner_share", verify_owner_share),
    ):
        if value is not None:
            recipe[name] = value
    if recipe.get("verify_steps"):
        recipe.setdefault("verify_lr", VERIFY_LR)
        if not recipe.get("verify_owner_share"):
            recipe.pop("verify_owner_share", None)
    else:
        for name in ("verify_steps", "verify_lr", "verify_owner_share"):
            recipe.pop(name, None)
    return {
        "preset": preset,
        "architecture": asdict(sizes),
        "readout": TINY_READOUT,
        "prompt_version": GROUNDING_PROMPT_VERSION,
        "batch_size": batch_size,
        "seed": seed,
        "pool_size": pool_size,
        **recipe,
    }


def recipe_digest(recipe: dict) -> str:
    """A short hash of a pretraining recipe (``pretrain_recipe``)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def grounding_stage(tokenizer, *, head=None, image_token_id: int | None = None, dense_weight: float = 0.0):
    """Loss of the curriculum: cross-entropy over the options for multiple-choice questions and over the
    whole vocabulary (the answer's first token) for open ones; with ``dense_weight`` > 0, also a dense
    term through the language model: at every image token whose patch holds an object's centre, the
    output head (``head``, the model's output embedding) should put a third of its mass on each of the
    words for that object's colour, shape and size. It ties what the image tokens carry to the words the
    options are written in, with a target per object at every step (one question gives one per image)."""
    if dense_weight and (head is None or image_token_id is None):
        raise ValueError("dense_weight > 0 needs the output head and the image token id")
    cache: dict[str, int] = {}

    def first_token(text: str) -> int:
        if text not in cache:
            cache[text] = tokenizer.encode(f" {text}", add_special_tokens=False)[0]
        return cache[text]

    word_ids = None
    if dense_weight:
        from .dense import DENSE_TARGETS, _classes

        classes = _classes()
        # (3, n_classes + 1) vocabulary id of each class word; the "none" column is never used as a target
        word_ids = [torch.tensor([first_token(w) for w in classes[k]] + [0]) for k in DENSE_TARGETS]

    def stage(scores, items, **_) -> dict[str, torch.Tensor]:
        device = scores.logits.device
        is_open = torch.tensor([bool(getattr(q, "open", False)) for q in items], device=device)
        letters = torch.tensor([q.label for q in items], device=device)
        words = torch.tensor([first_token(q.answer) for q in items], device=device)
        ce_mc = torch.nn.functional.cross_entropy(scores.logits, letters, reduction="none")  # (B,)
        ce_open = torch.nn.functional.cross_entropy(scores.vocab_logits.float(), words, reduction="none")  # (B,)
        zero = scores.logits.sum() * 0
        terms = {
            "total": torch.where(is_open, ce_open, ce_mc).mean(),
            "ce_choice": ce_mc[~is_open].mean() if (~is_open).any() else zero,
            "ce_open": ce_open[is_open].mean() if is_open.any() else zero,
        }
        if dense_weight:
            assert image_token_id is not None and word_ids is not None  # checked / set above with dense_weight
            terms["dense_words"] = _dense_word_loss(scores, items, head, image_token_id, word_ids)
            terms["total"] = terms["total"] + dense_weight * terms["dense_words"]
        return terms

    return stage


def _dense_word_loss(scores, items, head, image_token_id: int, word_ids: list[torch.Tensor]) -> torch.Tensor:
    """Mean soft cross-entropy of the head's word distribution at object-centre image tokens."""
    patches = torch.as_tensor(np.stack([q.patches for q in items])).long()  # (B, N, 3) class per patch
    positions = scores.input_ids == image_token_id  # (B, T): exactly N image tokens per row, in patch order
    n = patches.shape[1]
    if not bool((positions.sum(-1) == n).all()):
        raise ValueError(f"dense word targets: expected {n} image tokens per prompt, got {positions.sum(-1).tolist()}")
    feats = scores.last_hidden[positions].view(len(items), n, -1)  # (B, N, H)
    occupied = patches[..., 0] != len(word_ids[0]) - 1  # (B, N)
    if not occupied.any():
        return scores.logits.sum() * 0
    logp = torch.log_softmax(head(feats[occupied.to(feats.device)]).float(), dim=-1)  # (M, V)
    targets = patches[occupied]  # (M, 3)
    picked = torch.stack(
        [logp.gather(1, word_ids[k][targets[:, k]].to(logp.device)[:, None])[:, 0] for k in range(len(word_ids))],
        dim=-1,
    )  # (M, 3)
    return -picked.mean()


def verify_stage(scores, items, **_) -> dict[str, torch.Tensor]:
    """Loss of the verification stage: binary cross-entropy of every option's score (the option readout's
    verdict logit) against whether the option holds (``q.truths``): four targets per image, where a
    four-way question gives one. Options a row lacks are left out."""
    logits = scores.logits.float()  # (B, n)
    target = torch.zeros_like(logits)
    mask = torch.zeros_like(logits)
    for b, q in enumerate(items):
        truths = torch.tensor([float(t) for t in q.truths], device=logits.device)
        target[b, : len(truths)] = truths
        mask[b, : len(truths)] = 1.0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = (bce * mask).sum() / mask.sum().clamp(min=1.0)
    return {"bce_verify": loss, "total": loss}


def _scored(items: list, model, processor, batch: int = 64):
    """(questions, AnswerScores) per batch of held-out (question, image) pairs."""
    from ..models.scoring import answer_distribution

    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        yield (
            [q for q, _ in chunk],
            answer_distribution(model, processor, [q for q, _ in chunk], [im for _, im in chunk]),
        )


def verify_eval(n: int = 256, image_size: int = 64, seed: int = 20_000, owner_share: float = 0.0):
    """An evaluate callback: held-out accuracy of the verification stage's statements (an option counts as
    judged true when its score is above 0), overall and per kind of statement (exist, count, relation,
    owner)."""
    from .grounding import statement_kind as kind
    from .grounding import verify_item
    from .levels import LEVELS
    from .scene import render

    level = LEVELS["medium"]
    items = []
    for i in range(n):
        scene, q = verify_item(f"held-verify:{seed}:{i}", level, owner_share=owner_share)
        items.append((q, render(scene, level).resize((image_size, image_size))))

    def evaluate(model, processor) -> dict:
        hits: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        for qs, scores in _scored(items, model, processor):
            for q, row in zip(qs, scores.logits.tolist()):
                for text, truth, score in zip(q.options, q.truths, row):
                    hits[kind(text)] += (score > 0) == truth
                    counts[kind(text)] += 1
        out = {"accuracy": sum(hits.values()) / sum(counts.values())}
        out.update({f"accuracy_{k}": hits[k] / counts[k] for k in sorted(counts)})
        return out

    return evaluate


def grounding_eval(n: int = 512, image_size: int = 64, seed: int = 10_000):
    """An evaluate callback: accuracy on held-out six-object questions, overall and per kind."""
    from .grounding import sample_item
    from .levels import LEVELS
    from .scene import render

    items = []
    for i in range(n):
        scene, q = sample_item(f"held:{seed}:{i}", 1.0)  # six objects of the benchmark's size, by letter
        items.append((q, render(scene, LEVELS["medium"]).resize((image_size, image_size))))

    def evaluate(model, processor) -> dict:
        hits: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        for qs, scores in _scored(items, model, processor):
            for q, p in zip(qs, scores.probs.argmax(-1).tolist()):
                hits[q.kind] += p == q.label
                counts[q.kind] += 1
        out = {"accuracy": sum(hits.values()) / n}
        out.update({f"accuracy_{k}": hits[k] / counts[k] for k in sorted(counts)})
        return out

    return evaluate


def pretrain(
    preset: str,
    data_root: str | Path,
    out: str | Path,
    *,
    steps: int | None = None,
    lr: float | None = None,
    dense_steps: int | None = None,
    verify_steps: int | None = None,
    verify_owner_share: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    pool_size: int = 12_000,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Build ``preset`` (tokenizer from ``data_root``) and pretrain it: ``dense_steps`` of dense vision
    pretraining (synth.dense; 0 skips it), then ``steps`` of the grounding curriculum, then
    ``verify_steps`` of phrase verification (0 or None skips it); returns the last stage's model folder
    (``out/model``, or ``out/verify/model`` after a verification stage)."""
    recipe = pretrain_recipe(
        preset,
        steps=steps,
        lr=lr,
        dense_steps=dense_steps,
        verify_steps=verify_steps,
        verify_owner_share=verify_owner_share,
        batch_size=batch_size,
        seed=seed,
        pool_size=pool_size,
    )
    out = Path(out)
    # the curriculum is keyed by the recipe without the verification stage: adding one reuses a finished base
    base = {k: v for k, v in recipe.items() if not k.startswith("verify_")}
    final = _curriculum(base, data_root, out, cache_dir=cache_dir, progress=progress, resume=resume)
    if not recipe.get("verify_steps"):
        return final
    return _verification(recipe, data_root, out / "verify", final, progress=progress, resume=resume)


def _stage_marker(out: Path, key: dict, parts: tuple[str, ...]) -> tuple[str, Path, Path]:
    """(digest, marker, pending) of a pretraining stage folder; a run of another recipe there, interrupted or
    finished, is cleared (``parts``), since nothing of it may be resumed."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    pending, marker = out / "pretrain.pending.json", out / "pretrain.json"
    if any(f.is_file() and json.loads(f.read_text()).get("digest") != digest for f in (pending, marker)):
        import shutil

        for part in parts:
            shutil.rmtree(out / part, ignore_errors=True)
        marker.unlink(missing_ok=True)
    return digest, marker, pending


def _finished(model_dir: Path, marker: Path, digest: str) -> bool:
    return (
        (model_dir / "config.json").is_file()
        and marker.is_file()
        and json.loads(marker.read_text()).get("digest") == digest
    )


def _record_finished(final, recipe: dict, pending: Path, marker: Path) -> Path:
    """Record a finished stage: its recipe beside the model, and the pending marker made final (main process)."""
    if is_main_process():
        (Path(final) / "pretrain_recipe.json").write_text(
            json.dumps({**recipe, "recipe_digest": recipe_digest(recipe)}, indent=2)
        )
        pending.replace(marker)
    return final


def _verification(recipe: dict, data_root, out: Path, start: Path, *, progress: bool, resume: bool) -> Path:
    """The verification stage from the curriculum's model ``start``, in ``out``; cached like the curriculum."""
    from ..models.loading import load_model

    key = {**recipe, "data": str(Path(data_root).resolve())}
    digest, marker, pending = _stage_marker(out, key, ("checkpoints", "model"))
    if _finished(out / "model", marker, digest):
        return out / "model"
    out.mkdir(parents=True, exist_ok=True)
    pending.write_text(json.dumps({**key, "digest": digest, "recipe_digest": recipe_digest(recipe)}, indent=2))
    steps, batch_size = recipe["verify_steps"], recipe["batch_size"]
    image_size = recipe["architecture"]["image_size"]
    cfg = TrainConfig(
        model=str(start),
        out=out,
        data=DataConfig(root=Path(data_root), eval_split=None),
        optim=OptimConfig(lr=recipe["verify_lr"], warmup_steps=min(100, steps // 10)),
        steps=steps,
        batch_size=batch_size,
        seed=recipe["seed"],
        save_every=max(1, steps // 6),
        log_every=10,
        progress=progress,
        eval_every=max(1, steps // 6),
        freeze_vision=bool(recipe["freeze_vision"]),
    )
    model, processor = load_model(start, freeze_vision=cfg.freeze_vision)
    share = recipe.get("verify_owner_share", 0.0)
    final = train(
        cfg,
        VerifySource(steps * batch_size, image_size, seed=recipe["seed"], owner_share=share),
        stage=verify_stage,
        model=model,
        processor=processor,
        evaluate=verify_eval(image_size=image_size, owner_share=share),
        resume=resume,
    )
    return _record_finished(final, recipe, pending, marker)


def _curriculum(recipe: dict, data_root, out: Path, *, cache_dir, progress: bool, resume: bool) -> Path:
    """The dense vision stage and the grounding curriculum of ``recipe`` in ``out``; returns ``out/model``."""
    from ..models.registry import init_model
    from ..models.scoring import set_readout
    from .grounding import vocabulary_texts

    preset, batch_size, seed, pool_size = recipe["preset"], recipe["batch_size"], recipe["seed"], recipe["pool_size"]
    key = {**recipe, "data": str(Path(data_root).resolve())}
    digest, marker, pending = _stage_marker(out, key, ("checkpoints", "dense", "init", "verify"))
    if _finished(out / "model", marker, digest):
        return out / "model"
    out.mkdir(parents=True, exist_ok=True)
    pending.write_text(json.dumps({**key, "digest": digest, "recipe_digest": recipe_digest(recipe)}, indent=2))
    init_dir = out / "init"
    if not (init_dir / "config.json").is_file():
        # the tokenizer also covers the curriculum's words
        init_model(preset, data_root, init_dir, seed=seed, extra_texts=vocabulary_texts())
    image_size = recipe["architecture"]["image_size"]
    cfg = TrainConfig(
        model=str(init_dir),
        out=out,
        data=DataConfig(root=Path(data_root), eval_split=None),
        optim=OptimConfig(lr=recipe["lr"], warmup_steps=min(200, recipe["steps"] // 10)),
        steps=recipe["steps"],
        batch_size=batch_size,
        seed=seed,
        save_every=max(1, recipe["steps"] // 6),
        log_every=10,
        progress=progress,
        eval_every=max(1, recipe["steps"] // 8),
    )
    from ..models.loading import load_model

    start_dir = init_dir
    if recipe["dense_steps"]:
        start_dir = out / "dense" / "model"
        if not (start_dir / "config.json").is_file():
            from ..engine.loop import save_model
            from .dense import dense_pretrain

            model, processor = load_model(init_dir)
            dense_pretrain(
                model,
                processor,
                out / "dense",
                steps=recipe["dense_steps"],
                batch_size=batch_size,
                lr=recipe.get("dense_lr", 1e-3),
                seed=seed,
                log=print if progress else (lambda *_: None),
            )
            save_model(model, processor, start_dir)
        cfg.model = str(start_dir)
        # the curriculum's fresh projector and language model must not wash out what the tower learnt
        cfg.freeze_vision = bool(recipe["freeze_vision"])
    model, processor = load_model(start_dir, freeze_vision=cfg.freeze_vision)
    set_readout(model, recipe["readout"])  # the recipe's readout, whatever an earlier init on disk was saved with
    # the image tokens the language model sees form a square grid (Idefics3 merges 2 x 2 patches into one)
    grid = math.isqrt(getattr(processor, "image_seq_len", None) or model.config.image_seq_length)
    source = GroundingSource(
        pool_size,
        recipe["steps"] * batch_size,
        image_size,
        seed=seed,
        grid=grid,
        open_share=recipe.get("open_share", 0.5),
        cache_dir=cache_dir or out.parent / "cache",
    )
    stage = grounding_stage(
        processor.tokenizer,
        head=model.get_output_embeddings(),
        image_token_id=processor.tokenizer.convert_tokens_to_ids(processor.image_token),
        dense_weight=recipe["dense_word_weight"],
    )
    final = train(
        cfg,
        source,
        stage=stage,
        model=model,
        processor=processor,
        evaluate=grounding_eval(image_size=image_size),
        resume=resume,
    )
    return _record_finished(final, recipe, pending, marker)


def publish_base(run: str | Path, name: str | None = None) -> Path:
    """Publish a finished pretraining run folder (``pretrain``'s ``out``) into the model zoo: its model in
    half precision and a manifest with the recipe and its digest, the steps, and the held-out accuracy per
    question kind (the curriculum's six-object questions, the dense stage's per-patch colour, shape and
    size, and the verification stage's statements). With a finished verification stage, its model is the
    base."""
    from ..models import zoo
    from ..models.loading import load_model

    run = Path(run)
    marker = run / "pretrain.json"
    if not marker.is_file():
        raise FileNotFoundError(f"{run} holds no finished pretraining run (no pretrain.json)")
    if (run / "verify" / "pretrain.json").is_file():  # a finished verification stage: the base is its model
        marker = run / "verify" / "pretrain.json"
    key = json.loads(marker.read_text())
    recipe = {k: v for k, v in key.items() if k not in ("data", "digest", "recipe_digest")}
    held_out = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    model_dir = run / "model"
    if recipe.get("verify_steps"):
        model_dir = run / "verify" / "model"
        verify = run / "verify" / "eval.json"
        if verify.is_file():
            held_out.update({f"verify_{k}": v for k, v in json.loads(verify.read_text()).items()})
    dense = run / "dense" / "dense.jsonl"
    if dense.is_file():
        last = json.loads(dense.read_text().splitlines()[-1])
        held_out.update({f"accuracy_patch_{k}": last[k] for k in ("colour", "shape", "size") if k in last})
    manifest = {
        "preset": recipe["preset"],
        "recipe": recipe,
        "recipe_digest": recipe_digest(recipe),
        "steps": {
            "dense": recipe.get("dense_steps", 0),
            "curriculum": recipe["steps"],
            "verify": recipe.get("verify_steps", 0),
        },
        "held_out": held_out,
        "held_out_about": "accuracy*: 512 held-out four-option curriculum questions about six objects of the "
        "benchmark's size (chance 0.25); accuracy_patch_*: the dense stage's per-patch "
        "accuracy at object centres on 256 fresh medium scenes; verify_accuracy*: the "
        "verification stage's statements judged true or false, 256 fresh medium scenes x 4 "
        "(chance 0.5)",
        "tokenizer_data": "the text of the dataset given to `hkd4vlm pretrain --data` (the medium benchmark, "
        "`hkd4vlm synth --seed 0`, 4,000 / 500 / 1,000 records) and the curriculum's words",
    }
    return zoo.publish(*load_model(model_dir, dtype="float32"), name or recipe["preset"], manifest=manifest)
