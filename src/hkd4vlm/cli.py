"""The ``hkd4vlm`` command line. Heavy modules are imported inside each command, so it starts fast."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import click

from .data.images import DEFAULT_MAX_PIXELS
from .data.tasks import TASKS, Task
from .models.loading import DTYPES
from .models.registry import preset_names

if TYPE_CHECKING:
    from .infer.msei import Aggregate, Shifts


class ModelPathType(click.ParamType):
    """A model directory that exists, a shipped base by name (``zoo:tiny-llava-l``), or a Hugging Face Hub id
    (``org/name[@revision]``, fetched when loaded; ``HF_HUB_OFFLINE=1`` keeps it to the local cache)."""

    name = "model"

    def convert(self, value, param, ctx):
        from .models.zoo import PREFIX, available, is_zoo

        if is_zoo(value):
            if str(value)[len(PREFIX) :] not in available():
                self.fail(
                    f"no zoo model {value!r}; shipped: {', '.join(PREFIX + n for n in available()) or 'none'}",
                    param,
                    ctx,
                )
            return str(value)
        from .models.hub import is_hub_id

        path = Path(value)
        if not path.is_dir():
            if is_hub_id(value):
                return str(value)
            self.fail(f"model directory {value!r} does not exist (or use zoo:NAME, or a Hub id org/name)", param, ctx)
        return path


MODEL_PATH = ModelPathType()
MODEL_HELP = (
    "A model folder, a shipped base (zoo:NAME) or a Hugging Face Hub id (org/name, org/name@revision); "
    "HF_HUB_OFFLINE=1 uses only the local Hub cache."
)


class ShiftsType(click.ParamType):
    """``--shifts`` of ``predict`` and ``serve``: a number of option→letter mappings, or 'all' (one per option),
    read by ``infer.msei.parse_shifts``."""

    name = "N|all"

    def convert(self, value, param, ctx):
        from .infer.msei import parse_shifts

        try:
            return parse_shifts(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SHIFTS = ShiftsType()

#: errors about what the user gave (data, config, model folder, checkpoint, paths): one message, exit 1; so is
#: any other OSError about a named file (a full disk, a read-only folder)
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _refuse_overwriting_input(out: Path, option: str, inputs: dict[str, Path], root: Path | None = None) -> None:
    """A usage error when ``out`` is one of ``inputs`` (what it is -> path) or an existing file under the dataset
    ``root``: writing it would replace what the command reads."""
    for what, path in inputs.items():
        if out.exists() and path.exists() and os.path.samefile(out, path):
            raise click.BadParameter(
                f"{out} is the {what}; writing it would overwrite an input, so choose another path", param_hint=option
            )
    if root is not None and out.exists() and out.resolve().is_relative_to(root.resolve()):
        raise click.BadParameter(
            f"{out} is a file of the dataset {root}; writing it would overwrite an input, so choose another path",
            param_hint=option,
        )


class _Commands(click.Group):
    """The command group; a user error ends in one message (file, record, field) and exit status 1, its
    traceback only with ``--debug`` or ``HKD4VLM_DEBUG=1``."""

    def invoke(self, ctx):
        from .errors import UserError
        from .models.zoo import ZooError  # an unknown zoo name, or a shipped base whose files changed

        try:
            return super().invoke(ctx)
        except (UserError, ZooError, OSError) as e:
            if isinstance(e, OSError) and not isinstance(e, _USER_OS_ERRORS) and e.filename is None:
                raise
            if ctx.params.get("debug") or os.environ.get("HKD4VLM_DEBUG", "").strip() not in ("", "0"):
                raise
            if isinstance(e, OSError) and e.filename is not None:
                raise click.ClickException(f"{e.filename}: {e.strerror or e}") from None
            raise click.ClickException(str(e)) from None


def task_option(help: str | None = None):
    """``--task`` (repeatable) as ``tasks``, a tuple of task names; empty means every task."""
    return click.option("--task", "tasks", type=click.Choice(TASKS), multiple=True, help=help)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hkd4vlm")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: HKD4VLM_DEBUG=1).")
def main(debug: bool) -> None:
    """Train and run small vision-language judges for hallucination detection and factuality checking."""


def _report_skipped(problems: list, what: str) -> None:
    """``--skip-invalid``: every record left out, one line each, and how many (on stderr)."""
    if problems:
        n = len({(p.file, p.record) for p in problems})
        click.echo(f"--skip-invalid: {n} invalid record(s) left out of {what} ({len(problems)} problem(s)):", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)


@main.command()
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Dataset root to write."
)
@click.option("--level", type=click.Choice(["easy", "medium", "hard"]), default="medium", show_default=True)
@click.option("--train", "n_train", type=click.IntRange(min=0), default=4000, show_default=True)
@click.option("--val", "n_val", type=click.IntRange(min=0), default=500, show_default=True)
@click.option("--test", "n_test", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@task_option("Generate only this task (repeatable); default both.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: CPU count, at most 4).")
@click.option("--no-baselines", is_flag=True, help="Skip the text-only baselines in stats.json.")
def synth(
    out: Path,
    level: str,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    tasks: tuple,
    workers: int | None,
    no_baselines: bool,
) -> None:
    """Generate the synthetic benchmark (both tasks, challenge layout) and its stats.json."""
    from .synth.generate import generate
    from .synth.report import print_stats

    stats = generate(
        out,
        level=level,
        sizes={"train": n_train, "val": n_val, "test": n_test},
        seed=seed,
        tasks=tuple(tasks) or TASKS,
        workers=workers,
        baselines=not no_baselines,
    )
    print_stats(stats, out)


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@task_option()
@click.option("--split", "splits", multiple=True, help="Check only this split (repeatable); default all found.")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Refuse images with more pixels (decompression bombs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
def validate(root: Path, tasks: tuple, splits: tuple, max_pixels: int, as_json: bool) -> None:
    """Check a dataset in the challenge layout; exits 1 and names every bad record and field."""
    from dataclasses import asdict

    from .data.layout import validate_dataset

    problems, counts = validate_dataset(root, tasks=tasks or None, splits=splits or None, max_pixels=max_pixels)
    if as_json:
        click.echo(json.dumps({"records": counts, "problems": [asdict(p) for p in problems]}, indent=2))
    else:
        for p in problems:
            click.echo(str(p))
        checked = ", ".join(f"{k}: {v}" for k, v in counts.items()) or "nothing"
        click.echo(f"checked {checked}; {len(problems)} problem(s)", err=bool(problems))
    sys.exit(1 if problems else 0)


@main.command("init-model")
@click.option("--preset", type=click.Choice(preset_names()), required=True)
@click.option(
    "--data",
    "data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Dataset root whose text trains the tokenizer.",
)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
def init_model_cmd(preset: str, data: Path, out: Path, seed: int) -> None:
    """Build a tiny preset (LLaVA: CLIP + Qwen2; Idefics3: SigLIP + Llama) from config and save it as a checkpoint."""
    from .models.loading import count_parameters, load_model
    from .models.registry import init_model
    from .synth.grounding import vocabulary_texts

    # the tokenizer also covers the pretraining curriculum's words, so that the model can be pretrained
    init_model(preset, data, out, seed=seed, extra_texts=vocabulary_texts())
    model, _ = load_model(out)
    click.echo(f"{preset}: {count_parameters(model):,} parameters, saved to {out}")


def _int_list(ctx, param, value: str) -> list[int]:
    """A comma-separated list of integers, at least one (an option's callback)."""
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not values:
        raise click.BadParameter("name at least one")
    return values


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/quickstart"), show_default=True
)
@click.option(
    "--seeds",
    default="0",
    show_default=True,
    callback=_int_list,
    help="Comma-separated seeds, e.g. 0,1,2 for the full table.",
)
@click.option(
    "--config",
    "config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A quickstart YAML (default: the embedded configs/quickstart.yaml).",
)
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def quickstart(out: Path, seeds: list[int], config: Path | None, overrides: tuple) -> None:
    """The embedded default job: benchmark, pretrained tiny pyramid, teacher tuning, the method and its
    ablation on both tasks; writes OUT/results.json and OUT/report.md, and a model card (README.md) into
    every model folder it trains."""
    from .engine.config import ConfigError, load_config
    from .quickstart import QuickstartConfig, default_config_path, run_quickstart

    try:
        cfg = load_config(config or default_config_path(), overrides, schema=QuickstartConfig)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    results = run_quickstart(out, cfg, seeds)
    for task, block in results["tasks"].items():
        click.echo(task)
        for row, r in block["rows"].items():
            acc = sum(r["accuracy"]) / len(r["accuracy"])
            click.echo(f"  {row:<20} params {r['params']:>9,}  accuracy {acc:.3f}")
    click.echo(f"results: {out / 'results.json'}; report: {out / 'report.md'}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--resume", is_flag=True, help="Continue from the run folder's last intact checkpoint.")
