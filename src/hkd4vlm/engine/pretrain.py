"""Pretraining a from-scratch preset on the grounding curriculum (data.synth.grounding), with the same
engine and loss as SFT. The result is a base checkpoint that is cached: a second call with the same
preset, data, recipe and seed returns the existing one."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import torch

from .config import DataConfig, OptimConfig, TrainConfig
from .distributed import is_main_process
from .loop import train
from .sources import GroundingSource

#: per preset: dense vision steps, then curriculum steps and learning rate (README, "Pretraining", for what
#: was tried). The zoo's manifests record the digest of these; a change here means rebuilding the zoo.
PRETRAIN_RECIPES = {
    "tiny-llava-s": {"dense_steps": 3000, "steps": 3000, "lr": 2e-3},
    "tiny-llava-m": {"dense_steps": 3000, "steps": 3000, "lr": 2e-3},
    "tiny-llava-l": {"dense_steps": 4000, "steps": 4000, "lr": 2e-3},
}
DEFAULT_RECIPE = {"dense_steps": 0, "steps": 3000, "lr": 1e-3, "freeze_vision": True}


def pretrain_recipe(preset: str, *, steps: int | None = None, lr: float | None = None, dense_steps: int | None = None,
                    batch_size: int = 32, seed: int = 0, pool_size: int = 12_000) -> dict:
    """Everything that decides a pretrained base, given its training data's tokenizer: the preset's
    architecture, the prompt version, the stages' steps and learning rates, batch, pool and seed."""
    from dataclasses import asdict

    from ..models.families import IDEFICS3_PRESETS
    from ..models.presets import PRESETS, TINY_READOUT
    from ..models.prompt import PROMPT_VERSION

    specs = {**PRESETS, **IDEFICS3_PRESETS}
    if preset not in specs:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(specs)}")
    recipe = {**DEFAULT_RECIPE, **PRETRAIN_RECIPES.get(preset, {})}
    for name, value in (("steps", steps), ("lr", lr), ("dense_steps", dense_steps)):
        if value is not None:
            recipe[name] = value
    return {"preset": preset, "architecture": asdict(specs[preset]), "readout": TINY_READOUT,
            "prompt_version": PROMPT_VERSION, "batch_size": batch_size, "seed": seed, "pool_size": pool_size, **recipe}


