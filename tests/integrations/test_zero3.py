"""ZeRO-3 with the fused KD loss: 2 CPU processes (gloo, DS_ACCELERATOR=cpu, client AdamW so nothing
JIT-builds), the student's lm_head partitioned; losses and the final lm_head match a single-process
run without DeepSpeed, both through the integration and through the functional API
(``fused_linear_kd_loss(hidden, lm_head_module, ...)``) and through the TRL divergence. The worker
is bench/zero3_worker.py, which ``bench device_check`` runs on 2 GPUs."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_zero3_two_process_cpu_matches_single_process():
    """Through ``bench device_check``'s row (its GPU run is the same code with NCCL ranks)."""
    pytest.importorskip("deepspeed")
    from bench.device_check import check_zero3_two_ranks

    row = check_zero3_two_ranks("cpu", timeout=900)
    assert row["status"] == "ran" and "error" not in row, row.get("error")
    assert row["world"] == 2
    # through the integration, through fused_linear_kd_loss handed the partitioned lm_head module, and
    # through the TRL integration's divergence (JSD, beta 0.5, prompt masked; the teacher partitioned too)
    assert set(row["modes"]) == {"integration", "functional", "trl"}
    for mode, f in row["modes"].items():
        assert f == {"partitioned": True, "losses_match": True, "head_matches": True, "trained": True}, (mode, f)
    assert row["loss_rel_err"] <= 1e-4 and row["ok"] is True
