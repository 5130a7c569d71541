"""The levels at equal steps: one rung setting trained at several presets and seeds, each preset at a rate
scaled by its width, and whether each larger level keeps up with the smaller at every evaluation
(``hkd4vlm lab sizes``; docs/lab.md, "The levels at equal steps")."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..files import write_text_atomic
from .train import LabConfig, held_out, preset_text_sizes, run_rung

#: the width the base rate is given at: each preset trains at base x (REFERENCE_WIDTH / its width) ** power
#: (1e-3 at S's 64 gives M 5e-4 and L 3.33e-4 at power 1, 7.07e-4 and 5.77e-4 at 0.5: docs/lab.md)
REFERENCE_WIDTH = 64


def width_lr(base_lr: float, hidden: int, power: float = 1.0) -> float:
    """The rate of a model ``hidden`` wide, for a base rate at :data:`REFERENCE_WIDTH`: base x (64 / hidden) **
    power (1: muP's rate for Adam's hidden matrices; 0: one rate at every width)."""
    return base_lr * (REFERENCE_WIDTH / hidden) ** power


def run_dir(out: Path, preset: str, seed: int) -> Path:
    return out / f"{preset}-seed{seed}"


@dataclass
class SizesResult:
    """Each preset's held-out curve per seed (``curves[preset][seed]``, the points of ``run_rung``)."""

    presets: list[str]
    seeds: list[int]
    lrs: dict[str, float]
    tolerance: float = 0.0
    curves: dict[str, dict[int, list[dict]]] = field(default_factory=dict)
    input_lr: float | None = None  # the input-like weights' rate at every preset (--width-lr hidden), else None
    hop: str | None = None  # compare this intermediate target's held-out accuracy instead of the answer's
    # each preset's MLP matrices' rate where it falls with width by a power of its own (--mlp-width-power)
    mlp_lrs: dict[str, float] | None = None
    # how the rates were chosen: the base rate at the reference width and the powers of width they fall by
    scaling: dict | None = None

    def steps(self) -> list[int]:
        """The evaluation steps every run has."""
        sets = [{p["step"] for p in curve} for by_seed in self.curves.values() for curve in by_seed.values()]
        return sorted(set.intersection(*sets)) if sets else []

    def accuracies(self, preset: str, step: int) -> list[float]:
        """Held-out accuracy of each seed's run at ``step``, in the order of ``seeds``."""
        return [self._measure(next(p for p in self.curves[preset][s] if p["step"] == step)) for s in self.seeds]

    def _measure(self, point: dict) -> float:
        if self.hop is None:
            return point["held_out"]
        hops = point.get("hops", {})
        if self.hop not in hops:
            raise ValueError(f"the runs score no hop {self.hop!r}; they score: {', '.join(sorted(hops)) or 'none'}")
        return hops[self.hop]

    def mean(self, preset: str, step: int) -> float:
        acc = self.accuracies(preset, step)
        return sum(acc) / len(acc)

    def standard_error(self, preset: str, step: int) -> float | None:
        """The standard error of the mean over seeds (their sample deviation / sqrt(seeds)): how much of a gap
        the seeds alone would make; None with one seed."""
        acc = self.accuracies(preset, step)
        return statistics.stdev(acc) / math.sqrt(len(acc)) if len(acc) > 1 else None

    def inversions(self) -> list[dict]:
        """Each evaluation where a larger level's mean over seeds is below the next smaller one's by more than
        the tolerance (presets are given smallest first), with the gap's standard error over seeds (``se``,
        None with one seed)."""
        out = []
        for step in self.steps():
            for small, large in zip(self.presets, self.presets[1:], strict=False):
                gap = self.mean(large, step) - self.mean(small, step)
                if gap < -self.tolerance:
                    small_se, large_se = self.standard_error(small, step), self.standard_error(large, step)
                    se = None if small_se is None or large_se is None else math.hypot(small_se, large_se)
                    out.append(
                        {
                            "step": step,
                            "smaller": small,
                            "larger": large,
                            "gap": round(gap, 4),
                            "se": None if se is None else round(se, 4),
                        }
                    )
        return out

    @property
    def ordered(self) -> bool:
        return not self.inversions()

    def table(self) -> str:
        """A Markdown table: per evaluation step, each preset's mean over seeds and its seeds' range."""
        inputs = f", inputs {self.input_lr:.3g}" if self.input_lr is not None else ""
        first = "step" if self.hop is None else f"step ({self.hop} hop)"

        def rates(p: str) -> str:
            mlp = f", MLP {self.mlp_lrs[p]:.3g}" if self.mlp_lrs is not None else ""
            return f"lr {self.lrs[p]:.3g}{mlp}{inputs}"

        head = f"| {first} | " + " | ".join(f"{p} ({rates(p)})" for p in self.presets) + " |"
        rows = [head, "|---|" + "---|" * len(self.presets)]
        for step in self.steps():
            cells = []
            for p in self.presets:
                acc = self.accuracies(p, step)
                spread = f" ({min(acc):.2f}–{max(acc):.2f})" if len(acc) > 1 else ""
                cells.append(f"{self.mean(p, step):.3f}{spread}")
            rows.append(f"| {step} | " + " | ".join(cells) + " |")
        return "\n".join(rows) + "\n"

    def summary(self) -> dict:
        return {
            "presets": self.presets,
            "seeds": self.seeds,
            "lrs": self.lrs,
            "mlp_lrs": self.mlp_lrs,
            "input_lr": self.input_lr,
            "scaling": self.scaling,
            "tolerance": self.tolerance,
            "measure": "held_out" if self.hop is None else f"hop {self.hop}",
            "mean": {p: {str(s): round(self.mean(p, s), 4) for s in self.steps()} for p in self.presets},
            "held_out": {
                p: {str(seed): {str(pt["step"]): self._measure(pt) for pt in c} for seed, c in by_seed.items()}
                for p, by_seed in self.curves.items()
            },
            "inversions": self.inversions(),
            "ordered": self.ordered,
        }


