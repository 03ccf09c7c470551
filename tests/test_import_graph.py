"""The import graph: no cycles among the package's and the benchmarks' modules (counting imports
inside functions too, a lazy import being a dependency all the same), and the layers' arrows
point down: ops never import the stages or the integrations above them."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests import ROOT

PACKAGES = ("minitron_fast", "bench", "kernels")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            rel = f.relative_to(ROOT).with_suffix("")
            out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its file). ``minitron_fast.kernels``
    is the top-level ``kernels/`` folder; a submodule's import of its own package is left out
    (the package runs first whatever the submodule does)."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if is_pkg else m.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                t = t.replace("minitron_fast.kernels", "kernels", 1) if t.startswith("minitron_fast.kernels") else t
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], f"import cycles: {found}"


def test_ops_import_no_stage_and_no_integration():
    """ops sit below the stages and the drop-in integrations (DESIGN.md's layer table)."""
    above = ("minitron_fast.integrations", "minitron_fast.distill", "minitron_fast.pipeline", "minitron_fast.search",
             "minitron_fast.prune", "minitron_fast.importance", "minitron_fast.commands", "minitron_fast.cli")
    bad = {m: sorted(t for t in ts if t.startswith(above)) for m, ts in import_graph().items()
           if m.startswith(("minitron_fast.ops", "kernels"))}
    assert {m: ts for m, ts in bad.items() if ts} == {}
