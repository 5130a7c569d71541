"""Recipes: an ordered list of stages (sft / ppod / tcrd) over a pyramid of models, each stage training
one level of the pyramid and starting from that level's latest weights. A stage that finished is
skipped when the recipe runs again; one that was interrupted resumes from its last checkpoint.

    hkd4vlm distill RECIPE.yaml [stages.3.tau=3.0 stages.1.train.steps=200 ...]

A stage's config holds only its kind's settings (a union keyed on ``kind``), plus the ``train`` block
that every kind shares (steps, batch, optimizer, augmentation, ...): a key that a kind does not use is
an error naming the stage and the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import Field, model_validator

from ..engine.card import write_card
from ..engine.config import DataConfig, ModelRef, StrictModel, TrainConfig, TrainSettings, save_config
from ..engine.distributed import barrier, is_main_process
from ..files import write_text_atomic


class StageTrainConfig(TrainSettings):
    """How a stage trains its model, whatever its kind (the stage's ``train`` block): every setting a training
    run has (engine.config.TrainSettings), a stage's own default step count. The run-wide settings (seed,
    save_every, progress) are the recipe's."""

    steps: int = Field(default=500, ge=1, description="optimizer steps of this stage")


class LossConfig(StrictModel):
    """A divergence of ``distill.losses`` chosen by its registered name, with its own settings
    (``{name: generalized_jsd, kwargs: {beta: 0.5}}``; a plain name is read as ``{name: NAME}``)."""

    name: str = "forward_kl"
    kwargs: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _known(self) -> LossConfig:
        import torch

        from .losses import get_loss, loss_settings

        fn = get_loss(self.name)  # ValueError listing the known names
        unknown = sorted(set(self.kwargs) - set(loss_settings(self.name)))
        if unknown:
            raise ValueError(
                f"loss {self.name} has no setting(s) {unknown}; its settings: "
                f"{sorted(loss_settings(self.name)) or 'none'}"
            )
        fn(torch.zeros(1, 2), teacher_probs=torch.full((1, 2), 0.5), tau=1.0, **self.kwargs)  # range checks
        return self

    def build(self):
        """The divergence with its settings bound: ``fn(student_logits, teacher_logits=None, *, teacher_probs, tau, ...)``."""
        from functools import partial

        from .losses import get_loss

        return partial(get_loss(self.name), **self.kwargs) if self.kwargs else get_loss(self.name)


class _Stage(StrictModel):
    level: int = Field(ge=0, description="index into the pyramid of the model this stage trains")
    train: StageTrainConfig = StageTrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _own_keys(cls, data: Any) -> Any:
        """A key of another kind, or one that belongs in ``train``, is named as such."""
        if not isinstance(data, dict):
            return data
        kind = cls.model_fields["kind"].default
        for key in data:
            if key in cls.model_fields:
                continue
            hint = ""
            if key in StageTrainConfig.model_fields:
                hint = f" (it belongs in the train block: train.{key})"
            else:
                owners = [k for k, c in STAGE_KINDS.items() if key in c.model_fields]
                if owners:
                    hint = f" (it is a setting of {' and '.join(owners)} stages)"
            known = ["kind"] + [k for k in cls.model_fields if k != "kind"]
            raise ValueError(f"{key!r} is not a setting of kind {kind}{hint}; kind {kind} has: {', '.join(known)}")
        return data


class SFTStageConfig(_Stage):
    """``L_ce`` on the answer distribution."""

    kind: Literal["sft"] = "sft"


