"""Dense vision pretraining: the vision tower alone, with a target for every patch straight from the renderer
(the colour, shape and size of the object whose centre falls in the patch, or "none"). One question per
image gives one gradient per image; a target per patch gives one per image token, which is what gets a
from-scratch tower past its plateau on shape (docs/experiments.md, "What each level can see"). The per-patch heads are thrown away;
the tower's weights go back into the model, which then takes the question curriculum.

Batches depend only on (seed, step), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

#: per-patch label sets; the last class of each is "no object centred here"
DENSE_TARGETS = ("colour", "shape", "size")


def _classes():
    from .scene import COLOURS, SHAPES, SIZES

    return {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}


def patch_grid(model) -> int:
    """Side of the vision tower's patch grid (image_size // patch_size)."""
    vc = model.config.vision_config
    return vc.image_size // vc.patch_size


def patch_targets(scene, grid: int) -> np.ndarray:
    """(grid * grid, 3) class indices (colour, shape, size) of the object centred in each patch, or each set's
    "none" index (its size) where no object's centre falls."""
    from .scene import grid_cell

    classes = _classes()
    out = np.array([[len(classes[k]) for k in DENSE_TARGETS]] * (grid * grid))
    for o in scene.objects:
        i, j = grid_cell(o, scene, grid)
        out[i * grid + j] = [
            classes["colour"].index(o.colour),
            classes["shape"].index(o.shape),
            classes["size"].index(o.size),
        ]
    return out


def render_batch(rng: random.Random, n: int, image_size: int, grid: int, level_name: str = "medium"):
    """``n`` fresh scenes resized to ``image_size``: PIL images and per-patch targets, each (n, grid * grid)."""
    from .levels import LEVELS
    from .scene import render, sample_scene

    level = LEVELS[level_name]
    images, targets = [], []
    for _ in range(n):
        scene = sample_scene(rng, level)
        images.append(render(scene, level).resize((image_size, image_size), Image.Resampling.BICUBIC))
        targets.append(patch_targets(scene, grid))
    stacked = torch.tensor(np.stack(targets))  # (n, grid * grid, 3)
    return images, {k: stacked[..., i] for i, k in enumerate(DENSE_TARGETS)}


class DenseHeads(torch.nn.Module):
    """One linear classifier per target over every patch feature."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, len(v) + 1) for k, v in _classes().items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, N, H) -> {name: (B, N, C)}
        return {k: h(feats) for k, h in self.heads.items()}


def patch_features(tower, pixel_values: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, grid * grid, H) last-layer patch features (a leading CLS token, as CLIP has, is dropped)."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    feats = out.hidden_states[-1]
    if feats.shape[1] == grid * grid + 1:
        feats = feats[:, 1:]
    return feats


def dense_accuracy(logits: dict, targets: dict) -> dict[str, float]:
    """Accuracy per target on the patches that hold an object's centre."""
    occupied = targets["colour"] != len(_classes()["colour"])
    return {k: float((logits[k].argmax(-1) == targets[k])[occupied].float().mean()) for k in targets}


def dense_pretrain(
    model,
    processor,
    out: str | Path,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 250,
    save_every: int = 250,
    n_eval: int = 256,
    log=print,
    on_step=None,
) -> dict:
    """Train ``model``'s vision tower in place on per-patch targets; returns the last held-out accuracies.
    ``on_step(step)`` runs after each step (tests use it to interrupt a run).

    Checkpoints (tower, heads, optimizer, step) go to ``out/dense.pt`` and a run resumes from them; the
    accuracy curve goes to ``out/dense.jsonl``.
    """
    from ..models.loading import vision_tower

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tower = vision_tower(model)
    grid = patch_grid(model)
    image_size = model.config.vision_config.image_size
    with torch.random.fork_rng():  # the heads' init depends on the seed only, not on what ran before
        torch.manual_seed(seed)
        heads = DenseHeads(model.config.vision_config.hidden_size)

    def pixels(images):
        return processor.image_processor(images, return_tensors="pt")["pixel_values"]

    eval_images, eval_targets = render_batch(random.Random(f"dense-eval:{seed}"), n_eval, image_size, grid)
    eval_pixels = pixels(eval_images)

    def evaluate() -> dict:
        tower.eval()
        with torch.inference_mode():
            logits = heads(
                torch.cat([patch_features(tower, eval_pixels[i : i + 64], grid) for i in range(0, n_eval, 64)])
            )
        tower.train()
        return dense_accuracy(logits, eval_targets)

    tower.train()

    def loss_at(step: int) -> torch.Tensor:
        images, targets = render_batch(random.Random(f"dense:{seed}:{step}"), batch_size, image_size, grid)
        logits = heads(patch_features(tower, pixels(images), grid))
        return cast(
            torch.Tensor,
            sum(torch.nn.functional.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten()) for k in targets),
        )

    return vision_steps(
        "dense",
        loss_at,
        {"tower": tower, "heads": heads},
        out=out,
        lr=lr,
        steps=steps,
        evaluate=evaluate,
        eval_every=eval_every,
        save_every=save_every,
        log=log,
        on_step=on_step,
    )


def vision_steps(
    name: str,
    loss_at,
    modules: dict,
    *,
    out: Path,
    lr: float,
    steps: int,
    evaluate,
    eval_every: int,
    save_every: int,
    log,
    on_step,
) -> dict:
    """The loop of the vision-only stages (dense pretraining, alignment): AdamW over ``modules``' parameters
    (weight decay 0.01), warmup then cosine to a tenth (the engine's one schedule), clipping at 1, for
    ``steps`` optimizer steps; ``loss_at(step)`` draws the step's batch and returns its loss. Every
    ``eval_every`` steps ``evaluate()`` is logged and appended to ``out/NAME.jsonl``; every ``save_every``
    steps the modules, optimizer, schedule and step go atomically to ``out/NAME.pt``, and a run resumes
    from there. Returns the last metrics."""
    from ..engine.loop import warmup_cosine

    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = min(200, steps // 10)
    # plain floats in the schedule's state, so that the checkpoint loads with weights_only
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup=warmup, total=steps, min_ratio=0.1)
    )
    ckpt, curve = out / f"{name}.pt", out / f"{name}.jsonl"
    step = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        for key, module in modules.items():
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = int(state["step"])
        log(f"{name}: resumed at step {step}")
    t0, metrics = time.perf_counter(), {}
    while step < steps:
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % eval_every == 0 or step == steps:
            metrics = {
                "step": step,
                "loss": float(loss.detach()),
                **evaluate(),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            log(f"{name} step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k != "step"))
            with curve.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if step % save_every == 0 or step == steps:
            tmp = ckpt.with_suffix(".tmp")
            modules_state = {key: module.state_dict() for key, module in modules.items()}
            torch.save({**modules_state, "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}, tmp)
            tmp.replace(ckpt)
        if on_step is not None:
            on_step(step)
    return metrics or {"step": step, **evaluate()}
