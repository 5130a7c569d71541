"""The import graph of the package, read from the source (every import, at module level or inside a
function): no module circle, the core never imports the synthetic benchmark (a producer, like any
dataset), and each layer imports only the layers below it (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

import hkd4vlm

ROOT = Path(hkd4vlm.__file__).parent
#: what each top-level module or package of the core may import (besides itself, errors and files)
CORE_LAYERS = {
    "data": set(),
    "models": {"data"},
    "eval": {"data"},
    "infer": {"data", "models"},
    "engine": {"data", "models", "infer"},
    "distill": {"data", "models", "infer", "engine"},
    "serve": {"data", "models", "infer"},
}
SHARED = {"errors", "files"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from . import x`` counts as importing ``x``)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = pkg[: len(pkg) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n != m}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "hkd4vlm.data.records" in graph["hkd4vlm.data.layout"]  # from .records import ...
    assert "hkd4vlm.synth.grounding" in graph["hkd4vlm.synth.pretrain"]  # imported inside a function


def test_no_module_circle():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", sorted(CORE_LAYERS))
def test_core_layers_import_only_the_layers_below(layer):
    allowed = CORE_LAYERS[layer] | SHARED | {layer}
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if _top(m) == layer
        for t in targets
        if _top(t) not in allowed
    )
    assert bad == []


def test_no_core_module_imports_the_synthetic_benchmark():
    core = set(CORE_LAYERS) | SHARED
    bad = sorted(
        f"{m} -> {t}" for m, targets in import_graph().items() if _top(m) in core for t in targets if _top(t) == "synth"
    )
    assert bad == []
