"""A model card for every trained judge: ``README.md`` in the run's ``model/`` folder, in the Hugging Face Hub's
card format (as TRL's trainers write one), so that the folder says what it is wherever it is copied or pushed.

The YAML header holds what the Hub reads (``base_model`` when the run started from a Hub id, ``library_name``,
``pipeline_tag``, ``tags``, ``metrics`` and, where the run evaluated, ``model-index`` with one result per task)
and an ``hkd4vlm`` block with the run's facts (kind, base, steps, batch, seed, readout, data, label fraction,
teachers). The body gives the recipe, the data, the evaluation with 95% intervals, the readout and how to
load the model.

Everything is read from the files a run leaves (``config.yaml``, ``eval.json``; for a distillation stage
``done.json`` and the recipe's ``recipe.yaml``; the model's ``config.json``), so ``hkd4vlm card MODEL_DIR``
writes the same card again at any time. Nothing else in the folder is changed: a model folder carries no
file manifest (the zoo's bases do, and get no card).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from ..data.tasks import Task
from ..errors import UserError
from ..files import write_text_atomic

CARD = "README.md"
#: the folder name of a recipe's stage (distill.recipe): stage-INDEX-KIND-levelLEVEL
_STAGE_DIR = re.compile(r"^stage-(?P<index>\d+)-(?P<kind>sft|ppod|tcrd)-level(?P<level>\d+)$")
_TASK_NAMES = {"hallucination": "hallucination detection", "factuality": "factuality checking"}
#: the normal quantile of a two-sided 95% interval
Z95 = 1.959963984540054


class CardError(UserError, ValueError):
    pass


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``accuracy`` observed on ``n`` records (Wilson 1927): unlike the
    normal one it stays within [0, 1] and is not empty at 0 or 1."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denom
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CardError(f"{path}: cannot be read for the model card ({e})") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: a mapping was expected for the model card")
    return data


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CardError(f"{path}: not valid JSON ({e}); the model card cannot be written") from None
    return data if isinstance(data, dict) else None


def _is_hub_id(ref: str) -> bool:
    from ..models.hub import is_hub_id

    return not Path(ref).is_dir() and is_hub_id(ref)


def label_counts(root: str | Path, tasks: list[Task], split: str) -> dict | None:
    """``{"records": N, "labelled": L}`` of the training split's files (invalid records counted as records,
    not as labelled); None when the data is not there to count."""
    from ..data.layout import read_split
    from ..data.records import DatasetError

    records = labelled = 0
    try:
        for task in tasks:
            s = read_split(root, task, split, skip_invalid=True)
            records += len(s.records) + len({p.record for p in s.skipped})
            labelled += sum(r.correct_choice is not None for r in s.records)
    except (OSError, DatasetError, ValueError):
        return None
    return {"records": records, "labelled": labelled}


def run_facts(model_dir: str | Path) -> dict[str, Any]:
    """What the card says, gathered from the run folder around ``model_dir`` (``RUN/model``); CardError naming
    the missing file when ``model_dir`` is not the model of a training run."""
    model_dir = Path(model_dir)
    run = model_dir.parent
    if not (model_dir / "config.json").is_file():
        raise CardError(f"{model_dir}: not a model folder (no config.json)")
    if (model_dir / "manifest.json").is_file():
        raise CardError(
            f"{model_dir}: a zoo base (it has manifest.json, which lists every file it holds); its card is the manifest"
        )
    if model_dir.name != "model" or not (run / "config.yaml").is_file():
        raise CardError(
            f"{model_dir}: not the model/ folder of a training run (no {run / 'config.yaml'} beside it); a card is "
            "written from the run's config.yaml and eval.json"
        )
    cfg = _read_yaml(run / "config.yaml")
    data = cfg.get("data") or {}
    model_config = _read_json(model_dir / "config.json") or {}
    from ..models.scoring import READOUT_KEY, VERDICT_KEY

    facts: dict[str, Any] = {
        "name": run.name,
        "kind": "sft",
        "base": str(cfg.get("model")),
        "starts_from": str(cfg.get("model")),
        "steps": cfg.get("stop_after") or cfg.get("steps"),  # the steps run (a run stopped early: stop_after)
        "schedule_steps": cfg.get("steps"),
        "batch_size": cfg.get("batch_size"),
        "grad_accum": cfg.get("grad_accum"),
        "lr": (cfg.get("optim") or {}).get("lr"),
        "warmup_steps": (cfg.get("optim") or {}).get("warmup_steps"),
        "seed": cfg.get("seed"),
        "mixed_precision": cfg.get("mixed_precision"),
        "augment": cfg.get("augment") or {},
        "lora": cfg.get("lora"),
        "freeze_vision": bool(cfg.get("freeze_vision")),
        "readout": model_config.get(READOUT_KEY) or "letter",
        "verdict_token": model_config.get(VERDICT_KEY),
        "architecture": (model_config.get("architectures") or [None])[0],
        "model_type": model_config.get("model_type"),
        "data": {
            "root": str(data.get("root")),
            "tasks": list(data.get("tasks") or []),
            "split": data.get("split", "train"),
            "eval_split": data.get("eval_split"),
            "eval_limit": data.get("eval_limit"),
        },
        "teachers": [],
        "stage": None,
    }
    stage = _STAGE_DIR.match(run.name)
    if stage and (run.parent / "recipe.yaml").is_file():
        recipe = _read_yaml(run.parent / "recipe.yaml")
        pyramid = [str(p) for p in recipe.get("pyramid") or []]
        index, level = int(stage["index"]), int(stage["level"])
        done = _read_json(run / "done.json") or {}
        settings = done.get("stage") or (recipe.get("stages") or [{}] * (index + 1))[index]
        settings = {k: v for k, v in settings.items() if k != "train"}
        levels = list(range(level)) if stage["kind"] == "ppod" else []
        if stage["kind"] == "tcrd":
            levels = [settings.get("teacher", 0), settings.get("assistant", 1)]
        caches = settings.get("cache") or {}
        # the teachers are the levels' models as this stage found them: earlier stages may have trained them
        current = dict(enumerate(pyramid))
        for i, earlier in enumerate((recipe.get("stages") or [])[:index]):
            record = _read_json(
                run.parent / f"stage-{i}-{earlier.get('kind')}-level{earlier.get('level')}" / "done.json"
            )
            if record and isinstance(earlier.get("level"), int):
                current[earlier["level"]] = str(record.get("model"))
                if "teacher" in record:  # a mutual PPOD stage's nearest teacher learned too
                    current[earlier["level"] - 1] = str(record["teacher"])
        facts.update(
            name=f"{run.parent.name}/{run.name}",
            kind=stage["kind"],
            base=pyramid[level] if level < len(pyramid) else facts["base"],
            stage={"index": index, "level": level, **settings},
            pyramid=pyramid,
            teachers=[
                {
                    "level": j,
                    "model": current.get(j, "?"),
                    "cache": caches.get(j, caches.get(str(j))),
                }
                for j in levels
            ],
        )
    counts = label_counts(data.get("root", ""), facts["data"]["tasks"], facts["data"]["split"])
    if counts is not None:
        facts["data"].update(counts)
        facts["label_fraction"] = round(counts["labelled"] / counts["records"], 4) if counts["records"] else None
    else:
        facts["label_fraction"] = None
    facts["eval"] = _eval_rows(_read_json(run / "eval.json"), facts["data"]["tasks"])
    return facts


def _eval_rows(metrics: dict | None, tasks: list[str]) -> list[dict]:
    """One row per task of eval.json (accuracy, records, 95% interval), then their mean."""
    if not metrics:
        return []
    rows: list[dict[str, Any]] = []
    for task in tasks:
        acc, n = metrics.get(f"accuracy_{task}"), metrics.get(f"n_{task}")
        if not isinstance(acc, (int, float)):
            continue
        low, high = wilson_interval(acc, n) if isinstance(n, int) else (None, None)
        rows.append({"task": task, "accuracy": float(acc), "n": n, "low": low, "high": high})
    if len(rows) > 1 and isinstance(metrics.get("accuracy"), (int, float)):
        # the mean of independent per-task accuracies: its variance is the mean of theirs over the count
        known = [r for r in rows if r["n"]]
        low = high = None
        if len(known) == len(rows):
            se = math.sqrt(sum(r["accuracy"] * (1 - r["accuracy"]) / r["n"] for r in rows)) / len(rows)
            acc = float(metrics["accuracy"])
            low, high = max(0.0, acc - Z95 * se), min(1.0, acc + Z95 * se)
        rows.append({"task": "mean", "accuracy": float(metrics["accuracy"]), "n": None, "low": low, "high": high})
    return rows


def model_card(model_dir: str | Path) -> str:
    """The card's text (YAML header and body) for the model of a training run."""
    from huggingface_hub import EvalResult, ModelCardData

    facts = run_facts(model_dir)
    data = facts["data"]
    dataset = Path(data["root"]).name or data["root"]
    tasks = data["tasks"]
    tags = [
        "hkd4vlm",
        "vision-language-model",
        "judge",
        *(_TASK_NAMES[t].replace(" ", "-") for t in tasks if t in _TASK_NAMES),
    ]
    tags += ["sft"] if facts["kind"] == "sft" else ["knowledge-distillation", facts["kind"]]
    if facts["lora"]:
        tags.append("lora")
    results = [
        EvalResult(
            task_type="image-text-to-text",
            task_name=_TASK_NAMES.get(r["task"], r["task"]),
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_config=r["task"],
            dataset_split=data["eval_split"],
            metric_type="accuracy",
            metric_value=round(r["accuracy"], 4),
            metric_name=f"accuracy ({r['task']})",
        )
        for r in facts["eval"]
        if r["task"] != "mean"
    ]
    header: dict[str, Any] = {
        "hkd4vlm": {
            k: facts[k]
            for k in ("kind", "base", "starts_from", "steps", "batch_size", "seed", "readout", "label_fraction")
        }
        | {"tasks": tasks, "data": data["root"], "split": data["split"], "eval_split": data["eval_split"]}
        | ({"teachers": [t["model"] for t in facts["teachers"]]} if facts["teachers"] else {}),
    }
    hub_base = _is_hub_id(facts["base"])
    extra: dict[str, Any] = {"base_model_relation": "finetune"} if hub_base else {}
    card = ModelCardData(
        base_model=facts["base"] if hub_base else None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=tags,
        metrics=["accuracy"] if results else None,
        model_name=facts["name"],
        eval_results=results or None,
        **extra,
        **header,
    )
    return f"---\n{card.to_yaml()}\n---\n\n" + _body(facts, Path(model_dir)) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value in (None, "", []) else str(value)