def run_sizes(
    config: LabConfig,
    presets: list[str],
    seeds: list[int],
    base_lr: float,
    out: str | Path,
    tolerance: float = 0.0,
    log: Callable[[str], None] | None = print,
    scaled: Literal["all", "hidden"] = "all",
    power: float = 1.0,
    hop: str | None = None,
    mlp_power: float | None = None,
    family: str | None = None,
) -> SizesResult:
    """Train ``config`` at each preset (smallest first) and seed into ``out/PRESET-seedN``, each preset at
    :func:`width_lr` with ``power``: every weight, or with ``scaled="hidden"`` only the hidden and output
    matrices, the input-like weights staying at ``base_lr`` (as muP for Adam); with ``mlp_power`` the MLP's
    matrices at their own :func:`width_lr` with that power. A run whose folder holds a
    finished run of the same settings is read, not retrained (an interrupted sweep goes on where it stopped).
    Writes ``sizes.json`` and ``sizes.md`` to ``out``. With ``hop`` the levels are compared on that
    intermediate target's held-out accuracy instead of the answer's. With ``family`` each preset's text sizes
    are built in that family instead of the preset's own (``qwen3``: the same sizes with QK-norm)."""
    if config.stop_at is not None:
        raise ValueError("a sizes run compares every level at the same steps: not with --stop-at")
    if config.init_from is not None:
        raise ValueError("a sizes run builds each preset's model: not with --init-from")
    if not presets or not seeds:
        raise ValueError("name at least one preset and one seed")
    if hop is not None:
        scored = {h.kind for _, ex in held_out(config) for h in ex.hops}
        if hop not in scored:
            raise ValueError(f"{config.rung} scores no hop {hop!r}; it scores: {', '.join(sorted(scored)) or 'none'}")
    out = Path(out)
    configs = {}
    for preset in presets:
        if family is None:
            sized = LabConfig(**{**config.model_dump(), "preset": preset})  # validated: the preset exists
        else:  # the preset's sizes only: settings of the named family (Gemma's --no-embed-scale) hold
            _, layers, hidden, heads = preset_text_sizes(preset)
            sizes = {"family": family, "layers": layers, "hidden": hidden, "heads": heads}
            sized = LabConfig(**{**config.model_dump(), **sizes})
        width = sized.sizes()[2]
        lr = width_lr(base_lr, width, power)
        # at the reference width the two are one rate: the run is the same as an unscaled sweep's
        input_lr = base_lr if scaled == "hidden" and lr != base_lr else None
        mlp_lr = None if mlp_power is None else width_lr(base_lr, width, mlp_power)
        mlp_lr = None if mlp_lr == lr else mlp_lr  # one rate: the same run as a sweep without an MLP power
        configs[preset] = sized.model_copy(update={"lr": lr, "input_lr": input_lr, "mlp_lr": mlp_lr})
    lrs = {p: c.lr for p, c in configs.items()}
    result = SizesResult(
        presets,
        seeds,
        lrs,
        tolerance,
        input_lr=base_lr if scaled == "hidden" else None,
        hop=hop,
        mlp_lrs=None if mlp_power is None else {p: c.mlp_lr or c.lr for p, c in configs.items()},
        scaling={
            "base_lr": base_lr,
            "width_power": power,
            "mlp_width_power": mlp_power,
            "width_lr": scaled,
            "family": family,
        },
    )
    for preset, sized in configs.items():
        result.curves[preset] = {}
        for seed in seeds:
            run = sized.model_copy(update={"seed": seed})
            folder = run_dir(out, preset, seed)
            curve = _finished(folder, run)
            if curve is None:
                if log is not None:
                    log(f"== {preset} seed {seed} (lr {run.lr:.3g})")
                curve = run_rung(run, folder, log=log).curve
            result.curves[preset][seed] = curve
    write_text_atomic(out / "sizes.json", json.dumps(result.summary(), indent=2) + "\n")
    write_text_atomic(out / "sizes.md", result.table())
    return result


def _finished(folder: Path, config: LabConfig) -> list[dict] | None:
    """The curve of the finished run in ``folder`` if it was trained with ``config``; None where no run
    finished there. A finished run of other settings is an error (its folder would be overwritten)."""
    summary = folder / "summary.json"
    if not summary.exists():
        return None
    done = json.loads(summary.read_text(encoding="utf-8"))["config"]
    # a setting added since that run was trained had its default then
    done = {k: f.default for k, f in LabConfig.model_fields.items() if not f.is_required() and k not in done} | done
    wanted = config.model_dump()
    if done != wanted:
        differ = sorted(k for k in {**done, **wanted} if done.get(k) != wanted.get(k))
        raise ValueError(f"{folder} holds a finished run of other settings ({', '.join(differ)}): choose another --out")
    with (folder / "curve.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