@click.option(
    "--resume-force",
    is_flag=True,
    help="Resume even though settings that change what is trained (seed, batch size, lr, data ...) differ.",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Leave invalid records out (listed and counted) instead of stopping (data.skip_invalid).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the run already in the out folder (its checkpoints and model) instead of refusing.",
)
@click.option(
    "--log-with",
    "log_with",
    metavar="NAMES",
    help="Trackers to log to through accelerate, comma-separated: tensorboard (the default; OUT/tb), wandb, "
    "mlflow (each needs its package installed); none for no logging. Sets log_with.",
)
def train(
    config: Path,
    overrides: tuple,
    resume: bool,
    resume_force: bool,
    skip_invalid: bool,
    overwrite: bool,
    log_with: str | None,
) -> None:
    """Fine-tune a model (SFT) from a YAML config; `key.sub=value` arguments override its values.

    Runs on one device as is, or on several with `accelerate launch --num_processes N -m hkd4vlm.cli train ...`
    (checkpoints are accelerate's: resume with the same number of processes). `num_workers=N` reads, augments
    and encodes the records in N DataLoader worker processes. The model is saved to OUT/model with its model
    card (README.md, Hugging Face Hub format; `hkd4vlm card`). `model` may be a folder, zoo:NAME or a Hub id
    (org/name[@revision]).
    """
    from .engine.config import ConfigError, load_config
    from .engine.sft import run_sft

    try:
        extra = (["data.skip_invalid=true"] if skip_invalid else []) + ([f"log_with={log_with}"] if log_with else [])
        cfg = load_config(config, (*overrides, *extra))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in the out folder, --overwrite replaces it: give one")
    final = run_sft(cfg, resume=resume, resume_force=resume_force, overwrite=overwrite)
    click.echo(f"model saved to {final}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--resume-force",
    is_flag=True,
    help="Resume an interrupted stage even though settings that change what it trains differ, and keep a "
    "finished stage whose settings in the recipe changed.",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Leave invalid records out (listed and counted) instead of stopping (data.skip_invalid).",
)
@click.option(
    "--log-with",
    "log_with",
    metavar="NAMES",
    help="Trackers to log to through accelerate, comma-separated: tensorboard (the default; OUT/tb), wandb, "
    "mlflow (each needs its package installed); none for no logging. Sets every stage's train.log_with.",
)
def distill(recipe: Path, overrides: tuple, resume_force: bool, skip_invalid: bool, log_with: str | None) -> None:
    """Run a distillation recipe (ordered sft / ppod / tcrd stages over a pyramid); resumable.

    `key.sub=value` arguments override the recipe, e.g. `stages.3.tau=3.0 stages.1.train.steps=200`. The
    pyramid's models may be folders, zoo:NAME or Hub ids (org/name[@revision]); every stage's model folder
    gets a model card (README.md, Hugging Face Hub format; `hkd4vlm card`).
    """
    from .distill.recipe import RecipeConfig, run_recipe
    from .engine.config import ConfigError, load_config

    try:
        cfg = load_config(
            recipe, (*overrides, *(["data.skip_invalid=true"] if skip_invalid else [])), schema=RecipeConfig
        )
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    if log_with:
        from pydantic import ValidationError

        try:
            for st in cfg.stages:
                st.train.log_with = log_with  # read as a name list on assignment
        except ValidationError as e:
            raise click.BadParameter(e.errors()[0]["msg"], param_hint="--log-with") from None
    final = run_recipe(cfg, resume_force=resume_force)
    for level, path in sorted(final.items()):
        click.echo(f"level {level}: {path}")


