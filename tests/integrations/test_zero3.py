"""ZeRO-3 with the fused KD loss: 2 CPU processes (gloo, DS_ACCELERATOR=cpu, client AdamW so nothing
JIT-builds), the student's lm_head partitioned; losses and the final lm_head match a single-process
run without DeepSpeed, both through the integration and through the functional API
(``fused_linear_kd_loss(hidden, lm_head_module, ...)``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import ROOT

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_zero3_two_process_cpu_matches_single_process(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "z3.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "zero3_kd_worker.py"), str(out)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2

    from tests.integrations import zero3_kd_worker as worker

    # through the integration, through fused_linear_kd_loss handed the partitioned lm_head module, and
    # through the TRL integration's divergence (JSD, beta 0.5, prompt masked; the teacher partitioned too)
    for mode in ("integration", "functional", "trl"):
        ref_losses, ref_head = worker.reference(mode="trl" if mode == "trl" else "integration")
        assert res[mode]["partitioned"], mode  # the lm_head really was split across ranks
        for a, b in zip(res[mode]["losses"], ref_losses):
            assert abs(a - b) <= 1e-4 * abs(b) + 1e-7, (mode, res[mode]["losses"], ref_losses)
        head = torch.load(f"{out}.{mode}.pt")
        assert torch.allclose(head, ref_head, atol=1e-5, rtol=1e-4), mode
        assert not torch.allclose(head, worker.tiny(32, 1, 0).get_output_embeddings().weight)  # it trained
