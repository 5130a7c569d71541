"""Training configuration: one typed schema, YAML values, ``key.sub=value`` overrides from the command
line, readable validation errors, and the resolved config saved beside the outputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..data.augment import augment_spec
from ..data.tasks import TASKS, Task
from ..errors import UserError
from ..files import write_text_atomic

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(UserError, ValueError):
    pass


class StrictModel(BaseModel):
    """A config schema: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def tracker_names(value: Any) -> Any:
    """``log_with``: a list of tracker names, or one name or ``name,name`` as a string (``--log-with``);
    ``none``: no tracker."""
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    return value


#: ``log_with``: the trackers that a run logs to (engine.tracking)
Tracker = Literal["tensorboard", "wandb", "mlflow"]
TrackerNames = Annotated[list[Tracker], BeforeValidator(tracker_names)]

#: augmentation -> probability; YAML mapping or ``name=prob,...`` string, read by ``data.augment.augment_spec``
AugmentSpec = Annotated[dict[str, float], BeforeValidator(augment_spec)]


class DataConfig(StrictModel):
    root: Path
    tasks: list[Task] = Field(default=list(TASKS), min_length=1, description="the tasks to train on")
    split: str = "train"
    eval_split: str | None = "val"
    eval_limit: int | None = Field(default=None, ge=1, description="score at most this many eval records")
    skip_invalid: bool = Field(
        default=False,
        description=("leave invalid records out (listed and counted) instead of stopping; --skip-invalid"),
    )


def check_lora(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """``lora``: keyword arguments of ``peft.LoraConfig`` that it accepts, with a rank of at least 1 and the
    modules to adapt named; checked when the config is read, not when the model is wrapped."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of peft.LoraConfig arguments, got {type(value).__name__}")
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(
            f"unknown peft.LoraConfig argument(s) {unknown} (e.g. r, lora_alpha, lora_dropout, target_modules)"
        )
    r, alpha, dropout = value.get("r", 8), value.get("lora_alpha", 8), value.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an integer of at least 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
        raise ValueError(f"lora_alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")
    if not value.get("target_modules") and not value.get("target_parameters"):
        raise ValueError("name the modules to adapt: target_modules (e.g. all-linear)")
    try:
        LoraConfig(**value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"peft.LoraConfig refuses it: {e}") from None
    return value


#: ``lora``: peft.LoraConfig arguments, checked as the config is read (check_lora)
LoraSpec = Annotated[dict[str, Any] | None, AfterValidator(check_lora)]


def check_model_ref(value: str) -> str:
    """A model reference: a folder (checked when it is loaded) or ``zoo:NAME`` of a shipped base."""
    from ..models.zoo import PREFIX, available, is_zoo

    if is_zoo(value) and value[len(PREFIX) :] not in available():
        shipped = ", ".join(PREFIX + n for n in available()) or "none"
        raise ValueError(f"no zoo model {value!r}; shipped: {shipped}")
    return value


#: a model folder or ``zoo:NAME`` (check_model_ref)
ModelRef = Annotated[str, AfterValidator(check_model_ref)]


class OptimConfig(StrictModel):
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.01, ge=0, allow_inf_nan=False)
    betas: tuple[
        Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)],
        Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)],
    ] = (0.9, 0.999)
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    max_grad_norm: float | None = Field(default=1.0, gt=0, allow_inf_nan=False)


class TrainSettings(StrictModel):
    """How a model trains: the settings a training run (``TrainConfig``) and a distillation stage's ``train``
    block (``distill.recipe.StageTrainConfig``) share, defined once."""

    optim: OptimConfig = OptimConfig()
    steps: int = Field(default=1000, ge=1, description="optimizer steps")
    stop_after: int | None = Field(
        default=None,
        ge=1,
        description=(
            "stop after this many of the `steps` steps, with the model saved there (the lr schedule still "
            "spans `steps`: a run stopped early, replayable); None: run them all"
        ),
    )
    batch_size: int = Field(default=32, ge=1, description="global batch: per device x processes x grad_accum")
    grad_accum: int = Field(default=1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    readout: Literal["letter", "option"] | None = Field(
        default=None, description="answer readout to train and save with the model (None: the model's own)"
    )
    augment: AugmentSpec = Field(default_factory=dict, description="augmentation -> probability")
    lora: LoraSpec = Field(default=None, description="peft.LoraConfig arguments for the trained model")
    freeze_vision: bool = False
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    log_with: TrackerNames = Field(
        default=["tensorboard"],
        description="trackers to log to through accelerate: tensorboard (OUT/tb), wandb, mlflow; [] for none",
    )
    eval_every: int = Field(default=0, ge=0, description="0: evaluate only at the end")
    find_unused_parameters: bool = Field(default=True, description="DDP: allow parameters without gradient")
    num_workers: int = Field(
        default=0,
        ge=0,
        description="DataLoader worker processes that read, augment and encode records (0: the training thread)",
    )
    prefetch_factor: int = Field(default=2, ge=1, description="micro-batches each worker loads ahead")
    pin_memory: bool = Field(default=True, description="page-locked batches, copied to the GPU ahead (CUDA only)")
    skip_nonfinite: int = Field(
        default=0,
        ge=0,
        description=(
            "optimizer steps with a NaN or infinite loss or gradient that are skipped (no update) before training "
            "stops with an error; 0: stop at the first"
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.stop_after is not None and self.stop_after > self.steps:
            raise ValueError(f"stop_after {self.stop_after} is past the schedule's {self.steps} steps")
        return self

    @property
    def end(self) -> int:
        """The step training stops at: ``stop_after``, or the schedule's last."""
        return self.steps if self.stop_after is None else self.stop_after


class TrainConfig(TrainSettings):
    """One training run: what to train, on what, where to write it, and how (``TrainSettings``)."""

    model: ModelRef = Field(description="model directory (anything load_model reads)")
    out: Path
    data: DataConfig
    seed: int = Field(default=0, ge=0, lt=2**32)
    save_every: int = Field(default=500, ge=1)
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _drop_retired(cls, data: Any) -> Any:
        # ``temperature`` (removed) never changed training: a run's config.yaml saved with its default still
        # loads (``hkd4vlm train RUN/config.yaml --resume``); any other value is refused rather than ignored
        if isinstance(data, dict) and "temperature" in data:
            if data["temperature"] != 1.0:
                raise ValueError(
                    f"temperature = {data['temperature']!r}: this setting was removed (it never changed "
                    "training; the distillation stages have their own tau); delete it"
                )
            data = {k: v for k, v in data.items() if k != "temperature"}
        return data


#: the most values (scalars, lists and mappings) a config may expand to: YAML aliases repeat a node without
#: copying it, so a few hundred bytes of nested aliases ("billion laughs") expand to millions of values
MAX_CONFIG_NODES = 100_000


def check_expansion(value: Any, source: str, limit: int = MAX_CONFIG_NODES) -> None:
    """ConfigError when ``value`` (as YAML loaded it, aliases shared) expands to more than ``limit`` values."""
    count, stack = 0, [value]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            raise ConfigError(
                f"{source}: expands to more than {limit:,} values (nested YAML aliases?); a config is refused "
                "rather than expanded"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``["optim.lr=3e-4", "data.tasks=[factuality]"]`` -> nested dict; values are read as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        check_expansion(value, f"override {key.strip()!r}")
        if isinstance(value, str) and _FLOAT.match(value):
            value = float(value)  # YAML 1.1 reads "3e-4" as a string
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def merge(base: Any, update: Any) -> Any:
    """Deep merge of nested dicts; lists are indexed by integer keys (``stages.1.tau=2``). An empty mapping
    replaces what it updates (``augment={}`` switches every augmentation off; merged, it would change nothing)."""
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for k, v in update.items():
            out[k] = merge(base.get(k), v) if k in base and v != {} else v
        return out
    if isinstance(base, list) and isinstance(update, dict) and all(str(k).isdigit() for k in update):
        items = list(base)
        for k, v in update.items():
            i = int(k)
            if i >= len(items):
                raise ConfigError(f"index {i} is out of range for a list of {len(items)} items")
            items[i] = merge(items[i], v)
        return items
    return update


def _where(loc: tuple, raw: Any) -> str:
    """Dotted path of an error's location in the input; the tag that a discriminated union adds to the
    path (``stages.1.ppod.gamma``: the member for ``kind: ppod``) is left out, as it is not in the input."""
    parts, node = [], raw
    for p in loc:
        if isinstance(node, dict) and p not in node and node.get("kind") == p:
            continue
        parts.append(str(p))
        node = (
            node[p]
            if isinstance(node, dict) and p in node
            else (node[p] if isinstance(node, list) and isinstance(p, int) and p < len(node) else None)
        )
    return ".".join(parts)


def _format_errors(err: ValidationError, source: str, raw: Any = None) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = _where(e["loc"], raw)
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # name the key: stages.0.kind
            where = f"{where}.{str(e.get('ctx', {}).get('discriminator', 'kind')).strip(chr(39))}".lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a setting here)"
        lines.append(f"  {where or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    schema: type[BaseModel] = TrainConfig,
    base: dict | None = None,
    base_source: str = "(defaults)",
):
    """Read a YAML file (or start from ``base``, named ``base_source`` in errors), apply overrides, validate
    against ``schema``."""
    raw: dict = dict(base or {})
    source = base_source
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level, got {type(loaded).__name__}")
        check_expansion(loaded, str(path))
        raw = merge(raw, loaded)
    raw = merge(raw, parse_overrides(overrides))
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, raw)) from None


