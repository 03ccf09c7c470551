"""The test suite. tests/ mirrors the package: tests/<subpackage>/test_*.py tests minitron_fast/<subpackage>/,
tests/bench/ tests bench/, and the files at this level test what crosses packages (CLI, API, bad input,
safety, packaging, the stage configs). Every folder is a package, so test modules import each other and
the helpers here by their full names (``from tests.numerics import close``)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the folder holding pyproject.toml, minitron_fast/, bench/ and configs/)."""