@main.command("cache-teacher")
@click.option("--model", "model_dir", type=MODEL_PATH, required=True, help=MODEL_HELP)
@click.option("--data", "data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@task_option()
@click.option("--split", default="train", show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--augment", "augment", default="", help="name=prob,... as in train.augment of the stages that read the cache."
)
@click.option(
    "--variants",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Augmentation draws per record (training repeats them every this many epochs).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="The recipe's seed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="(record, variant) entries per shard file (rounded up to whole batches); the unit of work dealt out "
    "to the processes of accelerate launch and of resuming an interrupted build.",
)
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Leave invalid records out (listed and counted); the recipe that reads the cache must skip them too.",
)
def cache_teacher(
    model_dir: Path,
    data: Path,
    tasks: tuple,
    split: str,
    out: Path,
    augment: str,
    variants: int,
    seed: int,
    batch_size: int,
    shard_size: int,
    skip_invalid: bool,
) -> None:
    """Precompute a teacher's answer distributions and hidden states per (record, augmentation).

    Under `accelerate launch --num_processes N -m hkd4vlm.cli cache-teacher ...` the shards are dealt out
    across the processes (each on its own GPU); the folder is the one a single process writes. An interrupted
    build resumes when the same command runs again, scoring only the shards that are missing."""
    from .data.augment import augment_spec
    from .distill.cache import build_cache
    from .infer.sharding import finish, processes

    try:
        probs = augment_spec(augment)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--augment") from None
    procs = processes()  # several under accelerate launch: each scores and writes its share of the shards
    manifest = build_cache(
        model_dir,
        data,
        list(tasks or TASKS),
        split,
        out,
        augment=probs,
        seed=seed,
        variants=variants,
        batch_size=batch_size,
        shard_size=shard_size,
        skip_invalid=skip_invalid,
        log=lambda problems: _report_skipped(problems, "the cache"),
        procs=procs,
    )
    finish(procs)
    if not procs.is_main:
        return
    skipped = json.loads((manifest / "manifest.json").read_text()).get("skipped_records", 0)
    tail = f"; {skipped} invalid record(s) skipped" if skip_invalid else ""
    click.echo(f"teacher cache written to {out}{tail}")


@main.command()
@click.option("--preset", default=None, help="Tiny preset to build and pretrain (e.g. tiny-llava-l).")
@click.option(
    "--like",
    default=None,
    metavar="zoo:NAME",
    help="Reproduce a shipped base: its preset and recorded recipe (steps, lr, batch, pool, seed).",
)
@click.option(
    "--data",
    "data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Dataset root whose text trains the tokenizer (its images are not used).",
)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: the preset's recipe)."
)
@click.option("--lr", type=float, default=None)
@click.option(
    "--dense-steps",
    type=click.IntRange(min=0),
    default=None,
    help="Dense vision pretraining steps before the curriculum (default: the preset's recipe; 0 skips it).",
)
@click.option(
    "--verify-steps",
    type=click.IntRange(min=0),
    default=None,
    help="Phrase-verification steps after the curriculum (default: the preset's recipe; 0 skips it).",
)
@click.option(
    "--verify-owner-share",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Share of verification items about who drew what, given a context (default: the recipe's; 0).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--pool-size",
    type=click.IntRange(min=16),
    default=12_000,
    show_default=True,
    help="Rendered curriculum questions (cached next to --out).",
)
@click.option("--seed", type=int, default=0, show_default=True)
def pretrain(
    preset: str | None,
    like: str | None,
    data: Path,
    out: Path,
    steps: int | None,
    lr: float | None,
    dense_steps: int | None,
    verify_steps: int | None,
    verify_owner_share: float | None,
    batch_size: int,
    pool_size: int,
    seed: int,
) -> None:
    """Pretrain a from-scratch preset (dense vision stage, the grounding curriculum, then phrase
    verification); cached, resumable."""
    from .synth.pretrain import pretrain as run

    if like is not None:
        from .models import zoo as model_zoo

        if not model_zoo.is_zoo(like):
            raise click.BadParameter(f"expected zoo:NAME, got {like!r}", param_hint="--like")
        shipped = model_zoo.read_manifest(like[len(model_zoo.PREFIX) :])
        if shipped.get("kind") in ("judge", "judge-stage"):
            what = "a judge" if shipped["kind"] == "judge" else "a judge's stage"
            raise click.BadParameter(f"{like} is {what}: `hkd4vlm judge build --like {like}`", param_hint="--like")
        rec = shipped["recipe"]
        preset, batch_size, pool_size, seed = rec["preset"], rec["batch_size"], rec["pool_size"], rec["seed"]
        steps, lr, dense_steps = (
            steps or rec["steps"],
            lr or rec["lr"],
            rec["dense_steps"] if dense_steps is None else dense_steps,
        )
        verify_steps = rec.get("verify_steps", 0) if verify_steps is None else verify_steps
        if verify_owner_share is None:
            verify_owner_share = rec.get("verify_owner_share", 0.0)
    if preset is None:
        raise click.UsageError("give --preset or --like zoo:NAME")
    final = run(
        preset,
        data,
        out,
        steps=steps,
        lr=lr,
        dense_steps=dense_steps,
        verify_steps=verify_steps,
        verify_owner_share=verify_owner_share,
        batch_size=batch_size,
        pool_size=pool_size,
        seed=seed,
    )
    click.echo(f"base checkpoint: {final}")


@main.command("text-stage")
@click.option("--preset", required=True, help="Tiny preset to build (a PaliGemma one: tiny-paligemma-qwen2-l).")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Dataset root whose text trains the tokenizer (its records and images are not used).",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--init",
    "init",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Start from this model folder instead of a fresh build (it must have the text stage's words).",
)
@click.option("--steps", type=click.IntRange(min=1), required=True)
@click.option(
    "--stop-after",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many of the --steps steps (the lr schedule still spans --steps); the model is saved there.",
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), required=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True)
@click.option(
    "--beta2",
    type=click.FloatRange(min=0, max=1, max_open=True),
    default=0.95,
    show_default=True,
    help="AdamW's second-moment decay (the engine's default is 0.999; the text stage's composed hops need 0.95).",
)
@click.option(
    "--hop-weight",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Weight of the fact-checking hops (0 trains the answers alone).",
)
@click.option(
    "--pixels",
    is_flag=True,
    help="Read the rendered images through the (frozen, aligned) vision tower instead of the word grid "
    "(after `hkd4vlm align`, with --init the aligned model).",
)
@click.option(
    "--statement-hops/--no-statement-hops",
    default=False,
    show_default=True,
    help="Also the hallucination statements' hops (how many objects match, where a relation's objects are).",
)
@click.option(
    "--claimed-hop/--no-claimed-hop",
    default=False,
    show_default=True,
    help="Also the claim's person, at the token of the person the context credits (docs/pretraining.md, "
    '"The comparison"): after the name hop is learnt.',
)
@click.option(
    "--verdict-hop/--no-verdict-hop",
    default=False,
    show_default=True,
    help="Also the verdict's own word at that same token, where the two persons sit (docs/pretraining.md, "
    '"The comparison at L").',
)
@click.option(
    "--carry-hop/--no-carry-hop",
    default=False,
    show_default=True,
    help="Also the claimed shape's colour at that same token, where the credited person is looked up by it "
    '(docs/lab.md, "The colour lookup before the name at L").',
)
@task_option("Train on this task only (repeatable; default both, in turn). The held-out check reports both.")
@click.option("--eval-every", type=click.IntRange(min=1), default=250, show_default=True)
@click.option(
    "--held-out", type=click.IntRange(min=1), default=256, show_default=True, help="Held-out records per task."
)
@click.option("--seed", type=int, default=0, show_default=True)
def text_stage_cmd(
    preset: str,
    data: Path,
    out: Path,
    init: Path | None,
    steps: int,
    stop_after: int | None,
    lr: float,
    batch_size: int,
    warmup: int,
    beta2: float,
    hop_weight: float,
    pixels: bool,
    statement_hops: bool,
    claimed_hop: bool,
    verdict_hop: bool,
    carry_hop: bool,
    tasks: tuple,
    eval_every: int,
    held_out: int,
    seed: int,
) -> None:
    """Train a preset's language model on both tasks with the image given as words (docs/pretraining.md,
    "The text stage"); resumes an interrupted run in --out."""
    from .synth.textstage import run_text_stage

    if stop_after is not None and stop_after > steps:
        raise click.BadParameter(f"{stop_after} is past --steps {steps}", param_hint="--stop-after")
    final = run_text_stage(
        preset,
        data,
        out,
        steps=steps,
        stop_after=stop_after,
        lr=lr,
        batch_size=batch_size,
        warmup=warmup,
        hop_weight=hop_weight,
        statement_hops=statement_hops,
        claimed_hop=claimed_hop,
        verdict_hop=verdict_hop,
        carry_hop=carry_hop,
        pixels=pixels,
        tasks=tuple(tasks) or TASKS,
        beta2=beta2,
        seed=seed,
        eval_every=eval_every,
        held_out=held_out,
        init=None if init is None else str(init),
    )
    click.echo(f"text stage model: {final}")


