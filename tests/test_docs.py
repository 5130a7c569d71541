"""The README and docs/ against the code: every command and option the README shows exists in that command's
``--help``, every ``make`` target it names exists, every relative link in README.md and docs/ resolves (file and
heading), and the configs it points at load against their schemas."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hkd4vlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

_FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
_INLINE = re.compile(r"`(hkd4vlm [^`]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _command_lines(text: str) -> list[str]:
    """Every ``hkd4vlm ...`` command shown: lines of code blocks (continuations joined, comments cut) and
    inline code."""
    found = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("hkd4vlm "):
                found.append(line)
    found += _INLINE.findall(text)
    return found


def _resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    """The (sub)command a command line names, and the path to it; an error names a command that does not exist."""
    cmd: click.Command = main
    path = []
    for word in words:
        if not isinstance(cmd, click.Group) or word.startswith("-"):
            break
        if word not in cmd.commands:
            raise AssertionError(f"README shows 'hkd4vlm {' '.join([*path, word])}', which is not a command")
        cmd = cmd.commands[word]
        path.append(word)
    return cmd, path


def _help(path: list[str]) -> str:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_readme_shows_commands_at_all():
    # the checks below must have something to check: the main commands appear
    lines = _command_lines(README.read_text())
    shown = {" ".join(_resolve(shlex.split(line.replace("[", " ").replace("]", " "))[1:])[1]) for line in lines}
    assert {"synth", "validate", "train", "distill", "predict", "evaluate", "serve", "quickstart"} <= shown


@pytest.mark.parametrize("line", sorted(set(_command_lines(README.read_text()))))
def test_every_command_and_option_the_readme_shows_exists(line):
    words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))[1:]
    cmd, path = _resolve(words)
    if path:
        assert re.search(rf"^  {path[0]}\b", _help([]), re.M), f"'hkd4vlm --help' does not list {path[0]!r}"
    helptext = _help(path)
    for word in words:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            assert re.search(rf"(^|[\s,/]){re.escape(option)}\b", helptext), (
                f"README: {line!r} uses {option}, which 'hkd4vlm {' '.join(path)} --help' does not list"
            )


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", README.read_text()))
    assert named, "README names no make target"
    assert named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (code fences skipped)."""
    text = _FENCE.sub("", md.read_text())
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_resolves(doc):
    links = [link for link in _LINK.findall(_FENCE.sub("", doc.read_text())) if not re.match(r"[a-z]+:", link)]
    for link in links:
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: link {link!r} points at {path}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: link {link!r}: {path.name} has no heading #{anchor}"


def test_readme_stays_a_guide():
    # the measurement history lives in docs/experiments.md; the README is the front door
    assert len(README.read_bytes()) <= 15_000
    assert (ROOT / "LICENSE").read_text().startswith("\n                                 Apache License")


def test_the_shipped_configs_load_and_sft_does_not_augment(tmp_path):
    from hkd4vlm.distill.recipe import RecipeConfig
    from hkd4vlm.engine.config import TrainConfig, load_config

    sft = load_config(ROOT / "configs/sft.yaml", (), schema=TrainConfig)
    assert sft.augment == {}  # SFT on tiny bases stays at chance when it augments (docs/experiments.md)
    recipe = load_config(ROOT / "configs/recipes/tiny-pyramid.yaml", (), schema=RecipeConfig)
    assert all(s.train.augment == {} for s in recipe.stages if s.kind == "sft")