class PPODStageConfig(_Stage):
    """PPOD at ``level``: every level above it teaches (``distill.stages.PPODStage``)."""

    kind: Literal["ppod"] = "ppod"
    gamma: float = Field(default=0.5, ge=0)
    tau: tuple[float, float] = Field(default=(4.0, 1.0), description="temperature, start -> end of the stage")
    alpha: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = Field(
        default=(0.2, 0.5), description="weight of the distillation term against the labels, start -> end"
    )
    loss: LossConfig = LossConfig()
    mutual: bool = False
    mutual_lr: float = Field(
        default=1e-5, gt=0, allow_inf_nan=False, description="the nearest teacher's learning rate when mutual"
    )
    #: pyramid level -> teacher cache folder (hkd4vlm cache-teacher): that level is read, not run
    cache: dict[int, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _positive_tau(self) -> PPODStageConfig:
        if min(self.tau) <= 0:
            raise ValueError(f"tau must be positive, got {list(self.tau)}")
        return self


class TCRDStageConfig(_Stage):
    """TCRD at ``level`` with ``teacher`` and ``assistant`` levels (``distill.stages.TCRDStage``)."""

    kind: Literal["tcrd"] = "tcrd"
    teacher: int = Field(default=0, ge=0)
    assistant: int = Field(default=1, ge=0)
    tau: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    loss: LossConfig = LossConfig()
    lambda_gt: float = Field(default=1.0, ge=0)
    lambda_resp: float = Field(default=1.0, ge=0)
    lambda_feat: float = Field(default=0.5, ge=0)
    rectify: bool = True
    coupled: bool = True
    #: pyramid level -> teacher cache folder (hkd4vlm cache-teacher): that level is read, not run
    cache: dict[int, str] = Field(default_factory=dict)


STAGE_KINDS: dict[str, type[_Stage]] = {"sft": SFTStageConfig, "ppod": PPODStageConfig, "tcrd": TCRDStageConfig}
StageConfig = Annotated[SFTStageConfig | PPODStageConfig | TCRDStageConfig, Field(discriminator="kind")]


class RecipeConfig(StrictModel):
    pyramid: list[ModelRef] = Field(min_length=1, description="model directories, largest (teacher) first")
    data: DataConfig
    out: Path
    seed: int = Field(default=0, ge=0, lt=2**32)
    save_every: int = Field(default=250, ge=1)
    progress: bool = True
    stages: list[StageConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _levels_exist(self) -> RecipeConfig:
        n = len(self.pyramid)
        for i, st in enumerate(self.stages):
            refs = {"level": st.level}
            if st.kind == "tcrd":
                refs.update(teacher=st.teacher, assistant=st.assistant)
            for name, idx in refs.items():
                if idx >= n:
                    raise ValueError(f"stages.{i}.{name} = {idx}, but the pyramid has {n} models")
            if st.kind == "ppod" and st.level == 0:
                raise ValueError(f"stages.{i}: ppod at level 0 has no teacher above it")
            if st.kind == "tcrd" and st.level in (st.teacher, st.assistant):
                raise ValueError(
                    f"stages.{i}: the tcrd student (level {st.level}) cannot be its own teacher or assistant"
                )
        return self


def _train_config(recipe: RecipeConfig, stage: StageConfig, model: str, out: Path) -> TrainConfig:
    settings = {name: getattr(stage.train, name) for name in TrainSettings.model_fields}
    return TrainConfig(
        model=model,
        out=out,
        data=recipe.data,
        seed=recipe.seed,
        save_every=recipe.save_every,
        progress=recipe.progress,
        **settings,
    )


def run_recipe(recipe: RecipeConfig, *, on_step=None, resume_force: bool = False) -> dict[int, str]:
    """Run every stage in order; returns the final model directory of each pyramid level.

    ``resume_force``: resume an interrupted stage even where the recipe changed in a way that breaks an exact
    resume (see ``engine.loop.train``)."""
    from ..distill.cache import CachedTeacher
    from ..distill.losses import FeatureProjector
    from ..distill.stages import PPODStage, TCRDStage, Teacher, model_hidden_size
    from ..engine.loop import sft_stage, train
    from ..engine.sft import split_eval
    from ..engine.sources import RecordSource
    from ..models.loading import load_model

    out = Path(recipe.out)
    _check_resume(recipe, out, resume_force)  # before recipe.yaml is replaced
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_config(recipe, out / "recipe.yaml")
    current = {i: str(p) for i, p in enumerate(recipe.pyramid)}
    for i, st, stage_out in _pending_stages(recipe, out, current):
        done = stage_out / "done.json"
        cfg = _train_config(recipe, st, current[st.level], stage_out)
        model, processor = load_model(cfg.model, lora=cfg.lora, freeze_vision=cfg.freeze_vision)
        extra = {}

        def teacher_at(j: int, st=st):  # called within this iteration; bound for clarity
            if j in st.cache:
                return CachedTeacher(
                    st.cache[j],
                    model_dir=current[j],
                    root=recipe.data.root,
                    tasks=recipe.data.tasks,
                    split=recipe.data.split,
                    augment=st.train.augment,
                    seed=recipe.seed,
                    name=f"level{j}",
                    skip_invalid=recipe.data.skip_invalid,
                )
            return Teacher(*load_model(current[j]), name=f"level{j}")

        stage: Callable[..., dict[str, Any]]
        if st.kind == "sft":
            stage = sft_stage
        elif st.kind == "ppod":
            teachers = [teacher_at(j) for j in range(st.level)]
            stage = PPODStage(
                teachers,
                gamma=st.gamma,
                tau=st.tau,
                alpha=st.alpha,
                total_steps=st.train.steps,
                mutual_lr=st.mutual_lr if st.mutual else None,
                loss=st.loss.build(),
            )
        else:
            teacher, assistant = teacher_at(st.teacher), teacher_at(st.assistant)
            projector = FeatureProjector(model_hidden_size(model), assistant.hidden_size)
            extra = {"projector": projector}
            stage = TCRDStage(
                teacher,
                assistant,
                projector,
                tau=st.tau,
                lambda_gt=st.lambda_gt,
                lambda_resp=st.lambda_resp,
                lambda_feat=st.lambda_feat,
                rectify=st.rectify,
                coupled=st.coupled,
                loss=st.loss.build(),
            )
        variants = {t.variants for t in _teachers(stage) if isinstance(t, CachedTeacher)}
        if len(variants) > 1:
            raise ValueError(f"stages.{i}: teacher caches with different numbers of variants {sorted(variants)}")
        source = RecordSource(
            recipe.data.root,
            recipe.data.tasks,
            recipe.data.split,
            augment=st.train.augment,
            seed=recipe.seed,
            augment_epochs=variants.pop() if variants else None,
            skip_invalid=recipe.data.skip_invalid,
        )
        evaluate = None
        if recipe.data.eval_split:
            evaluate = split_eval(
                recipe.data.root,
                recipe.data.tasks,
                recipe.data.eval_split,
                limit=recipe.data.eval_limit,
                skip_invalid=recipe.data.skip_invalid,
            )
        mutual = st.kind == "ppod" and st.mutual
        final = train(
            cfg,
            source,
            stage=stage,
            model=model,
            processor=processor,
            evaluate=evaluate,
            resume=True,
            resume_force=resume_force,
            on_step=on_step,
            extra_modules=extra,
            stateful={"mutual": stage} if mutual else None,
        )
        record = {"model": str(final), "stage": st.model_dump(mode="json")}
        if mutual:  # the nearest teacher learned too (the same weights on every process): later stages use it
            from ..engine.loop import save_model

            nearest = cast(Teacher, cast(PPODStage, stage).teachers[-1])  # mutual: a PPOD stage, its nearest online
            record["teacher"] = str(stage_out / "mutual_teacher")
            if is_main_process():
                save_model(nearest.model, nearest.processor, stage_out / "mutual_teacher")
            current[st.level - 1] = record["teacher"]
        if is_main_process():
            write_text_atomic(done, json.dumps(record, indent=2))
            write_card(final)  # after done.json: the card names the stage's settings as recorded
        barrier()
        current[st.level] = str(final)
    return current


def _pending_stages(recipe: RecipeConfig, out: Path, current: dict[int, str]):
    """(index, stage, folder) of each stage not done yet, in order; a done stage's recorded models (its level's,
    and a mutual-learning teacher's) are written into ``current`` (level -> model) as it is passed."""
    for i, st in enumerate(recipe.stages):
        stage_out = out / f"stage-{i}-{st.kind}-level{st.level}"
        done = stage_out / "done.json"
        if done.is_file():
            record = read_done(done)
            current[st.level] = record["model"]
            if "teacher" in record:
                current[st.level - 1] = record["teacher"]
            continue
        yield i, st, stage_out


def read_done(done: Path) -> dict:
    """A finished stage's record (``done.json``: its model, the stage's settings, a mutual teacher); ConfigError
    naming the file when it cannot be read."""
    from ..engine.config import ConfigError

    try:
        record = json.loads(done.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        record, why = None, f"not valid JSON ({e})"
    else:
        why = "must be an object with a string 'model' (and 'stage', 'teacher')"
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("model"), str)
        or not isinstance(record.get("teacher", ""), str)
        or not isinstance(record.get("stage", {}), dict)
    ):
        raise ConfigError(f"{done}: {why}; remove {done.parent} to run the stage again, or restore the file") from None
    return record


def _changed(old, new, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested settings dicts: key -> (old, new). A key that ``old``
    lacks (a setting added since it was saved) is not a change."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(old, key=str):
            out.update(_changed(old.get(k), new.get(k), f"{prefix}{k}."))
        return out
    return {} if old == new else {prefix.rstrip("."): (old, new)}


def _check_finished(recipe: RecipeConfig, out: Path, resume_force: bool) -> None:
    """A finished stage is skipped when the recipe runs again; refuse (or, with ``resume_force``, say) when its
    settings in the recipe differ from those it was trained with, which would otherwise go unnoticed."""
    from ..engine.config import ConfigError

    for i, st in enumerate(recipe.stages):
        done = out / f"stage-{i}-{st.kind}-level{st.level}" / "done.json"
        if not done.is_file():
            continue
        saved = read_done(done).get("stage")
        changes = _changed(saved, st.model_dump(mode="json")) if saved is not None else {}
        if changes:
            what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            if not resume_force:
                raise ConfigError(
                    f"{done.parent}: stages.{i} finished with other settings ({what}) and would be skipped; "
                    f"remove {done.parent} to run it again with these, restore them, use a new out folder, or "
                    "pass --resume-force to keep the finished stage as it is"
                )
            print(f"stages.{i} finished with other settings ({what}); kept as it is (--resume-force)")


def _check_resume(recipe: RecipeConfig, out: Path, resume_force: bool) -> None:
    """Refuse to resume the interrupted stage (the first one not done) with settings that differ from the
    ones it started with, naming them, unless ``resume_force`` (``engine.loop.train`` checks the same; this
    runs first so that recipe.yaml is not replaced when refusing)."""
    from ..engine.checkpoint import checkpoint_dirs
    from ..engine.config import ConfigError, resume_changes

    _check_finished(recipe, out, resume_force)
    current = {i: str(p) for i, p in enumerate(recipe.pyramid)}
    for i, st, stage_out in _pending_stages(recipe, out, current):
        if checkpoint_dirs(stage_out / "checkpoints") and (stage_out / "config.yaml").is_file() and not resume_force:
            changes = resume_changes(stage_out / "config.yaml", _train_config(recipe, st, current[st.level], stage_out))
            if changes:
                what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
                raise ConfigError(
                    f"{stage_out}: stages.{i} was interrupted and would resume with changed settings "
                    f"({what}); restore them, use a new out folder, or pass --resume-force"
                )
        return


def _teachers(stage) -> list:
    return list(getattr(stage, "teachers", [])) + [
        t for t in (getattr(stage, "teacher", None), getattr(stage, "assistant", None)) if t is not None
    ]
