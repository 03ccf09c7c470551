"""The docs and the docstrings name files that exist: every repository path written in docs/,
the README and the package's, kernels' and bench's docstrings (``minitron_fast/...``,
``tests/...``, ``bench/...``, ``configs/...``, ``docs/...``, ``kernels/...``, ``csrc/...``,
``requirements/...``) must be there, resolved from the repository root or, for markdown links,
from the document's own folder. Paths a command writes (after ``--out``/``--json``), globs and
name prefixes (``tests/ops/test_kd_*.py``) are not files to check."""
from __future__ import annotations

import ast
import re

from tests import ROOT

PATH = re.compile(r"(?<![\w./-])((?:minitron_fast|kernels|tests|bench|configs|docs|csrc|requirements)/[\w./-]*[\w/])")
OUTPUT_FLAG = re.compile(r"--[\w-]+[ =]$")
NOT_PATHS = {"kernels/_C"}  # DESIGN.md's layer arrow "ops/models -> kernels/_C": two layers, not a path


def _missing(text: str, here) -> list[str]:
    bad = []
    for m in PATH.finditer(text):
        p = m.group(1).rstrip(".").rstrip("/")
        after = text[m.end():m.end() + 1]
        if after in ("*", "<", "{") or p in NOT_PATHS or OUTPUT_FLAG.search(text[max(0, m.start() - 24):m.start()]):
            continue
        if any((base / cand).exists() for base in (ROOT, here) for cand in (p, p + ".py")):
            continue
        bad.append(p)
    return sorted(set(bad))


def test_every_path_named_in_the_docs_exists():
    bad = {}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        miss = _missing(doc.read_text(), doc.parent)
        if miss:
            bad[str(doc.relative_to(ROOT))] = miss
    assert not bad, f"paths named in the docs that do not exist: {bad}"


def test_every_path_named_in_a_docstring_exists():
    bad = {}
    files = [*sorted((ROOT / "minitron_fast").rglob("*.py")), *sorted((ROOT / "kernels").glob("*.py")),
             *sorted((ROOT / "bench").glob("*.py"))]
    assert len(files) > 50
    for f in files:
        tree = ast.parse(f.read_text())
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        miss = _missing("\n".join(d for d in docs if d), f.parent)
        if miss:
            bad[str(f.relative_to(ROOT))] = miss
    assert not bad, f"paths named in docstrings that do not exist: {bad}"
