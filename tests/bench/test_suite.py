"""``python -m bench all`` summary helpers and ``bench paper_claims`` on a tiny model."""
from __future__ import annotations

import argparse
import math

import pytest

from bench.common import make_tiny_teacher


def test_summary_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.suite import machine_line, plot_summary, rows_markdown

    rows = [{"bench": "b", "case": "N=8", "impl": "fused", "median_s": 0.5, "p20_s": 0.4, "p80_s": 0.6,
             "peak_mb": 10.0, "ok": True, "ratio": 2.0},
            {"bench": "b", "case": "N=8", "impl": "naive", "median_s": None, "ok": False, "error": "x|y"}]
    md = rows_markdown(rows).splitlines()
    assert md[0].startswith("| case | impl | median_s") and "ratio" in md[0] and len(md) == 4
    assert "FAILED" in md[3] and "| - |" in md[3]
    png = plot_summary({"b": {"rows": rows}, "empty": {"rows": []}}, tmp_path / "s.png")
    assert png is not None and png.stat().st_size > 1000
    assert "2 cores" in machine_line({"machine": {"cpu": "x", "cores": 2, "mem_gb": 24}, "versions": {}})


def test_bench_all_rejects_unknown_names(capsys):
    from bench.__main__ import main

    assert main(["all", "--only", "no_such_bench"]) == 2
    assert "unknown benchmark(s) no_such_bench" in capsys.readouterr().err


def test_paper_claims_rows_on_tiny_model(tmp_path):
    from bench import paper_claims

    teacher = make_tiny_teacher(tmp_path / "t")
    args = argparse.Namespace(model=str(teacher), target="ffn=64", steps=2, micro_batch_size=2, seq_len=32, lr=1e-3,
                              calib_samples=4, eval_blocks=2, seed=0, threads=None, quick=False,
                              correct_steps=None)
    rows = paper_claims.run(args)
    cases = {(r["case"], r["impl"]) for r in rows}
    assert cases == {("reference", "teacher"), ("reference", "corrected_teacher"), ("importance (one-shot)", "activation"),
                     ("importance (one-shot)", "magnitude"), ("importance (one-shot)", "random"),
                     *{("aggregation (one-shot)", a) for a in ("mean/l2", "mean/mean", "l2/l2", "l2/mean")},
                     ("retraining loss", "kd_logit"), ("retraining loss", "kd_plus_lm"), ("retraining loss", "lm_only"),
                     ("prune+distill vs scratch", "prune_distill"), ("prune+distill vs scratch", "scratch"),
                     ("width vs depth", "width"), ("width vs depth", "depth"),
                     ("teacher correction", "corrected"), ("teacher correction", "uncorrected")}
    for r in rows:
        assert r["ok"] and math.isfinite(r["loss"])
    claims = [r for r in rows if "claim" in r]
    assert len(claims) == 6 and all(r["holds"] in ("yes", "no") for r in claims)
    by = {(r["case"], r["impl"]): r for r in rows}
    assert by[("width vs depth", "depth")]["params"] >= by[("width vs depth", "width")]["params"]
    assert by[("prune+distill vs scratch", "scratch")]["params"] == by[("prune+distill vs scratch", "prune_distill")]["params"]
    assert by[("retraining loss", "kd_logit")]["tokens"] == 2 * 2 * 32
    # correction trained the teacher (LM loss on the distillation batches), and KD from it is another student
    assert by[("reference", "corrected_teacher")]["tokens"] == 2 * 2 * 32
    assert by[("reference", "corrected_teacher")]["loss"] != by[("reference", "teacher")]["loss"]
    assert by[("teacher correction", "corrected")]["loss"] == by[("retraining loss", "kd_logit")]["loss"]
    assert by[("teacher correction", "uncorrected")]["loss"] != by[("teacher correction", "corrected")]["loss"]
    paper_claims.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_work_dir_removes_its_temporary_directory_and_keeps_a_given_one(tmp_path):
    """Benchmarks without ``--workdir`` work in a temporary directory that is gone afterwards
    (models and stored logits run to gigabytes); a given ``--workdir`` is kept."""
    from bench.common import work_dir

    with work_dir(None, "bench_test_") as w:
        (w / "model.bin").write_bytes(b"x" * 1024)
        assert w.is_dir() and w.name.startswith("bench_test_")
    assert not w.exists()
    with work_dir(tmp_path / "keep", "bench_test_") as k:
        (k / "model.bin").write_bytes(b"x")
    assert (tmp_path / "keep" / "model.bin").is_file()