def _body(f: dict, model_dir: Path) -> str:
    data, tasks = f["data"], f["data"]["tasks"]
    what = " and ".join(_TASK_NAMES.get(t, t) for t in tasks)
    kinds = {"sft": "supervised fine-tuning (SFT)", "ppod": "PPOD distillation", "tcrd": "TCRD distillation"}
    lines = [
        f"# {f['name']}",
        "",
        f"A vision-language judge for {what}, trained with hkd4vlm by {kinds[f['kind']]} "
        f"from `{f['base']}`"
        + (f" (this stage started from `{f['starts_from']}`)" if f["starts_from"] != f["base"] else "")
        + f". It answers a multiple-choice question about an image by reading a distribution over the options "
        f"({f['readout']} readout).",
        "",
        "## How to load it",
        "",
        "```python",
        "from hkd4vlm import Detector",
        "",
        f'det = Detector.from_pretrained("{model_dir}")  # or the Hub id it is pushed to',
        "```",
        "",
        "```bash",
        f"hkd4vlm predict --model {model_dir} --data DATA --task {tasks[0] if tasks else 'hallucination'} "
        "--split test --out preds.jsonl",
        f"hkd4vlm serve --model {model_dir}",
        "```",
        "",
        f"It is a plain `transformers` checkpoint ({f['architecture'] or 'AutoModelForImageTextToText'}, "
        f"`{f['model_type']}`): `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` "
        "load it; hkd4vlm adds the prompt layout and the readout.",
        "",
        "## Recipe",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {kinds[f['kind']]} |",
    ]
    if f["stage"]:
        st = f["stage"]
        lines.append(
            f"| stage | `stages.{st['index']}` of `{f['name'].split('/')[0]}/recipe.yaml`, pyramid level {st['level']} |"
        )
        lines.append(f"| pyramid | {', '.join(f'`{p}`' for p in f['pyramid'])} |")
        for t in f["teachers"]:
            cache = f" (read from the cache `{t['cache']}`)" if t["cache"] else ""
            lines.append(f"| teacher, level {t['level']} | `{t['model']}`{cache} |")
        for k, v in st.items():
            if k not in ("index", "level", "kind", "cache", "teacher", "assistant"):
                lines.append(f"| {k} | {_fmt(v)} |")
    lines += [
        f"| base model | `{f['base']}` |",
        f"| steps | {f['steps']} |",
        f"| batch size | {f['batch_size']} (gradient accumulation {f['grad_accum']}) |",
        f"| learning rate | {f['lr']} (warmup {f['warmup_steps']} steps, cosine"
        + (
            f" over {f['schedule_steps']} steps, stopped after {f['steps']}) |"
            if f["schedule_steps"] != f["steps"]
            else ") |"
        ),
        f"| seed | {f['seed']} |",
        f"| mixed precision | {f['mixed_precision']} |",
        f"| augmentation | {_fmt(f['augment'])} |",
        f"| LoRA | {_fmt(f['lora'])} |",
        f"| vision tower frozen | {'yes' if f['freeze_vision'] else 'no'} |",
        "",
        "## Data",
        "",
    ]
    fraction = f["label_fraction"]
    counted = (
        f"{data['labelled']:,} of its {data['records']:,} records carry a gold answer (label fraction "
        f"{fraction:.2%}); training reads the labelled ones."
        if fraction is not None
        else "The data folder was not there to count its records when this card was written."
    )
    lines += [
        f"Trained on the `{data['split']}` split of `{data['root']}` ({', '.join(tasks)}). {counted}",
        "",
        "## Evaluation",
        "",
    ]
    if f["eval"]:
        limit = f" (at most {data['eval_limit']} records per task)" if data["eval_limit"] else ""
        lines += [
            f"Accuracy on the `{data['eval_split']}` split{limit} at the end of training, with 95% intervals "
            "(Wilson per task; the mean's from the tasks' variances).",
            "",
            "| task | records | accuracy | 95% interval |",
            "|---|---|---|---|",
        ]
        for r in f["eval"]:
            interval = f"{r['low']:.3f} – {r['high']:.3f}" if r["low"] is not None else "n/a"
            lines.append(
                f"| {r['task']} | {r['n'] if r['n'] is not None else '-'} | {r['accuracy']:.3f} | {interval} |"
            )
    else:
        lines.append(
            "The run did not evaluate (no `data.eval_split`): `hkd4vlm predict` and `hkd4vlm evaluate` measure it."
        )
    readouts = {
        "letter": "the next-token logits of the option letters at the answer cue (`Answer:`), softmaxed over the "
        "record's letters",
        "option": f"the logit of the verdict token (`{f['verdict_token'] or 'Yes'}`) at the end of each option's "
        "text, softmaxed over the options",
    }
    lines += [
        "",
        "## Readout",
        "",
        f"`{f['readout']}`: the answer distribution is {readouts.get(f['readout'], f['readout'])}. The readout is "
        "saved in `config.json` (`hkd4vlm_readout`), so every hkd4vlm command reads the model the way it was "
        "trained.",
        "",
        "## Framework versions",
        "",
        *_versions(),
    ]
    return "\n".join(lines)


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("hkd4vlm", "transformers", "torch", "accelerate"):
        try:
            out.append(f"- {name}: {version(name)}")
        except PackageNotFoundError:
            continue
    return out


def write_card(model_dir: str | Path) -> Path:
    """Write (or write again) ``model_dir/README.md`` from its run; returns its path."""
    path = Path(model_dir) / CARD
    return write_text_atomic(path, model_card(model_dir))
