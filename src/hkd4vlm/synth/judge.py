"""A judge's recipe: the chain of stages that makes a task-tuned model from nothing (docs/pretraining.md,
"Shipped judges"), run in order and resumable, and the zoo entry that ships the result with it.

A recipe names a preset and its stages, each writing ``OUT/<name>/``: the text stage
(``synth.textstage.run_text_stage``, through words or, after alignment, through pixels), alignment
(``run_alignment``) and task SFT on a dataset's training split (``engine.sft.run_sft``). A stage starts from
an earlier stage's model (``init`` / ``model``; an alignment may take its tower from another alignment,
``tower_from``), so a chain is a small graph run in the listed order. A finished stage is kept as long as
its settings are the recipe's (``OUT/<name>/judge_stage.json``); ``only`` runs one stage whose inputs are
finished, so that independent stages can run side by side.

A finished stage can ship on its own (``publish_stage``: a zoo entry of kind ``judge-stage`` with the part of
the recipe that made it), and a recipe's stage may start from one (``init: zoo:NAME``), as a chain long
enough to span several sessions keeps what each of them finished."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ..data.tasks import TASKS, Task
from ..engine.config import ConfigError, StrictModel, TrainSettings

STAGE_FILE = "judge_stage.json"
JUDGE_KIND = "judge"
#: a finished stage shipped on its own, for later chains to start from (``init: zoo:NAME``)
STAGE_KIND = "judge-stage"
SHIPPED = "zoo:"  # models.zoo.PREFIX: a stage's input that is a shipped stage, not one of the recipe's


def shipped(ref: str) -> bool:
    """Whether a stage's input names a shipped stage (``zoo:NAME``) rather than an earlier stage."""
    return ref.startswith(SHIPPED)


class _Stage(StrictModel):
    def inputs(self) -> list[str]:
        """The stages (earlier or shipped) this one starts from, as ``_wanted`` lists them."""
        return [ref for _, ref, _ in _wanted(self) if ref is not None]