@main.command("align")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--steps", type=click.IntRange(min=1), required=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--held-out", type=click.IntRange(min=1), default=256, show_default=True, help="Held-out records per task."
)
@click.option(
    "--tower-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Start from this model's vision tower and projector (an earlier alignment) instead of MODEL's.",
)
@click.option(
    "--word-weight",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Weight of the per-attribute word cross-entropy beside the squared error.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def align_cmd(
    model: Path,
    out: Path,
    steps: int,
    lr: float,
    batch_size: int,
    held_out: int,
    tower_from: Path | None,
    word_weight: float,
    seed: int,
) -> None:
    """Train MODEL's vision tower and projector to hand its language model the word grid of the text stage,
    from pixels; then check both tasks through pixels and through words (OUT/eval.json)."""
    from .synth.textstage import run_alignment

    report = run_alignment(
        model,
        out,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        held_out=held_out,
        word_weight=word_weight,
        tower_from=tower_from,
    )
    for name in ("pixels", "words"):
        r = report[name]
        click.echo(
            f"{name}: hallucination {r['accuracy_hallucination']:.3f}, factuality {r['accuracy_factuality']:.3f}"
        )
    click.echo(f"aligned model: {out / 'model'}")


@main.group()
def zoo() -> None:
    """The shipped pretrained bases and task-tuned judges (load them anywhere a model is accepted as
    zoo:NAME)."""


@zoo.command("list")
def zoo_list() -> None:
    """Each shipped base (its preset, steps and held-out accuracy) and judge (its test accuracy)."""
    from .models import zoo as model_zoo

    for name in model_zoo.available():
        m = model_zoo.read_manifest(name)
        if m.get("kind") == "judge":
            test = m["accuracy"]["test"]
            click.echo(
                f"zoo:{name}  judge ({m.get('role')})  preset {m.get('preset')}  test accuracy "
                + ", ".join(f"{t} {test[t]:.3f}" for t in TASKS)
                + f"  recipe {m.get('recipe_digest')}"
            )
            continue
        if m.get("kind") == "judge-stage":
            held = m.get("stages_held_out", {}).get(m.get("stage"), {})
            held = held.get("pixels", held)  # an alignment's check: the text stage's through pixels
            click.echo(
                f"zoo:{name}  judge stage ({m.get('stage')}, {m.get('stage_kind')})  preset {m.get('preset')}  "
                "held-out accuracy "
                + ", ".join(
                    f"{t} {held[f'accuracy_{t}']:.3f}" if f"accuracy_{t}" in held else f"{t} n/a" for t in TASKS
                )
                + f"  recipe {m.get('recipe_digest')}"
            )
            continue
        acc = m.get("held_out", {}).get("accuracy")
        click.echo(
            f"zoo:{name}  preset {m.get('preset')}  steps {m.get('steps')}  held-out accuracy "
            f"{'n/a' if acc is None else f'{acc:.3f}'}  recipe {m.get('recipe_digest')}"
        )


@zoo.command("publish")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Zoo name (default: the preset's).")
def zoo_publish(run: Path, name: str | None) -> None:
    """Publish a finished `hkd4vlm pretrain` run folder into the zoo (replacing a base of the same name)."""
    from .synth.pretrain import publish_base

    click.echo(f"published {publish_base(run, name)}")


@main.group()
def judge() -> None:
    """Task-tuned judges made by a chain of stages (text stage, alignment, SFT) and shipped in the zoo."""


@judge.command("build")
@click.argument("recipe", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--like", default=None, metavar="zoo:NAME", help="Replay a shipped judge's recipe.")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Dataset root: its text builds the tokenizer, its training split tunes the judge (SFT).",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--stage", "only", default=None, help="Run only this stage (its inputs finished), e.g. beside another.")
def judge_build(recipe: Path | None, like: str | None, data: Path, out: Path, only: str | None) -> None:
    """Run a judge recipe (a YAML file, or --like zoo:NAME) stage by stage into OUT/<stage>/; finished stages
    are kept and an interrupted one resumes (docs/pretraining.md, "Shipped judges")."""
    from .synth.judge import load_recipe, run_judge

    source = recipe if recipe is not None else like
    if source is None or (recipe is not None and like is not None):
        raise click.UsageError("give a RECIPE file or --like zoo:NAME (one of them)")
    chain = load_recipe(source)
    final = run_judge(chain, data, out, only=only)
    click.echo(f"stage {only}: {final}" if only else f"judge model: {final}")


@judge.command("publish")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The dataset the chain was built with: its test and validation splits are scored into the manifest.",
)
@click.option("--name", required=True, help="Zoo name.")
@click.option(
    "--role",
    type=click.Choice(["teacher", "assistant", "student"]),
    default=None,
    help="The judge's place in the pyramid [default: teacher; not with --stage].",
)
@click.option(
    "--stage",
    default=None,
    help="Publish only this finished stage (kind judge-stage), for a later chain to start from (init: zoo:NAME).",
)
def judge_publish(run: Path, recipe: Path, data: Path, name: str, role: str | None, stage: str | None) -> None:
    """Publish RUN (a finished `hkd4vlm judge build` of RECIPE) into the zoo as NAME, scored on the data's test
    and validation splits from the half-precision weights it ships; with --stage, one finished stage and the
    part of RECIPE that made it, with its held-out check."""
    from .models import zoo as model_zoo
    from .synth.judge import load_recipe, publish_judge, publish_stage

    if stage is not None:
        if role is not None:
            raise click.UsageError("--role is a judge's; a stage (--stage) ships without one")
        folder = publish_stage(run, data, name, load_recipe(recipe), stage)
        click.echo(f"published {folder}: stage {stage}")
        return
    folder = publish_judge(run, data, name, load_recipe(recipe), role=role or "teacher")
    acc = model_zoo.read_manifest(name)["accuracy"]["test"]
    click.echo(f"published {folder}: test accuracy " + ", ".join(f"{t} {acc[t]:.3f}" for t in TASKS))


@main.command()
@click.option("--model", "model_dir", type=MODEL_PATH, required=True, help=MODEL_HELP)
@click.option("--data", "data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--task", type=click.Choice(TASKS), required=True)
@click.option("--split", default="test", show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N records.")
@click.option("--device", default=None, help="e.g. cuda:0 (default: CPU).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option(
    "--shifts",
    type=SHIFTS,
    default="1",
    show_default=True,
    help="Mapping-shift inference: score N cyclic option→letter shifts per record and aggregate "
    "('all' = one per option; 1 = a single plain pass).",
)
@click.option("--aggregate", type=click.Choice(["logmean", "mean", "vote"]), default="logmean", show_default=True)
@click.option("--random-mappings", is_flag=True, help="Use N seeded random permutations instead of cyclic shifts.")
@click.option(
    "--skip-invalid", is_flag=True, help="Leave invalid records out (listed and counted) instead of stopping."
)
@click.option(
    "--max-record-tokens",
    type=click.IntRange(min=1),
    default=2_048,
    show_default=True,
    help="Refuse records whose text fields pass this many tokens together (the model's time and memory grow "
    "with the prompt).",
)
def predict(
    model_dir: Path,
    data: Path,
    task: Task,
    split: str,
    out: Path,
    batch_size: int,
    limit: int | None,
    device: str | None,
    dtype: str,
    shifts: Shifts,  # parsed by SHIFTS
    aggregate: Aggregate,
    random_mappings: bool,
    skip_invalid: bool,
    max_record_tokens: int,
) -> None:
    """Write one JSONL line per record: image, question, answer, choice, pred_ans, pred_letter, status
    ("success", or "error" with the reason in "error"), correct, probs (and the shifts' agreement with
    mapping-shift inference).

    Under `accelerate launch --num_processes N -m hkd4vlm.cli predict ...` the batches are dealt out across the
    processes (each on its own GPU) and merged: the file is the one a single process writes, line for line."""
    from .data.layout import read_split, split_file
    from .infer.msei import MappingSpec
    from .infer.predict import accuracy, predict_split, write_jsonl
    from .infer.sharding import finish, processes
    from .models.loading import load_model

    _refuse_overwriting_input(out, "'--out'", {"split file read": split_file(data, task, split)}, root=data)
    spec = MappingSpec(shifts, mode="random" if random_mappings else "cyclic")
    procs = processes()  # several under accelerate launch: each scores its share of the batches
    records = read_split(data, task, split, skip_invalid=skip_invalid)
    if procs.is_main:
        _report_skipped(records.skipped, "the predictions")
    if not records.records:  # validate calls an empty split a problem too
        what = "no valid records" if records.skipped else "no records (an empty list)"
        raise click.ClickException(f"{split_file(data, task, split)}: holds {what}; nothing to predict")
    if device is None and procs.world > 1:
        device = procs.device  # each launched process on its own GPU (or the CPU)
    model, processor = load_model(model_dir, dtype=dtype, device=device)
    preds = predict_split(
        model,
        processor,
        records,
        batch_size=batch_size,
        limit=limit,
        progress=True,
        spec=spec,
        aggregate=aggregate,
        max_record_tokens=max_record_tokens,
        procs=procs,
    )
    if procs.is_main:
        write_jsonl(preds, out)
    finish(procs)
    if not procs.is_main:
        return
    labelled = sum(p.correct is not None for p in preds)
    errors = sum(p.status == "error" for p in preds)
    tail = f"; accuracy {accuracy(preds):.4f} on {labelled} labelled" if labelled else ""
    tail += f'; {errors} could not be scored (status "error")' if errors else ""
    tail += f"; {len({(p.file, p.record) for p in records.skipped})} invalid record(s) skipped" if skip_invalid else ""
    click.echo(f"{len(preds)} predictions written to {out}{tail}")


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--stdout", "to_stdout", is_flag=True, help="Print the card instead of writing MODEL_DIR/README.md.")
def card(model_dir: Path, to_stdout: bool) -> None:
    """Write the model card of a trained judge again: MODEL_DIR/README.md in the Hugging Face Hub's card format
    (YAML header with base_model, tags, pipeline_tag and model-index metrics; then the recipe, data, label
    fraction, steps, evaluation with 95% intervals, readout and how to load it), read from the run folder
    around MODEL_DIR (config.yaml, eval.json; a distillation stage's done.json and recipe.yaml). train and
    distill write it at the end of every run."""
    from .engine.card import model_card, write_card

    if to_stdout:
        click.echo(model_card(model_dir), nl=False)
        return
    click.echo(f"model card written to {write_card(model_dir)}")


@main.command()
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="metrics.json to write."
)
@click.option(
    "--plot",
    "plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Confusion-matrix PNG (default: next to --out).",
)
def evaluate(predictions: Path, out: Path, plot: Path | None) -> None:
    """Accuracy, macro/micro-F1, per-letter scores, ECE, position bias and a confusion-matrix plot."""
    from .eval.report import PLOT_FORMATS, evaluate_predictions, plot_confusion, read_predictions

    plot = plot or out.with_name(out.stem + "_confusion.png")
    _refuse_overwriting_input(out, "'--out'", {"predictions file": predictions})
    _refuse_overwriting_input(plot, "'--plot'", {"predictions file": predictions, "--out file": out})
    if plot.resolve() == out.resolve():
        raise click.BadParameter(f"{plot} is also --out; choose two paths", param_hint="'--plot'")
    if plot.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        raise click.BadParameter(
            f"{plot}: unknown image format {plot.suffix or '(no suffix)'!r}; use one of "
            + ", ".join(f".{f}" for f in PLOT_FORMATS),
            param_hint="'--plot'",
        )
    try:
        report = evaluate_predictions(read_predictions(predictions), str(predictions))
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    from .files import write_text_atomic

    write_text_atomic(out, json.dumps(report, indent=2))
    plot_confusion(report, plot, title=f"{predictions.name}: accuracy {report['accuracy']:.3f}")
    share = " ".join(f"{k}={v:.2f}" for k, v in report["prediction_share"].items())
    click.echo(
        f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  micro-F1 {report['micro_f1']:.4f}"
        f"  ECE {report.get('ece', float('nan')):.4f}  prediction share {share}"
    )
    click.echo(f"metrics: {out}; confusion matrix: {plot}")


@main.command()
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench.json"),
    show_default=True,
    help="The json to write.",
)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A quickstart run folder: its student, assistant and teacher [default: runs/quickstart when it "
    "holds a finished run, else untrained tiny presets].",
)
@click.option(
    "--models",
    "model_dirs",
    multiple=True,
    type=MODEL_PATH,
    help="A model folder (repeat it: the first is the student, the last the teacher).",
)
@click.option("--student", type=MODEL_PATH, default=None)
@click.option("--teacher", type=MODEL_PATH, default=None)
@click.option(
    "--data",
    "data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Dataset root to take the records from [default: the run's data, else a generated synthetic one].",
)
@click.option("--quick", is_flag=True, help="A smaller, faster run (noisier figures).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Inference batch size [16; --quick 8].")
@click.option("--records", type=click.IntRange(min=1), default=None, help="Inference records [64; --quick 16].")
@click.option(
    "--latency-records",
    type=click.IntRange(min=1),
    default=None,
    help="Records timed one by one at batch 1 [24; --quick 4].",
)
@click.option(
    "--rounds", type=click.IntRange(min=1), default=None, help="Timed passes over the records [3; --quick 2]."
)
@click.option(
    "--new-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Generate-then-parse: tokens generated per record, EOS suppressed until then [64].",
)
@click.option(
    "--train-batch-size", type=click.IntRange(min=1), default=None, help="The student's training batch [32; --quick 8]."
)
@click.option("--train-steps", type=click.IntRange(min=1), default=None, help="Timed optimizer steps [20; --quick 3].")
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Torch threads in every measurement (0: torch's default).",
)
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available].")
@click.option(
    "--serve",
    "serve_load",
    is_flag=True,
    help='Instead: load-test the HTTP service on the student; writes {"serve": ...}.',
)
@click.option("--requests", type=click.IntRange(min=1), default=2000, show_default=True, help="With --serve.")
@click.option("--concurrency", type=click.IntRange(min=1), default=64, show_default=True, help="With --serve.")
@click.option(
    "--large-image-share",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    show_default=True,
    help="With --serve: the share of requests that carry a 4000 x 4000 PNG instead of the record's image.",
)
def bench(
    out: Path,
    run_dir: Path | None,
    model_dirs: tuple,
    student: Path | None,
    teacher: Path | None,
    data: Path | None,
    quick: bool,
    threads: int,
    device: str | None,
    serve_load: bool,
    requests: int,
    concurrency: int,
    large_image_share: float,
    **sizes,
) -> None:
    """Speed and memory side by side: inference (one pass, mapping shifts with and without prefix reuse,
    generate-then-parse), training (SFT, online and offline distillation) and peak memory, each measured
    in a fresh process; prints a table and writes OUT."""
    from dataclasses import replace

    from .bench import QUICK, BenchError, BenchSettings, default_run, format_table, run_bench, run_serve_bench

    settings = BenchSettings(**QUICK) if quick else BenchSettings()
    settings = replace(settings, threads=threads, device=device, **{k: v for k, v in sizes.items() if v is not None})
    if run_dir is None and not (model_dirs or student or teacher):
        run_dir = default_run(log=click.echo)
    try:
        if serve_load:
            result = run_serve_bench(
                settings,
                requests=requests,
                concurrency=concurrency,
                run=run_dir,
                models=model_dirs,
                student=student,
                data=data,
                large_image_share=large_image_share,
                log=click.echo,
            )
        else:
            result = run_bench(
                settings,
                run=run_dir,
                models=model_dirs,
                student=student,
                teacher=teacher,
                data=data,
                quick=quick,
                log=click.echo,
            )
    except (BenchError, ImportError) as e:  # ImportError: --serve without the serve extra
        raise click.ClickException(str(e)) from None
    from .files import write_text_atomic

    write_text_atomic(out, json.dumps(result, indent=2))
    click.echo(json.dumps(result["serve"], indent=2) if serve_load else "\n" + format_table(result))
    click.echo(f"written to {out}")


