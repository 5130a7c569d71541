"""A readable summary of a generated benchmark's stats.json."""

from __future__ import annotations

from pathlib import Path

from .generate import SHORTCUT_TOLERANCE


def format_stats(stats: dict, root: Path | str) -> str:
    lines = [
        f"synthetic benchmark, level {stats['level']}, seed {stats['seed']}, written to {root} in {stats['seconds']} s"
    ]
    for task, ts in stats["tasks"].items():
        lines.append(f"\n{task}")
        for split, s in ts["splits"].items():
            kinds = s.get("hallucination_types") or s.get("verdicts")
            lines.append(
                f"  {split:5s} n={s['n']:<6d} letters {s['letters']}  types {kinds}  "
                f"objects {s['objects_per_image']}  width {s['image_width']['min']}-{s['image_width']['max']}"
            )
        base = ts.get("text_only_baselines")
        if base:
            flag = "ok" if base["within_tolerance"] else "SHORTCUT: a text-only baseline is off chance"
            accs = ", ".join(f"{k} {v:.3f}" for k, v in base["accuracy"].items())
            lines.append(
                f"  text-only baselines on {base['split']} (chance 0.25 ± {SHORTCUT_TOLERANCE}): {accs}  [{flag}]"
            )
    lines.append(f"\nstats: {Path(root) / 'stats.json'}")
    return "\n".join(lines)


def print_stats(stats: dict, root: Path | str) -> None:
    print(format_stats(stats, root))
