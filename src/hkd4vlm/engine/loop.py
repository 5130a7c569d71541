"""The training loop on ``accelerate``: one flat function that reads top to bottom (setup, resume, loop,
save). What is trained towards is a *stage*: a callable that gets the student's answer scores for a
micro-batch and returns a dict of named loss terms plus ``"total"``; every term is logged.

Data position: the global batch of step ``s`` is the next ``batch_size`` indices of the source's
order for the current epoch. Each process takes its slice of each micro-batch, so the same global
batch is seen whatever the number of processes, and a resumed run continues at the exact position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import NonFiniteError
from ..files import write_text_atomic
from ..models.scoring import answer_distribution, set_readout
from .checkpoint import CheckpointError, checkpoint_dirs, resume_latest, save_checkpoint
from .config import ConfigError, TrainConfig, resume_changes, save_config
from .distributed import average_gradients
from .pipeline import Position, micro_batch_loader, micro_batches, next_global_batch
from .tracking import PROJECT, flat_settings, make_trackers

__all__ = ["Position", "next_global_batch", "previous_run", "save_model", "sft_stage", "train", "warmup_cosine"]


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup over ``warmup`` steps, then cosine to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def sft_stage(scores, items, **_) -> dict[str, torch.Tensor]:
    """Stage 0: L_ce = -log p(i* | x) on the answer distribution."""
    labels = torch.tensor([it.label for it in items], device=scores.logits.device)
    ce = torch.nn.functional.cross_entropy(scores.logits, labels)
    return {"ce": ce, "total": ce}


def train(
    cfg: TrainConfig,
    source,
    *,
    stage: Callable | None = None,
    model=None,
    processor=None,
    evaluate: Callable | None = None,
    resume: bool = False,
    resume_force: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int], None] | None = None,
    extra_modules: dict | None = None,
    stateful: dict | None = None,
    image_features: Callable | None = None,
) -> Path:
    """Run ``cfg.steps`` optimizer steps on ``source`` (only the first ``cfg.stop_after`` where set, the
    schedule unchanged); returns the folder of the saved final model.

    ``stage(scores, items, images=..., keys=..., step=...)`` returns the loss terms (default: SFT);
    ``step`` counts optimizer steps done before this one (for schedules), ``images`` are the augmented
    images the student saw (online teachers score the same batch), ``keys`` their (item index, epoch)
    pairs (cached teachers look their outputs up by them). ``evaluate(model,
    processor) -> dict`` is called every ``cfg.eval_every`` steps and at the end. ``on_step(step)`` runs
    after each optimizer step (tests use it to interrupt a run). ``extra_modules`` are trained
    alongside the model (e.g. a feature projector) and checkpointed with it; ``stateful`` objects (with
    ``state_dict`` / ``load_state_dict``, e.g. a mutual-learning teacher and its optimizer) are only
    checkpointed. ``image_features(model, items)`` -> (B, image tokens, hidden): what the image tokens
    hold instead of the vision tower's output (the text stage, synth.textstage), from the unwrapped model.

    ``resume``: continue from the newest intact checkpoint; a config that differs from the run's saved one in
    a setting that breaks an exact resume is refused (naming the settings) unless ``resume_force``. A NaN or
    infinite loss or gradient stops training with :class:`NonFiniteError` (after ``cfg.skip_nonfinite``
    skipped steps), and non-finite weights are never saved.

    Without ``resume``, a folder that already holds a run (its checkpoints or model/) is refused
    (ConfigError) unless ``overwrite``, which clears its checkpoints and model first.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from ..models.loading import load_model

    stage = stage or sft_stage
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():  # accelerate would train in float32
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; on CPU use no (or bf16)")
    # some families never use a few parameters (LLaVA skips CLIP's post_layernorm): DDP must be told
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)
    trackers = make_trackers(cfg.log_with, Path(cfg.out))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[ddp],
        log_with=trackers or None,
    )
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.grad_accum
    if cfg.batch_size % (world * accum):
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum = {world * accum}")
    micro = cfg.batch_size // (world * accum)
    set_seed(cfg.seed)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; the run folder must be a folder (new or a run to resume)")
    ckpt_root = out / "checkpoints"
    if resume and checkpoint_dirs(ckpt_root) and (out / "config.yaml").is_file():
        changes = resume_changes(out / "config.yaml", cfg)
        if changes:
            what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            if not resume_force:
                raise ConfigError(
                    f"{out}: resuming with changed settings would not continue the same run ({what}); "
                    "restore them, use a new out folder, or pass --resume-force to resume anyway"
                )
            accelerator.print(f"resuming with changed settings (--resume-force): {what}")
    held = previous_run(out)
    if held and not resume and not overwrite:
        raise ConfigError(
            f"out: {out} already holds a training run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose a new out folder"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if held and not resume:  # overwrite: nothing of the old run may be resumed or mistaken for the new one
            import shutil

            for name in ("checkpoints", "model", "eval.json"):
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    if model is None:
        model, processor = load_model(cfg.model, lora=cfg.lora, freeze_vision=cfg.freeze_vision)
    if cfg.readout is not None:
        set_readout(model, cfg.readout)
    model.train()
    modules = dict(extra_modules or {})
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, warmup=cfg.optim.warmup_steps, total=cfg.steps, min_ratio=cfg.optim.min_lr_ratio),
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    # extra modules stay unwrapped (stages hold references to them); their gradients are averaged below
    for m in modules.values():
        m.to(accelerator.device)

    # accelerate checkpoints the prepared model and optimizer and every process's RNG; the rest is registered
    # (the scheduler is not prepared: accelerate would step it once per process)
    registered = {"scheduler": scheduler}
    registered.update({f"module:{name}": m for name, m in modules.items()})
    registered.update({f"state:{name}": obj for name, obj in (stateful or {}).items()})
    accelerator.register_for_checkpointing(*registered.values())

    step, pos = 0, Position()
    if resume:
        found = resume_latest(
            accelerator,
            ckpt_root,
            log=accelerator.print,
            registered=list(registered),
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            extra_modules=modules,
            stateful=stateful,
        )
        if found is not None:
            last, state = found
            step, pos = state["step"], Position(state["epoch"], state["index"])
            if pos.index > len(source):
                raise CheckpointError(
                    f"{last / 'state.json'}: field 'index' is {pos.index}, past the {len(source)} training "
                    "records; the checkpoint does not belong to this data"
                )
            accelerator.print(f"resumed from {last} at step {step} (epoch {pos.epoch}, item {pos.index})")
            if step > cfg.end:
                raise CheckpointError(
                    f"{last}: the run is at step {step}, past stop_after {cfg.end}; its model there cannot be "
                    "made again from it (a new out folder replays the run up to that step)"
                )
        elif (out / "model").is_dir():
            raise CheckpointError(
                f"{out}: holds a finished model but no checkpoint to resume from; use --overwrite to train it "
                "again from the start, or a new out folder"
            )
    skipped = list(getattr(source, "skipped", []))
    if skipped:
        n = len({(p.file, p.record) for p in skipped})
        accelerator.print(f"--skip-invalid: {n} invalid record(s) left out of training ({len(skipped)} problem(s)):")
        for problem in skipped:
            accelerator.print(f"  {problem}")

    accelerator.init_trackers(PROJECT, config=flat_settings(cfg.model_dump(mode="json")))  # the main process's
    bar = None
    if accelerator.is_main_process and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.end, initial=step, desc=out.name, unit="step", dynamic_ncols=True)
    # records are read, augmented and encoded by the loader (in its workers with num_workers > 0); which
    # ones each step takes is next_global_batch's, here as in the loader, so the position is known exactly
    loader = micro_batch_loader(
        source,
        processor,
        pos,
        steps=cfg.end - step,
        batch_size=cfg.batch_size,
        processes=world,
        rank=rank,
        accum=accum,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor,
        pin_memory=cfg.pin_memory and accelerator.device.type == "cuda",
        seed=cfg.seed,
    )
    loaded_batches = micro_batches(loader)
    orders: dict = {}
    t_last, seen, nonfinite = time.perf_counter(), 0, 0
    while step < cfg.end:
        batch, pos = next_global_batch(source, pos, cfg.batch_size, orders)
        sums: dict[str, float] = {}
        for a in range(accum):
            start = (a * world + rank) * micro
            loaded = next(loaded_batches)
            assert loaded.keys == batch[start : start + micro], "the loader left the training order"
            items, images = loaded.items, loaded.images
            sync = a == accum - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else nullcontext()
            with ctx, accelerator.autocast():
                given = None if image_features is None else image_features(accelerator.unwrap_model(model), items)
                scores = answer_distribution(
                    model, processor, items, images, encoded=loaded.encoded, image_features=given
                )
                terms = stage(scores, items, images=images, keys=loaded.keys, step=step)
                accelerator.backward(terms["total"] / accum)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
        average_gradients(p for m in modules.values() for p in m.parameters())
        grad_norm = None
        if cfg.optim.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        bad = _nonfinite(accelerator, sums, grad_norm, params)
        if bad is None:
            optimizer.step()
        else:
            # the step is counted (the batch is consumed, schedules move on) but the weights are not touched
            nonfinite += 1
            where = f"{out}: step {step + 1}: {bad}"
            if nonfinite > cfg.skip_nonfinite:
                kept = checkpoint_dirs(ckpt_root)
                raise NonFiniteError(
                    f"{where}; training stopped ({nonfinite} such step(s), skip_nonfinite={cfg.skip_nonfinite}). "
                    f"Lower optim.lr (now {cfg.optim.lr:g}), set optim.max_grad_norm, or check the data; "
                    f"last checkpoint: {kept[-1] if kept else 'none'}"
                )
            accelerator.print(f"{where}; update skipped ({nonfinite} of at most {cfg.skip_nonfinite})")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += cfg.batch_size

        if step % cfg.log_every == 0 or step == cfg.end:
            logged = {k: _mean_over_processes(accelerator, v) for k, v in sums.items()}
            now = time.perf_counter()
            rate = seen / max(now - t_last, 1e-9)
            t_last, seen = now, 0
            scalars: dict[str, float] = {f"loss/{k}": v for k, v in logged.items()}
            scalars.update({"lr": float(scheduler.get_last_lr()[0]), "throughput/samples_per_s": rate})
            if grad_norm is not None:
                scalars["grad_norm"] = float(grad_norm)
            accelerator.log(scalars, step=step)
            if bar is not None:
                bar.set_postfix(loss=f"{logged['total']:.4f}", samples_s=f"{rate:.1f}")
        if bar is not None:
            bar.update(1)
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.end:
            _run_eval(accelerator, evaluate, model, processor, step)
        if step % cfg.save_every == 0 or step == cfg.end:
            _refuse_nonfinite_weights(accelerator.unwrap_model(model), f"{out}: step {step}")
            save_checkpoint(
                accelerator,
                ckpt_root,
                step,
                state={"epoch": pos.epoch, "index": pos.index},
                registered=list(registered),
                keep=cfg.keep_checkpoints,
            )
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()

    final = out / "model"
    if evaluate is not None:
        metrics = _run_eval(accelerator, evaluate, model, processor, step)
        if accelerator.is_main_process:
            import json

            write_text_atomic(out / "eval.json", json.dumps(metrics, indent=2))
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), processor, final)
        for name, module in modules.items():
            # safetensors, as the model's weights: a module beside the model (e.g. TCRD's feature projector)
            state = {k: v.detach().contiguous() for k, v in accelerator.unwrap_model(module).state_dict().items()}
            save_file(state, out / f"{name}.safetensors")
        for tracker in accelerator.trackers:  # not end_training(): it would end the process group too
            tracker.finish()
    accelerator.wait_for_everyone()
    return final


