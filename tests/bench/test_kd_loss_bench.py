"""``bench kd_loss``'s TRL peer row (``trl_chunked``, issue 25 item 2) at the tiny test shape: it runs
in its own process beside ours, its correctness check passes, its loss equals ours, and without
``trl`` it says how to install it instead of failing."""
from __future__ import annotations

import argparse
import sys

import pytest

from bench.common import ROW_KEYS, finalize_rows

DIVS = ("forward_kl", "reverse_kl", "jsd")


def test_trl_row_runs_beside_ours_and_agrees():
    pytest.importorskip("trl")
    from bench.kd_loss import TEST_CASES, run

    args = argparse.Namespace(quick=True, cases=",".join(TEST_CASES), impls="minitron_fast,trl_chunked",
                              divergences=",".join(DIVS), reps=1, timeout=600)
    rows = finalize_rows(run(args), bench="kd_loss")
    by = {(r["divergence"], r["impl"]): r for r in rows}
    assert set(by) == {(d, i) for d in DIVS for i in ("minitron_fast", "trl_chunked")}, sorted(by)
    for div in DIVS:
        trl, ours = by[(div, "trl_chunked")], by[(div, "minitron_fast")]
        assert trl["ok"] is True, trl
        assert set(trl) == set(ours), set(trl) ^ set(ours)  # the same fields as our row
        assert all(trl[k] is not None for k in ROW_KEYS), trl
        assert trl["err_loss"] < 1e-5 and trl["err_dh"] < 1e-4 and trl["err_dw"] < 1e-4, trl
        # the same inputs: TRL's loss on the check tokens is ours
        assert trl["check_loss"] == pytest.approx(ours["check_loss"], rel=1e-5), (div, trl["check_loss"],
                                                                                  ours["check_loss"])
        assert ours["vs_trl"] == pytest.approx(ours["median_s"] / trl["median_s"])
        assert ours["peak_vs_trl"] == pytest.approx(ours["peak_mb"] / trl["peak_mb"])
        assert ours["cpu_vs_trl"] == pytest.approx(ours["cpu_median_s"] / trl["cpu_median_s"])


def test_trl_row_without_trl_says_how_to_install(monkeypatch):
    from bench.kd_loss import TEST_CASES, TRL_MISSING, worker

    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")] + ["trl"]:
        monkeypatch.setitem(sys.modules, name, None)  # import trl... raises ModuleNotFoundError
    N, Hs, Ht, V = TEST_CASES["tiny_n64"]
    row = worker("tiny_n64", "trl_chunked", N, Hs, Ht, V, reps=1, warmup=0, check_tokens=8, divergence="jsd")
    assert row == {"case": "tiny_n64", "impl": "trl_chunked", "divergence": "jsd", "ok": False, "ran": False,
                   "note": TRL_MISSING}
    assert TRL_MISSING == "not installed: pip install minitron_fast[trl]"