def _serve_options(command):
    """``serve``'s options, one per field of serve.config.ServeConfig, in its order: the field's name with
    hyphens (or its ``option``), its default, bounds and description."""
    from annotated_types import Ge, Gt, Le

    from .serve.config import ServeConfig

    options = []
    for name, field in ServeConfig.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        kw: dict = {"help": field.description, "show_default": True}
        bounds = {
            "min": next((m.ge for m in field.metadata if isinstance(m, Ge)), None)
            if not any(isinstance(m, Gt) for m in field.metadata)
            else next(m.gt for m in field.metadata if isinstance(m, Gt)),
            "max": next((m.le for m in field.metadata if isinstance(m, Le)), None),
        }
        numeric = {field.annotation} & {int, float, int | None, float | None}
        if name == "shifts":
            kw.update(type=SHIFTS, default=str(field.default))
        elif field.annotation is bool:
            kw.update(is_flag=True, default=field.default, show_default=False)
        elif field.annotation == tuple[str, ...]:
            kw.update(multiple=True, default=field.default, show_default=False)
        elif numeric:
            ranged = click.IntRange if numeric <= {int, int | None} else click.FloatRange
            open_min = {"min_open": True} if any(isinstance(m, Gt) for m in field.metadata) else {}
            kw.update(type=ranged(**bounds, **open_min), default=field.default)
        else:
            kw.update(default=field.default, show_default=field.default is not None)
        if "envvar" in extra:
            kw.update(envvar=extra["envvar"], show_envvar=True)
        options.append(click.option(str(extra.get("option", "--" + name.replace("_", "-"))), name, **kw))
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.option("--model", "model_dir", type=MODEL_PATH, required=True, help=MODEL_HELP)
@_serve_options
@click.option("--device", default=None, help="e.g. cuda:0 (default: CPU).")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
def serve(model_dir: Path, device: str | None, dtype: str, **settings) -> None:
    """Serve a judge over HTTP: POST /v1/hallucination and /v1/factuality (JSON with a base64 image, or
    multipart), micro-batched into single model calls; the demo page at /; GET /healthz, /v1/model, /v1/stats.
    Every option is a field of hkd4vlm.serve.ServeConfig."""
    import logging

    from pydantic import ValidationError

    from .serve import ServeConfig

    try:
        config = ServeConfig(**settings)
    except ValidationError as e:
        err = e.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        # a check across settings has no location: its message starts with the setting at fault
        name = (
            str(err["loc"][0]) if err["loc"] else next((n for n in ServeConfig.model_fields if msg.startswith(n)), "")
        )
        hint = "'--api-key' / HKD4VLM_API_KEY" if name == "api_key" else f"'--{name.replace('_', '-')}'"
        raise click.BadParameter(msg, param_hint=hint) from None
    try:
        from .serve import run
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    # the service logs through logging ("hkd4vlm.serve"); the command shows its INFO lines on stderr
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(model_dir, config, device=device, dtype=dtype)


