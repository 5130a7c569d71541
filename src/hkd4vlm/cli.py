"""The ``hkd4vlm`` command line. Heavy modules are imported inside each command, so it starts fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .data.images import DEFAULT_MAX_PIXELS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hkd4vlm")
def main() -> None:
    """Train and run small vision-language judges for hallucination detection and factuality checking."""


@main.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Dataset root to write.")
@click.option("--level", type=click.Choice(["easy", "medium", "hard"]), default="medium", show_default=True)
@click.option("--train", "n_train", type=click.IntRange(min=0), default=4000, show_default=True)
@click.option("--val", "n_val", type=click.IntRange(min=0), default=500, show_default=True)
@click.option("--test", "n_test", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task", "tasks", type=click.Choice(["hallucination", "factuality"]), multiple=True,
              help="Generate only this task (repeatable); default both.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: CPU count, at most 4).")
@click.option("--no-baselines", is_flag=True, help="Skip the text-only baselines in stats.json.")
def synth(out: Path, level: str, n_train: int, n_val: int, n_test: int, seed: int, tasks: tuple, workers: int | None,
          no_baselines: bool) -> None:
    """Generate the synthetic benchmark (both tasks, challenge layout) and its stats.json."""
    from .data.synth.generate import generate
    from .data.synth.report import print_stats

    stats = generate(
        out, level=level, sizes={"train": n_train, "val": n_val, "test": n_test}, seed=seed,
        tasks=tuple(tasks) or ("hallucination", "factuality"), workers=workers, baselines=not no_baselines,
    )
    print_stats(stats, out)


@main.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--task", "tasks", type=click.Choice(["hallucination", "factuality"]), multiple=True)
@click.option("--split", "splits", multiple=True, help="Check only this split (repeatable); default all found.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images with more pixels (decompression bombs).")
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
@click.option("--preset", type=click.Choice(["tiny-llava-s", "tiny-llava-m", "tiny-llava-l", "tiny-idefics3-s"]),
              required=True)
@click.option("--data", "data", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Dataset root whose text trains the tokenizer.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
def init_model_cmd(preset: str, data: Path, out: Path, seed: int) -> None:
    """Build a tiny preset (LLaVA: CLIP + Qwen2; Idefics3: SigLIP + Llama) from config and save it as a checkpoint."""
    from .models.loading import count_parameters, load_model
    from .models.presets import init_model

    init_model(preset, data, out, seed=seed)
    model, _ = load_model(out)
    click.echo(f"{preset}: {count_parameters(model):,} parameters, saved to {out}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/quickstart"),
              show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds, e.g. 0,1,2 for the full table.")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A quickstart YAML (default: the embedded configs/quickstart.yaml).")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def quickstart(out: Path, seeds: str, config: Path | None, overrides: tuple) -> None:
    """The embedded default job: benchmark, pretrained tiny pyramid, teacher tuning, the method and its
    ablation on both tasks; writes OUT/results.json and OUT/report.md."""
    from .engine.config import ConfigError, load_config
    from .quickstart import QuickstartConfig, default_config_path, run_quickstart

    try:
        cfg = load_config(config or default_config_path(), overrides, schema=QuickstartConfig)
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    results = run_quickstart(out, cfg, seed_list)
    for task, block in results["tasks"].items():
        click.echo(task)
        for row, r in block["rows"].items():
            acc = sum(r["accuracy"]) / len(r["accuracy"])
            click.echo(f"  {row:<20} params {r['params']:>9,}  accuracy {acc:.3f}")
    click.echo(f"results: {out / 'results.json'}; report: {out / 'report.md'}")


if __name__ == "__main__":  # pragma: no cover
    main()
