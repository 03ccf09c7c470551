"""Packaging: kernels/ ships as minitron_fast.kernels, never as a top-level `kernels` package."""
from __future__ import annotations

import subprocess
import sys

from tests import ROOT


def test_kernels_only_under_the_package(tmp_path):
    code = (
        "import importlib.util, minitron_fast.kernels as k\n"
        "print(importlib.util.find_spec('kernels') is None, k.__name__)\n"
    )
    # Run outside the source tree so the repository's own folders are not on sys.path.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "minitron_fast.kernels"]


def test_pyproject_maps_kernels_and_keeps_torch_out_of_the_build():
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest depends on tomli there
        import tomli as tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["package-dir"]["minitron_fast.kernels"] == "kernels"
    assert not any(r.lower().startswith("torch") for r in cfg["build-system"]["requires"])


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject's explicit ``packages`` list must name every package under minitron_fast/, or a
    wheel (a non-editable install) silently lacks it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    root = ROOT
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "minitron_fast").rglob("__init__.py")}
    assert on_disk - listed == set(), f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