@main.group()
def lab() -> None:
    """The learnability lab: one skill per rung, fresh data, a held-out curve (docs/lab.md)."""


@lab.command("list")
def lab_list() -> None:
    """The rungs, their layouts and chance."""
    from .lab import RUNGS

    for rung in RUNGS.values():
        click.echo(f"{rung.name:10} chance {rung.chance:.2f}  layouts {', '.join(rung.layouts)}  {rung.doc}")


#: the lab's text-model families (LabConfig.family's; the lab's torch imports stay out of the CLI's start-up)
LAB_FAMILIES = ["qwen2", "qwen3", "llama", "lfm2", "gemma"]

#: the training settings ``lab run`` and ``lab sizes`` share (the fields of ``LabConfig``)
_LAB_SETTINGS = [
    click.option("--layout", default="ask-first", show_default=True, help="Segment order (see `hkd4vlm lab list`)."),
    click.option(
        "--cue/--no-cue",
        default=True,
        show_default=True,
        help="End with 'Answer :' (else read the last segment's end).",
    ),
    click.option(
        "--scene",
        type=click.Choice(["words", "grid"]),
        default="words",
        show_default=True,
        help="A scene written out, or one token per image patch (8 x 8) holding the sum of its object's words.",
    ),
    click.option(
        "--attention",
        type=click.Choice(["causal", "prefix"]),
        default=None,
        help="prefix: every position attends to the whole prompt, as PaliGemma's over image and prompt "
        "[default: a preset's family's (prefix for tiny-paligemma-*), else causal].",
    ),
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True),
    click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True),
    click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True),
    click.option(
        "--init-std",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="initializer_range (default 0.02).",
    ),
    click.option(
        "--residual-init",
        type=click.Choice(["family", "gpt2", "depth"]),
        default="family",
        show_default=True,
        help="The weights that write into the residual stream (attention's output projection, the MLP's down "
        "projection): the family's own std, or that std / sqrt(2 x layers) as GPT-2 and Megatron (gpt2), or / "
        "sqrt(layers) (depth).",
    ),
    click.option(
        "--qk-norm-init",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Qwen3 only: QK-norm's gains at initialisation (the family's own: 1; a smaller gain starts the "
        'attention near uniform; docs/lab.md, "QK-norm with the depth initialisation, and QK-norm\'s gains").',
    ),
    click.option(
        "--qk-norm-lr",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Qwen3 only: QK-norm's gains' own rate, the same at every size [default: the other norms' rate].",
    ),
    click.option(
        "--qk-norm-ramp",
        type=click.IntRange(min=1),
        default=None,
        help="Qwen3 only, with --qk-norm-init G: a scale on the normalised queries and keys rises from G to 1 "
        "over this many steps (the gains start at 1 and train throughout; the saved model holds the scale).",
    ),
    click.option(
        "--qk-norm-head-width",
        type=click.IntRange(min=1),
        default=None,
        help="Qwen3 only, with --qk-norm-init G: the head width at which G holds; at head width d the gains start "
        "at G x (this / d) ** 0.25, the same largest attention logit (sqrt(d) x gain ** 2) at every head width.",
    ),
    click.option(
        "--embed-scale/--no-embed-scale",
        default=True,
        show_default=True,
        help="Gemma only: its input embeddings times the square root of its width, as Gemma does "
        '(--no-embed-scale: times 1; docs/lab.md, "The teacher\'s language model").',
    ),
    click.option(
        "--lm-weight",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="Next-token loss on the prompt.",
    ),
    click.option(
        "--hop-weight",
        type=click.FloatRange(min=0),
        default=0.0,
        show_default=True,
        help="Loss on the rung's intermediate targets (fact: the claimed shape's colour, the credited name).",
    ),
    click.option(
        "--sentence-hops/--no-sentence-hops",
        default=False,
        show_default=True,
        help="Also the dense intermediate targets (fact: at each context sentence, its person if its colour is the claimed shape's).",
    ),
    click.option(
        "--binding-hops/--no-binding-hops",
        default=False,
        show_default=True,
        help="Also train what each context sentence says (fact: its colour and its person, at its full stop).",
    ),
    click.option(
        "--carry-hop/--no-carry-hop",
        default=False,
        show_default=True,
        help="Also train the colour the name is looked up by where it is looked up (fact: the claimed shape's, at "
        "the context's last word; retrieve: the asked one, where the answer is read).",
    ),
    click.option("--eval-every", type=click.IntRange(min=1), default=250, show_default=True),
    click.option("--held-out", type=click.IntRange(min=1), default=256, show_default=True),
]


