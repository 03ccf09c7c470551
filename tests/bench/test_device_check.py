"""``python -m bench device_check``: the GPU day's script runs its whole logic on the CPU at tiny
shapes (``--tiny``, Triton under the interpreter), so it cannot rot between GPU days; without a GPU
and without ``--tiny`` it refuses in one line; a spent budget skips cases and says so."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from tests import ROOT


def _bench(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_INTERPRET="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "bench", "device_check", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_tiny_rehearsal_runs_every_section(tmp_path):
    out = tmp_path / "dc.json"
    proc = _bench("--tiny", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    by_section: dict[str, list[dict]] = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
        assert r["bench"] == "device_check" and r["ok"] is True, r
    assert set(by_section) == {"correctness", "kd_loss", "importance", "compaction", "recipe", "gpu_paths"}

    # correctness: the KD rows per divergence (errors recorded), every importance kernel launched,
    # both compaction gathers exact
    kd = [r for r in by_section["correctness"] if r["case"].startswith("kd_rows")]
    assert {r["case"].split("]")[0] for r in kd} >= {"kd_rows[forward_kl", "kd_rows[reverse_kl", "kd_rows[jsd_beta0.5"}
    for r in kd:
        if r["status"] == "ran":
            assert 0 <= r["err_dh"] < 1e-4 and 0 <= r["err_loss"] < 1e-4, r
    imp = {r["case"].split()[0]: r for r in by_section["correctness"] if r.get("launches") is not None}
    assert set(imp) == {"swiglu_stats", "rmsnorm_stats", "head_stats", "block_cos"}
    assert all(r["launches"] >= 1 for r in imp.values())
    assert sum(1 for r in by_section["correctness"] if r["case"].startswith("compact")) == 2

    # the KD loss timed against naive and the floor (Liger needs CUDA: skipped, saying so)
    kd_rows = {r["impl"]: r for r in by_section["kd_loss"]}
    assert kd_rows["minitron_fast"]["median_s"] > 0 and kd_rows["minitron_fast"]["vs_floor"] > 0
    assert kd_rows["minitron_fast"]["err_loss_vs_fp64"] < 1e-3
    assert kd_rows["liger_chunked"]["status"].startswith("skipped")

    # importance: each fused kernel was launched in the collection (an unwired one fails the row)
    ours = next(r for r in by_section["importance"] if r["impl"] == "minitron_fast")
    for k in ("swiglu_stats", "rmsnorm_stats", "head_stats", "block_cos"):
        assert ours[f"launches_{k}"] >= 1, k
    assert ours["max_rel_err_vs_hooks"] < 1e-3

    comp = {r["impl"]: r for r in by_section["compaction"]}
    assert comp["minitron_fast_triton"]["gb_per_s"] > 0 and comp["index_select"]["gb_per_s"] > 0

    rec = by_section["recipe"][0]
    assert rec["distilled_ppl"] > 1 and rec["pruned_ppl"] > 1

    # the GPU-only branches: fp16 gradients and the live top-k rows ran; the CUDA-only and
    # multi-GPU rows are skipped and named
    gp = {r["case"].split(",")[0]: r for r in by_section["gpu_paths"]}
    fp16 = next(r for r in by_section["gpu_paths"] if r["case"].startswith("fp16 head"))
    assert fp16["status"] == "ran" and 0 <= fp16["err_grad_vs_fp64"] < 8e-3
    assert gp["live top-k teacher rows"]["status"] == "ran"
    skipped = [r["case"] for r in by_section["gpu_paths"] if r["status"].startswith("skipped")]
    assert any("cuda:1" in c for c in skipped) and any("ZeRO-3" in c for c in skipped)
    assert any("memory_reserved" in c for c in skipped)

    md = out.with_suffix(".md").read_text()
    assert "cpu (TRITON_INTERPRET=1)" in md and "## Goals (issue 13)" in md
    for sec in ("correctness", "kd_loss", "importance", "compaction", "recipe", "gpu_paths"):
        assert f"## {sec}" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_in_one_line():
    proc = _bench(timeout=300)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "CUDA" in err[0] and "--tiny" in err[0]


def test_spent_budget_skips_and_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from bench import device_check

    rows = device_check.run(argparse.Namespace(tiny=True, budget_s=0.0, only="", json=None))
    assert [r["section"] for r in rows] == list(device_check.SECTIONS)
    assert all(r["status"].startswith("skipped: budget") and r["ok"] for r in rows)