def recipe_digest(recipe: dict) -> str:
    """A short hash of a pretraining recipe (``pretrain_recipe``)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def grounding_stage(tokenizer):
    """Loss of the curriculum: cross-entropy over the option letters for multiple-choice questions and
    over the whole vocabulary (the answer's first token) for open ones."""
    cache: dict[str, int] = {}

    def first_token(text: str) -> int:
        if text not in cache:
            cache[text] = tokenizer.encode(f" {text}", add_special_tokens=False)[0]
        return cache[text]

    def stage(scores, items, *, temperature: float = 1.0, **_) -> dict[str, torch.Tensor]:
        device = scores.logits.device
        is_open = torch.tensor([bool(getattr(q, "open", False)) for q in items], device=device)
        letters = torch.tensor([q.label for q in items], device=device)
        words = torch.tensor([first_token(q.answer) for q in items], device=device)
        ce_mc = torch.nn.functional.cross_entropy(scores.logits, letters, reduction="none")  # (B,)
        ce_open = torch.nn.functional.cross_entropy(scores.vocab_logits.float(), words, reduction="none")  # (B,)
        zero = scores.logits.sum() * 0
        return {
            "total": torch.where(is_open, ce_open, ce_mc).mean(),
            "ce_choice": ce_mc[~is_open].mean() if (~is_open).any() else zero,
            "ce_open": ce_open[is_open].mean() if is_open.any() else zero,
        }

    return stage


def grounding_eval(n: int = 512, image_size: int = 64, seed: int = 10_000):
    """An evaluate callback: accuracy on held-out six-object questions, overall and per kind."""
    from ..data.synth.grounding import sample_item
    from ..data.synth.levels import LEVELS
    from ..data.synth.scene import render
    from ..models.scoring import answer_distribution

    items = []
    for i in range(n):
        scene, q = sample_item(f"held:{seed}:{i}", 1.0)  # six objects of the benchmark's size, by letter
        items.append((q, render(scene, LEVELS["medium"]).resize((image_size, image_size))))

    def evaluate(model, processor) -> dict:
        hits, counts = collections.Counter(), collections.Counter()
        for s in range(0, n, 64):
            chunk = items[s: s + 64]
            qs = [q for q, _ in chunk]
            probs = answer_distribution(model, processor, qs, [im for _, im in chunk]).probs
            for q, p in zip(qs, probs.argmax(-1).tolist()):
                hits[q.kind] += p == q.label
                counts[q.kind] += 1
        out = {"accuracy": sum(hits.values()) / n}
        out.update({f"accuracy_{k}": hits[k] / counts[k] for k in sorted(counts)})
        return out

    return evaluate


def pretrain(preset: str, data_root: str | Path, out: str | Path, *, steps: int | None = None, lr: float | None = None,
             dense_steps: int | None = None, batch_size: int = 32, seed: int = 0, pool_size: int = 12_000,
             cache_dir: str | Path | None = None, progress: bool = True, resume: bool = True) -> Path:
    """Build ``preset`` (tokenizer from ``data_root``) and pretrain it: ``dense_steps`` of dense vision
    pretraining (engine.dense; 0 skips it), then ``steps`` of the grounding curriculum; returns ``out/model``."""
    from ..models.presets import init_model

    recipe = pretrain_recipe(preset, steps=steps, lr=lr, dense_steps=dense_steps, batch_size=batch_size, seed=seed,
                             pool_size=pool_size)
    out = Path(out)
    key = {**recipe, "data": str(Path(data_root).resolve())}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    marker = out / "pretrain.json"
    if (out / "model" / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text()).get("digest") == digest:
        return out / "model"
    pending = out / "pretrain.pending.json"
    if pending.is_file() and json.loads(pending.read_text()).get("digest") != digest:
        # an interrupted run with another recipe: nothing of it may be resumed
        import shutil

        for part in ("checkpoints", "dense", "init"):
            shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    pending.write_text(json.dumps({**key, "digest": digest, "recipe_digest": recipe_digest(recipe)}, indent=2))
    init_dir = out / "init"
    if not (init_dir / "config.json").is_file():
        init_model(preset, data_root, init_dir, seed=seed)
    image_size = recipe["architecture"]["image_size"]
    cfg = TrainConfig(
        model=str(init_dir), out=out, data=DataConfig(root=Path(data_root), eval_split=None),
        optim=OptimConfig(lr=recipe["lr"], warmup_steps=min(200, recipe["steps"] // 10)),
        steps=recipe["steps"], batch_size=batch_size, seed=seed, save_every=max(1, recipe["steps"] // 6),
        log_every=10, progress=progress, eval_every=max(1, recipe["steps"] // 8),
    )
    source = GroundingSource(pool_size, recipe["steps"] * batch_size, image_size, seed=seed,
                             open_share=recipe.get("open_share", 0.5), cache_dir=cache_dir or out.parent / "cache")
    from ..models.loading import load_model

    start_dir = init_dir
    if recipe["dense_steps"]:
        start_dir = out / "dense" / "model"
        if not (start_dir / "config.json").is_file():
            from .dense import dense_pretrain
            from .loop import save_model

            model, processor = load_model(init_dir)
            dense_pretrain(model, processor, out / "dense", steps=recipe["dense_steps"], batch_size=batch_size,
                           lr=recipe.get("dense_lr", 1e-3), seed=seed, log=print if progress else (lambda *_: None))
            save_model(model, processor, start_dir)
        cfg.model = str(start_dir)
        # the curriculum's fresh projector and language model must not wash out what the tower learnt
        cfg.freeze_vision = bool(recipe["freeze_vision"])
    model, processor = load_model(start_dir, freeze_vision=cfg.freeze_vision)
    final = train(cfg, source, stage=grounding_stage(processor.tokenizer), model=model, processor=processor,
                  evaluate=grounding_eval(image_size=image_size), resume=resume)
    if not is_main_process():
        return final
    (out / "model" / "pretrain_recipe.json").write_text(json.dumps({**recipe, "recipe_digest": recipe_digest(recipe)}, indent=2))
    pending.replace(marker)
    return final
