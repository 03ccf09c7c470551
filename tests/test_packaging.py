"""Packaging: kernels/ ships as minitron_fast.kernels and never shadows HF's ``kernels``; no top-level name
clashes with a dependency."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ROOT


def _has_kernels_distribution() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _answers(out: str) -> list[str]:
    """The probe's answers (``tests/kernels_probe.py``), one per process. Launched ranks share one
    pipe, so two ranks' lines can interleave on one line: matched, not split by lines."""
    return re.findall(r"KERNELS (ModuleNotFoundError|/\S*?kernels/__init__\.py)", out)


def _where_kernels_leads(out: str) -> str:
    answers = _answers(out)
    assert answers, out[-2000:]
    assert len(set(answers)) == 1, answers
    return answers[0]


def _expected_kernels() -> str:
    if not _has_kernels_distribution():
        return "ModuleNotFoundError"
    files = importlib.metadata.distribution("kernels").files or []
    init = next(f for f in files if str(f).replace("\\", "/") == "kernels/__init__.py")
    return str(Path(init.locate()).resolve())


@pytest.mark.parametrize("how", ["python -c", "python -m", "pytest", "deepspeed launcher ranks"])
def test_import_kernels_from_the_repo_root_never_gives_the_project_folder(how, tmp_path):
    """HF's ``kernels`` distribution (transformers >= 5.25 imports it to load weights) shares its
    name with the top-level kernels/ folder, and every launcher below puts the repository root first
    on sys.path. ``import kernels`` must give the installed distribution, or ModuleNotFoundError where
    none is installed, never kernels/ (which ships only as minitron_fast.kernels)."""
    probe = [sys.executable, "-m", "tests.kernels_probe"]
    if how == "python -c":
        cmd = [sys.executable, "-c", "import runpy; runpy.run_module('tests.kernels_probe', run_name='__main__')"]
    elif how == "python -m":
        cmd = probe
    elif how == "pytest":
        (tmp_path / "test_probe.py").write_text(
            "import subprocess\n"
            "def test_probe(capsys):\n"
            "    from tests.kernels_probe import main\n"
            "    main()\n"
            "    print(capsys.readouterr().out, file=open(%r, 'w'))\n" % str(tmp_path / "out.txt"))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")]
    else:
        from minitron_fast.distill.launch import launcher_env, trainer_command

        cmd = trainer_command(None, num_procs=2, launcher="deepspeed")
        cmd[cmd.index("minitron_fast.distill")] = "tests.kernels_probe"
    env = dict(os.environ) if how != "deepspeed launcher ranks" else launcher_env("cpu")
    env.pop("PYTHONPATH", None)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    text = (tmp_path / "out.txt").read_text() if how == "pytest" else out.stdout
    if how == "deepspeed launcher ranks":
        assert len(_answers(text)) == 2, text[-2000:]  # both ranks answered
    assert _where_kernels_leads(text) == _expected_kernels()


def test_import_kernels_without_the_distribution_is_an_import_error():
    """Where no ``kernels`` distribution is installed (site-packages left off the path here),
    ``import kernels`` from the repository root fails as in any interpreter, instead of yielding the
    project folder: transformers and other libraries probe it with try/except ImportError."""
    code = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and '__editable__' not in p]\n"
            "from tests.kernels_probe import main\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _where_kernels_leads(out.stdout) == "ModuleNotFoundError"


def test_kernels_ships_only_inside_the_package(tmp_path):
    code = "import minitron_fast.kernels as k, minitron_fast.kernels.kd_loss as kd\nprint(k.__name__, kd.__name__)\n"
    # Outside the source tree, so only the installed package is on sys.path.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["minitron_fast.kernels", "minitron_fast.kernels.kd_loss"]


def _top_level_names() -> set[str]:
    """Every name the repository root makes importable: folders (a folder without __init__.py is still
    a namespace package) and .py files."""
    return ({p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()}
            | {p.stem for p in ROOT.glob("*.py")})


def test_no_top_level_name_is_one_a_dependency_provides_or_imports():
    """The audit the kernels/ clash called for, over every installed distribution (the lock's set in
    CI): no top-level folder or module of the repository may have the name of a module that some
    distribution ships or that some distribution's code imports. ``kernels`` is the one known clash,
    neutralized by kernels/__init__.py and tested above; anything new fails here with its culprits."""
    ours = _top_level_names()
    pattern = re.compile(rb"^[ \t]*(?:import|from)[ \t]+(" + b"|".join(re.escape(n.encode()) for n in sorted(ours))
                         + rb")\b", re.M)
    clashes: dict[str, set[str]] = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            if name in ours and dist.replace("-", "_") != "minitron_fast":
                clashes.setdefault(name, set()).add(f"{dist} ships it")
    for dist in importlib.metadata.distributions():
        dname = dist.metadata["Name"] or "?"
        if dname.replace("-", "_") == "minitron_fast":
            continue
        for f in dist.files or ():
            if f.suffix != ".py":
                continue
            try:
                data = Path(f.locate()).read_bytes()
            except OSError:
                continue
            for m in pattern.finditer(data):
                name = m.group(1).decode()
                if not str(f).startswith(name + "/"):  # a package importing itself is no clash
                    clashes.setdefault(name, set()).add(f"{dname} imports it ({f})")
    assert "minitron_fast" not in clashes, clashes.get("minitron_fast")
    known = {"kernels"}  # HF's kernels; see test_import_kernels_from_the_repo_root_never_gives_the_project_folder
    unexpected = {k: sorted(v)[:3] for k, v in clashes.items() if k not in known}
    assert not unexpected, f"top-level names that clash with dependencies (rename them): {unexpected}"
    if _has_kernels_distribution():
        assert "kernels" in clashes  # the audit sees the clash it exists for


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
