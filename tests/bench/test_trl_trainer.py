"""``bench trl_trainer --quick``: both rows run TRL's trainer on a tiny Llama in fresh processes and
report memory, step time and the same loss curve (the real comparison is the default run on
SmolLM2-135M, recorded in docs/bench)."""
from __future__ import annotations

import pytest

pytest.importorskip("trl")


@pytest.mark.slow
def test_quick_rows_have_memory_and_the_same_losses(tmp_path):
    import argparse

    from bench import trl_trainer

    p = argparse.ArgumentParser()
    trl_trainer.add_arguments(p)
    args = p.parse_args(["--workdir", str(tmp_path)])
    args.quick = True
    rows = trl_trainer.run(args)
    assert [r["impl"] for r in rows] == ["trl", "minitron_fast"]
    for r in rows:
        assert r["ok"], r
        assert r["peak_mb"] > 0 and r["median_s"] > 0 and len(r["losses"]) == 2
    ours = rows[1]
    # the tiny model's JSD is ~1e-5: fp32 noise is relative to the terms summed, not to the result
    for x, y in zip(rows[0]["losses"], ours["losses"]):
        assert abs(x - y) <= 1e-4 * abs(x) + 1e-8, (rows[0]["losses"], ours["losses"])
    assert ours["loss_rel_diff_vs_trl"] >= 0
    assert ours["peak_mb_vs_trl"] > 0