class TextStageSpec(_Stage):
    kind: Literal["text_stage"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    init: str | None = Field(
        default=None, description="an earlier stage's name or a shipped stage (zoo:NAME); none: the preset built fresh"
    )
    steps: int = Field(ge=1)
    stop_after: int | None = Field(default=None, ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(default=64, ge=1)
    warmup: int = Field(default=100, ge=0)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    hop_weight: float = Field(default=1.0, ge=0)
    pixels: bool = False
    statement_hops: bool = False
    claimed_hop: bool = False
    verdict_hop: bool = False
    carry_hop: bool = False
    tasks: list[Task] = Field(default=list(TASKS), min_length=1)
    eval_every: int = Field(default=250, ge=1)
    held_out: int = Field(default=256, ge=1)
    seed: int = 0


class AlignSpec(_Stage):
    kind: Literal["align"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    model: str = Field(description="the text stage whose vision tower is aligned (or a shipped one, zoo:NAME)")
    tower_from: str | None = Field(default=None, description="an earlier alignment whose tower to start from")
    steps: int = Field(ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=32, ge=1)
    word_weight: float = Field(default=1.0, ge=0)
    held_out: int = Field(default=256, ge=1)
    seed: int = 0


class SftSpec(_Stage):
    kind: Literal["sft"]
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    model: str
    tasks: list[Task] = Field(default=list(TASKS), min_length=1)
    split: str = "train"
    eval_split: str | None = "val"
    seed: int = 0
    train: TrainSettings


StageSpec = Annotated[TextStageSpec | AlignSpec | SftSpec, Field(discriminator="kind")]


class JudgeRecipe(StrictModel):
    """A preset and the chain of stages that turns it into a task-tuned judge."""

    preset: str
    prompt_version: int = Field(description="the prompt version the chain was run with (models.prompt)")
    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _chain(self) -> JudgeRecipe:
        # a shipped stage's kind is checked against its manifest when the chain runs (check_shipped)
        made: dict[str, str] = {}  # stage name -> what it makes (_made)
        for i, st in enumerate(self.stages):
            if st.name in made:
                raise ValueError(f"stages.{i}: the name {st.name!r} is taken by an earlier stage")
            for field, ref, kinds in _wanted(st):
                if ref is None:  # tower_from may be left out; a text stage through pixels needs its init
                    if field == "init" and kinds:
                        raise ValueError(f"stages.{i} ({st.name}): no init; {_needs(st.name, kinds)}")
                    continue
                if shipped(ref):
                    continue
                if ref not in made:
                    raise ValueError(
                        f"stages.{i} ({st.name}): {ref!r} is not an earlier stage (nor a shipped one, zoo:NAME)"
                    )
                if kinds and made[ref] not in kinds:
                    raise ValueError(
                        f"stages.{i} ({st.name}): {field} {ref!r} is {_say(made[ref])}; {_needs(st.name, kinds)}"
                    )
            made[st.name] = _made(st)
        return self


#: what a stage makes, as the stages after it see it: a text stage through pixels is its own kind (a later text
#: stage through pixels may continue it, as it may an alignment)
PIXELS = "text_stage_pixels"
_WORDS = {
    "text_stage": "a text stage through words",
    PIXELS: "a text stage through pixels",
    "align": "an alignment",
    "sft": "an SFT stage",
}


def _say(kind: str | None) -> str:
    return _WORDS.get(kind or "", f"a stage of kind {kind!r}")


def _needs(who: str, kinds: tuple[str, ...]) -> str:
    return f"{who} needs {' or '.join(_say(k) for k in kinds)}"


def _made(st) -> str:
    """What stage ``st`` of a recipe makes, as the stages after it see it."""
    return PIXELS if isinstance(st, TextStageSpec) and st.pixels else st.kind


def _made_shipped(manifest: dict) -> str | None:
    """What a shipped stage makes (``_made`` of its recipe's last stage)."""
    kind = manifest.get("stage_kind")
    stages = manifest.get("recipe", {}).get("stages") or [{}]
    return PIXELS if kind == "text_stage" and stages[-1].get("pixels") else kind


def _wanted(st) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """Each input field of ``st``: its name, the stage it names (None: none) and the kinds (``_made``) it
    takes there (empty: any)."""
    if isinstance(st, AlignSpec):
        return [("model", st.model, ("text_stage", PIXELS)), ("tower_from", st.tower_from, ("align",))]
    if isinstance(st, TextStageSpec):
        return [("init", st.init, ("align", PIXELS) if st.pixels else ())]
    return [("model", st.model, ())]


def check_shipped(recipe: JudgeRecipe) -> None:
    """ConfigError (naming the stage) for a shipped stage a recipe starts from that is missing, not a judge
    stage, made for another preset or prompt version, or of the wrong kind (an alignment where a text stage is
    needed, ...); files that differ from its manifest are refused when it loads."""
    from ..models import zoo

    for i, st in enumerate(recipe.stages):
        for _, ref, kinds in _wanted(st):
            if ref is None or not shipped(ref):
                continue
            where = f"stages.{i} ({st.name}): {ref}"
            m = zoo.read_manifest(ref[len(SHIPPED) :])
            if m.get("kind") != STAGE_KIND:
                raise ConfigError(f"{where} is not a shipped judge stage (`hkd4vlm judge publish --stage`)")
            if m.get("preset") != recipe.preset:
                raise ConfigError(f"{where} was made for preset {m.get('preset')!r}, the recipe's is {recipe.preset!r}")
            made = m.get("recipe", {}).get("prompt_version")
            if made != recipe.prompt_version:
                raise ConfigError(
                    f"{where} was made with prompt version {made}, the recipe's is {recipe.prompt_version}"
                )
            have = _made_shipped(m)
            if kinds and have not in kinds:
                raise ConfigError(f"{where} is shipped as {_say(have)}; {_needs(st.name, kinds)}")


def recipe_digest(recipe: JudgeRecipe) -> str:
    """A short digest of the recipe (16 hex digits of the sha256 of its canonical JSON)."""
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_recipe(source: str | Path) -> JudgeRecipe:
    """A judge recipe from a YAML file or from a shipped judge's (or judge stage's) manifest (``zoo:NAME``);
    ConfigError names the file and what is wrong (``engine.config.load_config``)."""
    from ..engine.config import load_config
    from ..models import zoo

    if zoo.is_zoo(source):
        manifest = zoo.read_manifest(str(source)[len(zoo.PREFIX) :])
        if manifest.get("kind") not in (JUDGE_KIND, STAGE_KIND):
            raise ConfigError(f"{source}: a base, not a judge (its recipe is `hkd4vlm pretrain --like`'s)")
        return load_config(None, schema=JudgeRecipe, base=manifest["recipe"], base_source=f"{source} (manifest)")
    return load_config(source, schema=JudgeRecipe)


def shortened(recipe: JudgeRecipe, steps: int, held_out: int = 4) -> JudgeRecipe:
    """The same chain with every stage cut to ``steps`` steps and ``held_out`` held-out records (a smoke run:
    every stage of a shipped recipe runs, in tests)."""
    stages: list[Any] = []
    for st in recipe.stages:
        if isinstance(st, SftSpec):
            train = st.train.model_copy(
                update={
                    "steps": steps,
                    "stop_after": None,
                    "eval_every": 0,
                    "optim": st.train.optim.model_copy(
                        update={"warmup_steps": min(st.train.optim.warmup_steps, steps)}
                    ),
                }
            )
            stages.append(st.model_copy(update={"train": train}))
        elif isinstance(st, TextStageSpec):
            update = {"steps": steps, "stop_after": None, "held_out": held_out, "warmup": min(st.warmup, steps)}
            stages.append(st.model_copy(update=update))
        else:
            stages.append(st.model_copy(update={"steps": steps, "held_out": held_out}))
    return JudgeRecipe(preset=recipe.preset, prompt_version=recipe.prompt_version, stages=stages)


def _spec_json(spec) -> dict:
    return spec.model_dump(mode="json")


def _without_stop(settings: dict) -> dict:
    """A stage's settings less where it stops (``stop_after``; an SFT stage's ``train.stop_after``): the
    schedule spans ``steps`` either way, so a run not yet finished may be stopped earlier or later."""
    settings = {k: v for k, v in settings.items() if k != "stop_after"}
    if isinstance(settings.get("train"), dict):
        settings["train"] = {k: v for k, v in settings["train"].items() if k != "stop_after"}
    return settings


def stage_done(out: Path, spec) -> bool:
    """Whether ``out/<name>`` holds the stage's finished model, made with ``spec``'s settings; ConfigError
    where it holds one made with others. A stage not yet finished may change only where it stops
    (``stop_after``), as a run resumed to another stop does."""
    folder = out / spec.name
    marker = folder / STAGE_FILE
    if not marker.is_file():
        return False
    from .textstage import ADDED_SETTINGS

    # a text stage's setting added since the stage was made has the value it had then (textstage.ADDED_SETTINGS)
    added = ADDED_SETTINGS if isinstance(spec, TextStageSpec) else {}
    made, wanted = {**added, **json.loads(marker.read_text(encoding="utf-8"))}, _spec_json(spec)
    finished = (folder / "model" / "config.json").is_file()
    if made != wanted and (finished or _without_stop(made) != _without_stop(wanted)):
        raise ConfigError(
            f"{marker}: stage {spec.name!r} was made with other settings than the recipe's; use a new out "
            "folder or remove that stage's folder"
        )
    return finished


def run_judge(
    recipe: JudgeRecipe, data_root, out, *, only: str | None = None, progress: bool = True, log=print
) -> Path:
    """Run ``recipe``'s stages in order into ``out/<stage>/`` (finished ones are kept, interrupted ones
    resume) and return the last stage's model folder. ``only``: run just that stage (its inputs must be
    finished) and return its model folder. ``data_root``: the dataset whose text builds the tokenizer and
    whose splits SFT reads."""
    from ..engine.config import DataConfig, TrainConfig
    from ..engine.sft import run_sft
    from ..files import write_text_atomic
    from ..models.prompt import PROMPT_VERSION
    from .textstage import run_alignment, run_text_stage

    if recipe.prompt_version != PROMPT_VERSION:
        raise ConfigError(
            f"the recipe was run with prompt version {recipe.prompt_version}, the code's is {PROMPT_VERSION}: "
            "its stages would train another prompt; update the recipe's prompt_version to make a new judge"
        )
    names = [st.name for st in recipe.stages]
    if only is not None and only not in names:
        raise ConfigError(f"no stage {only!r} in the recipe; its stages: {', '.join(names)}")
    check_shipped(recipe)
    out = Path(out)

    def model_of(name: str) -> Path | str:
        # a shipped stage stays zoo:NAME: loading checks it against its manifest and reads it as float32
        return name if shipped(name) else out / name / "model"

    for st in recipe.stages:
        if only is not None and st.name != only:
            continue
        if stage_done(out, st):
            log(f"{st.name}: finished ({model_of(st.name)})")
            continue
        missing = [
            ref for ref in st.inputs() if not shipped(ref) and not (out / ref / "model" / "config.json").is_file()
        ]
        if missing:  # only with ``only``: in order, every input was made before
            raise ConfigError(f"stage {st.name!r} needs stage(s) {', '.join(missing)} finished first")
        folder = out / st.name
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / STAGE_FILE, json.dumps(_spec_json(st), indent=2) + "\n")
        log(f"{st.name}: {st.kind}")
        # a stage's own fields are the keyword arguments of the function that runs it, by name
        if isinstance(st, TextStageSpec):
            run_text_stage(
                recipe.preset,
                data_root,
                folder,
                **st.model_dump(exclude={"kind", "name", "init", "tasks"}),
                tasks=tuple(st.tasks),
                init=None if st.init is None else str(model_of(st.init)),
                progress=progress,
            )
        elif isinstance(st, AlignSpec):
            run_alignment(
                model_of(st.model),
                folder,
                **st.model_dump(exclude={"kind", "name", "model", "tower_from"}),
                tower_from=None if st.tower_from is None else model_of(st.tower_from),
                log=log,
            )
        else:
            settings = {k: getattr(st.train, k) for k in TrainSettings.model_fields}
            cfg = TrainConfig(
                model=str(model_of(st.model)),
                out=folder,
                data=DataConfig(root=Path(data_root), tasks=st.tasks, split=st.split, eval_split=st.eval_split),
                seed=st.seed,
                save_every=100,
                progress=progress,
                **settings,
            )
            run_sft(cfg, resume=True)
    return out / (only if only is not None else recipe.stages[-1].name) / "model"


def stage_recipe(recipe: JudgeRecipe, stage: str) -> JudgeRecipe:
    """The part of ``recipe`` that makes ``stage``: that stage and the ones it starts from, in the recipe's
    order (shipped stages it starts from stay ``zoo:NAME``)."""
    by_name = {st.name: st for st in recipe.stages}
    if stage not in by_name:
        raise ConfigError(f"no stage {stage!r} in the recipe; its stages: {', '.join(by_name)}")
    needed: set[str] = set()
    todo = [stage]
    while todo:
        name = todo.pop()
        if name not in needed and not shipped(name):
            needed.add(name)
            todo.extend(by_name[name].inputs())
    return JudgeRecipe(
        preset=recipe.preset,
        prompt_version=recipe.prompt_version,
        stages=[st for st in recipe.stages if st.name in needed],
    )


def finished_part(run: Path, recipe: JudgeRecipe, stage: str) -> JudgeRecipe:
    """``stage_recipe(recipe, stage)``, each of whose stages is finished in ``run`` (ConfigError naming the
    first that is not)."""
    part = stage_recipe(recipe, stage)
    for st in part.stages:
        if not stage_done(run, st):
            raise ConfigError(f"{run / st.name}: stage {st.name!r} is not finished; run the recipe first")
    return part


def _held_out(run: Path, recipe: JudgeRecipe) -> dict:
    held_out = {}
    for st in recipe.stages:
        report = run / st.name / "eval.json"
        if report.is_file():
            held_out[st.name] = json.loads(report.read_text(encoding="utf-8"))
    return held_out


def _data_stats(data_root) -> dict:
    stats_file = Path(data_root) / "stats.json"
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else {}
    return {k: stats[k] for k in ("level", "seed", "sizes") if k in stats}


def publish_stage(run, data_root, name: str, recipe: JudgeRecipe, stage: str) -> Path:
    """Publish one finished stage of the chain in ``run`` into the zoo as ``name`` (kind ``judge-stage``), for
    later chains to start from (``init: zoo:NAME``): its model in half precision and a manifest with the part
    of the recipe that made it (``stage_recipe``) and its digest, and the held-out check of each of those
    stages. Nothing is scored on ``data_root``'s splits (a stage through words reads no image); its stats
    (level, seed, sizes) are recorded."""
    from ..models import zoo
    from ..models.loading import load_model

    run = Path(run)
    part = finished_part(run, recipe, stage)
    spec = part.stages[-1]
    model, processor = load_model(run / stage / "model", dtype="float32")
    return zoo.publish(
        model,
        processor,
        name,
        manifest={
            "kind": STAGE_KIND,
            "role": "base",
            "preset": part.preset,
            "stage": stage,
            "stage_kind": spec.kind,
            "recipe": part.model_dump(mode="json"),
            "recipe_digest": recipe_digest(part),
            "stages_held_out": _held_out(run, part),
            "data": _data_stats(data_root),
        },
    )


def publish_judge(run, data_root, name: str, recipe: JudgeRecipe, *, role: str = "teacher") -> Path:
    """Publish the finished chain in ``run`` (``run_judge``'s ``out``) into the zoo as ``name``: the last
    stage's model in half precision and a manifest with the part of the recipe that made it
    (``stage_recipe``: stages tried beside the chain and left unfinished do not ship with it) and its digest,
    each of those stages' held-out check, and the accuracy per task on ``data_root``'s test and validation
    splits, measured here from the half-precision weights that ship."""
    import torch

    from ..engine.sft import split_eval
    from ..models import zoo
    from ..models.loading import load_model

    run = Path(run)
    recipe = finished_part(run, recipe, recipe.stages[-1].name)
    check_shipped(recipe)
    held_out = _held_out(run, recipe)
    model, processor = load_model(run / recipe.stages[-1].name / "model", dtype="float32")
    # scored as it ships: the weights stored in half precision load as float32
    model = model.to(torch.float16).to(torch.float32).eval()
    scores = {split: split_eval(data_root, list(TASKS), split)(model, processor) for split in ("test", "val")}
    accuracy = {
        split: {t: s[f"accuracy_{t}"] for t in TASKS} | {f"n_{t}": s[f"n_{t}"] for t in TASKS}
        for split, s in scores.items()
    }
    return zoo.publish(
        model,
        processor,
        name,
        manifest={
            "kind": JUDGE_KIND,
            "role": role,
            "preset": recipe.preset,
            "recipe": recipe.model_dump(mode="json"),
            "recipe_digest": recipe_digest(recipe),
            "accuracy": accuracy,
            "stages_held_out": held_out,
            "data": _data_stats(data_root),
        },
    )