#: settings that can change between a run and its resume without changing what is trained
RESUME_FREE = frozenset(
    {
        "out",
        "stop_after",
        "progress",
        "log_every",
        "log_with",
        "save_every",
        "keep_checkpoints",
        "eval_every",
        "data.eval_split",
        "data.eval_limit",
        "num_workers",
        "prefetch_factor",
        "pin_memory",
    }
)


def _setting_keys(cfg: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of every setting; nested configs (data, optim) are opened, other values are one setting."""
    keys = []
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        keys += _setting_keys(value, f"{prefix}{name}.") if isinstance(value, BaseModel) else [f"{prefix}{name}"]
    return keys


_ABSENT = object()


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def resume_changes(saved: str | Path, cfg: BaseModel) -> dict[str, tuple[Any, Any]]:
    """Settings (dotted keys) in which ``cfg`` differs from the run's ``saved`` config.yaml and that break
    an exact resume (seed, batch size, lr, data, ...): key -> (saved value, new value). A setting that the
    saved config lacks (added to the schema since) is not a change."""
    try:
        old = yaml.safe_load(Path(saved).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{saved}: the run's saved config cannot be read ({e})") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{saved}: the run's saved config is not a mapping")
    new = cfg.model_dump(mode="json")
    changes = {}
    for key in _setting_keys(cfg):
        before, after = _lookup(old, key), _lookup(new, key)
        if key not in RESUME_FREE and before is not _ABSENT and before != after:
            changes[key] = (before, after)
    return changes


def save_config(cfg: BaseModel, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
