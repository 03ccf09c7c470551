"""The kernel report: spec collection, cuobjdump parsing, and a real AOT compile of the KD kernels."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import ROOT


def test_parse_resource_usage():
    from bench.kernel_report import parse_resource_usage

    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _kd_softmax_kernel:\n"
            "  REG:79 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:936 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert parse_resource_usage(text) == {"registers": 79, "stack_bytes": 16, "smem_bytes": 1024, "local_bytes": 0}


def test_every_kernel_module_has_valid_specs():
    import re

    from bench.kernel_report import collect_specs, kernel_modules

    mods = kernel_modules()
    assert "kd_loss" in mods
    for m in mods:  # a kernels module that defines a @triton.jit kernel must list AOT specs
        src = (ROOT / "kernels" / f"{m}.py").read_text()
        if "@triton.jit" in src:
            assert re.search(r"^AOT_SPECS\s*=", src, re.M), f"kernels/{m}.py defines kernels but no AOT_SPECS"
    specs = collect_specs()
    names = [f"{m}:{s['name']}" for m, s in specs]
    assert len(names) == len(set(names)), "duplicate AOT spec names"
    kd = [s for m, s in specs if m == "kd_loss"]
    assert {s["constexprs"]["DIV"] for s in kd} == {0, 1, 2}
    for s in kd:
        assert s["flops"] and s["min_bytes"] and s["signature"]


@pytest.mark.slow
def test_kd_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """The launcher's default config (BLOCK_V=4096, 8 warps) of each divergence (the full report,
    ``python -m bench kernel_report``, covers every config and every kernels/*.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "kernel_report", "--module", "kd_loss", "--only", "BLOCK_V=4096",
                           "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and {r["impl"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["ok"], r
        assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{r['case']} {r['impl']} spills"
        assert 0 < r["registers"] <= 255
    assert out.with_suffix(".png").exists()