def previous_run(out: Path) -> list[str]:
    """What of a training run's work ``out`` already holds (checkpoints, model/), by name; a config.yaml alone
    (a run that stopped before its first checkpoint) holds nothing to lose."""
    ckpts = out / "checkpoints"
    held = []
    if ckpts.is_dir() and any(ckpts.iterdir()):
        held.append("checkpoints/")
    if (out / "model").exists():
        held.append("model/")
    return held


def save_model(model, processor, path: str | Path) -> Path:
    """Save a model so that ``load_model`` reads it (LoRA adapters are merged into the weights)."""
    path = Path(path)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    _refuse_nonfinite_weights(model, f"saving {path}")
    tmp = path.with_name(path.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    except OSError as e:  # a full disk: no half-written model is left, and the message names the folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"the model could not be saved ({e.strerror or e})", str(path)) from e
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _nonfinite(accelerator, losses: dict[str, float], grad_norm, params) -> str | None:
    """Why this step's update must not be applied (a NaN or infinite loss term or gradient), or None; the
    same answer on every process."""
    bad = [f"loss {k} = {v}" for k, v in losses.items() if not math.isfinite(v)]
    if grad_norm is not None:
        if not math.isfinite(float(grad_norm)):
            bad.append(f"gradient norm = {float(grad_norm)}")
    elif not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
        bad.append("a gradient is not finite")
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(torch.tensor([float(bool(bad))], device=accelerator.device), reduction="sum")
        if float(flag) and not bad:
            bad.append("a loss or gradient on another process is not finite")
    return ", ".join(bad) or None


def _refuse_nonfinite_weights(model, where: str) -> None:
    from ..models.loading import nonfinite_parameters

    names = nonfinite_parameters(model)
    if names:
        raise NonFiniteError(
            f"{where}: {len(names)} parameter tensor(s) hold NaN or infinite values "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); not saved"
        )


def _run_eval(accelerator, evaluate, model, processor, step) -> dict:
    metrics = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        with torch.inference_mode():
            metrics = evaluate(unwrapped, processor)
        unwrapped.train()
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        accelerator.print(
            f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        )
    accelerator.wait_for_everyone()
    return metrics


def _mean_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean"))
