"""Multi-node runs need one run directory every rank sees (GPU-path defect 9: run.json, the
checkpoint renames and ``latest`` are written by global rank 0 only; with node-local output
directories node 1's ranks failed on --resume while node 0 waited in NCCL until the timeout).

Two gloo ranks on this machine stand in for two nodes: giving rank 1 another directory is what a
node-local filesystem looks like to it. Both ranks must fail, together and in one line; with one
shared directory both pass and the probe file is gone afterwards.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch.multiprocessing as mp


def _rank(rank: int, store: str, dirs: list[str], results: str) -> None:
    import torch.distributed as dist

    from minitron_fast.distill.checkpoints import ResumeError, check_shared_out_dir
    from pathlib import Path

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_shared_out_dir(Path(dirs[rank]), rank, 2)
        out = {"ok": True}
    except ResumeError as exc:
        out = {"ok": False, "error": str(exc)}
    finally:
        dist.destroy_process_group()
    Path(results, f"{rank}.json").write_text(json.dumps(out))


def _run(tmp_path, dirs):
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    res = tmp_path / "res"
    res.mkdir()
    mp.start_processes(_rank, args=(str(tmp_path / "store"), [str(d) for d in dirs], str(res)), nprocs=2,
                       start_method="spawn")
    return [json.loads((res / f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo ranks as processes")
def test_ranks_that_cannot_see_rank_0s_directory_all_fail_in_one_line(tmp_path):
    a, b = _run(tmp_path, [tmp_path / "node0", tmp_path / "node1"])
    assert not a["ok"] and not b["ok"]  # rank 0 sees its own file, and fails too: no rank waits alone
    for r in (a, b):
        assert "\n" not in r["error"] and "1 of 2 ranks" in r["error"]
        assert "filesystem every node mounts" in r["error"]
    assert "rank 1" in b["error"] and "rank 1" not in a["error"]


def test_one_shared_directory_passes_and_leaves_no_probe(tmp_path):
    from minitron_fast.distill.checkpoints import SHARED_PROBE

    d = tmp_path / "shared"
    a, b = _run(tmp_path, [d, d])
    assert a == {"ok": True} and b == {"ok": True}
    assert not (d / SHARED_PROBE).exists()


def test_a_world_of_one_checks_nothing(tmp_path):
    from minitron_fast.distill.checkpoints import check_shared_out_dir

    check_shared_out_dir(tmp_path / "does-not-exist", 0, 1)  # no process group, no file
    assert not (tmp_path / "does-not-exist").exists()


def test_each_cuda_rank_makes_its_gpu_current_before_the_process_group(tmp_path, monkeypatch):
    """NCCL and the object collectives of the start-up checks run on the current CUDA device: with
    none set, every local rank of a node used cuda:0 (NCCL's duplicate-GPU error)."""
    import torch

    from bench.common import make_tiny_teacher
    from minitron_fast.distill import trainer as tr
    from minitron_fast.distill.config import DistillConfig

    calls = []

    class Stop(Exception):
        pass

    def fake_init(on_cuda=None):
        calls.append(("init_distributed", on_cuda))
        raise Stop

    monkeypatch.setattr(DistillConfig, "train_device", lambda self: "cuda:3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(tr, "init_distributed", fake_init)
    teacher = make_tiny_teacher(tmp_path / "teacher")
    cfg = DistillConfig(mode="correct-teacher", teacher=str(teacher), out=str(tmp_path / "run"))
    with pytest.raises(Stop):
        tr.Trainer(cfg, progress=False).run()
    assert calls == [("set_device", "cuda:3"), ("init_distributed", True)]


def test_exit_process_flushes_the_streams_and_keeps_the_exit_code():
    """A rank ends through ``exit_process`` (no interpreter teardown, where a gloo thread could
    abort a finished job): what it printed still arrives, and the exit code is the one given."""
    import subprocess

    code = ("import sys\n"
            "from minitron_fast.distill.engine import exit_process, init_distributed\n"
            "init_distributed(on_cuda=False)\n"
            "print('done', end='')\n"
            "sys.stderr.write('note')\n"
            "exit_process(3)\n"
            "print('never')\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout.endswith("done") and "never" not in out.stdout and "note" in out.stderr