def _lab_settings(f):
    for option in reversed(_LAB_SETTINGS):
        f = option(f)
    return f


def _lab_config(rung: str, settings: dict):
    """The ``LabConfig`` of a lab command's options; a setting it refuses is a usage error."""
    from pydantic import ValidationError

    from .lab import LabConfig

    try:
        return LabConfig(rung=rung, **settings)
    except ValidationError as e:
        raise click.UsageError("; ".join(str(err["msg"]) for err in e.errors())) from None


@lab.command("run")
@click.argument("rung")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write curve.jsonl, curve.png and summary.json here.",
)
@click.option(
    "--family",
    type=click.Choice(LAB_FAMILIES),
    default="qwen2",
    show_default=True,
    help="The text model's family (qwen3: Qwen2 with QK-norm; gemma: PaliGemma's).",
)
@click.option(
    "--init-from",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="A finished run's --out: start from its trained model (its sizes replace --layers/--hidden/--heads).",
)
@click.option("--preset", default=None, help="Take the text sizes and family of a registered preset (tiny-llava-l).")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--heads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option(
    "--input-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="The rate of the input embeddings, norms, biases and per-channel convolutions, whose fan-in does not "
    "grow with width (muP keeps them at the base rate) [default: --lr].",
)
@click.option(
    "--mlp-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="The rate of the MLP's matrices (gate, up and down projections), apart from attention's [default: --lr].",
)
@_lab_settings
@click.option(
    "--stop-at",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    help="Stop at this held-out accuracy.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def lab_run(rung: str, out: Path | None, **settings) -> None:
    """Train a language model on RUNG (several joined by '+' are mixed) and print the held-out curve."""
    from .lab import run_rung

    config = _lab_config(rung, settings)
    try:
        result = run_rung(config, out, log=click.echo)
    except FileNotFoundError as e:  # --init-from a folder that holds no finished run
        raise click.BadParameter(str(e), param_hint="--init-from") from None
    reached = ", ".join(f"{t:.2f} at {s if s is not None else '-'}" for t, s in result.steps_to.items())
    click.echo(
        f"{config.rung}: best {result.best:.3f}, final {result.final:.3f}; steps to {reached}; {result.seconds:.0f} s"
    )


@lab.command("sizes")
@click.argument("rung")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="One run per preset and seed (PRESET-seedN), sizes.json and sizes.md here; finished runs are kept.",
)
@click.option(
    "--presets",
    default="tiny-llava-s,tiny-llava-m,tiny-llava-l",
    show_default=True,
    help="Comma-separated, smallest first: each is compared with the one before it.",
)
@click.option("--seeds", default="0,1,2", show_default=True, callback=_int_list, help="Comma-separated.")
@click.option(
    "--base-lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    show_default=True,
    help="The rate at width 64; each preset trains at base-lr x (64 / its width) ** width-power (see --width-lr).",
)
@click.option(
    "--width-power",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="How fast the rate falls with width: 1 as muP for Adam's hidden matrices, 0.5 as its square root, 0 not.",
)
@click.option(
    "--mlp-width-power",
    type=click.FloatRange(min=0),
    default=None,
    help="The MLP's matrices' rate falls with width by this power instead (attention's and the rest by "
    "--width-power) [default: --width-power].",
)
@click.option(
    "--width-lr",
    type=click.Choice(["all", "hidden"]),
    default="all",
    show_default=True,
    help="What the width scales: every weight's rate, or only the hidden and output matrices' (the input "
    "embeddings, norms, biases and per-channel convolutions at base-lr, as muP for Adam).",
)
@click.option(
    "--family",
    type=click.Choice(LAB_FAMILIES),
    default=None,
    help="Build each preset's text sizes in this family (qwen3: Qwen2 with QK-norm) [default: each preset's own].",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    show_default=True,
    help="A larger level's mean may trail the smaller's by this much and still count as keeping up.",
)
@click.option(
    "--hop",
    default=None,
    help="Compare the levels on this intermediate target's held-out accuracy (fact: colour, name, ...) instead "
    "of the answer's.",
)
@_lab_settings
def lab_sizes(
    rung: str,
    out: Path,
    presets: str,
    seeds: list[int],
    base_lr: float,
    width_lr: Literal["all", "hidden"],
    width_power: float,
    mlp_width_power: float | None,
    family: str | None,
    tolerance: float,
    hop: str | None,
    **settings,
) -> None:
    """Train RUNG at each preset and seed and print each level's held-out mean per evaluation, and where a
    larger level falls behind a smaller one at equal steps."""
    from .lab import run_sizes

    config = _lab_config(rung, settings if family is None else {**settings, "family": family})
    names = [p.strip() for p in presets.split(",") if p.strip()]
    unknown = [p for p in names if p not in preset_names()]
    if unknown:
        raise click.BadParameter(
            f"unknown preset(s) {', '.join(unknown)}; choose among {', '.join(preset_names())}", param_hint="--presets"
        )
    try:
        result = run_sizes(
            config,
            names,
            seeds,
            base_lr,
            out,
            tolerance,
            log=click.echo,
            scaled=width_lr,
            power=width_power,
            hop=hop,
            mlp_power=mlp_width_power,
            family=family,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(result.table(), nl=False)
    for inv in result.inversions():
        se = f" (standard error over seeds {inv['se']:.3f})" if inv["se"] is not None else ""
        click.echo(f"step {inv['step']}: {inv['larger']} trails {inv['smaller']} by {-inv['gap']:.3f}{se}")
    measured = f"{rung}'s {hop} hop" if hop else rung
    click.echo(
        f"{measured}: {'ordered' if result.ordered else 'not ordered'} at every evaluation (tolerance {tolerance})"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
