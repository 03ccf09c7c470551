"""Scale: activation checkpointing (same trajectory, the fused KD loss still never holds [N, V]),
the multi-node launch command, and the scale rehearsal (``bench scale``) at tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests import ROOT

VOCAB = 49152

CKPT_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from minitron_fast.distill import load_config, train
    from minitron_fast.distill.trainer import read_metrics

    class WidestLogits(TorchDispatchMode):
        '''Records the most rows of any tensor an op returns with the vocabulary as last dim.'''
        def __init__(self, vocab):
            super().__init__()
            self.vocab, self.rows = vocab, 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):
                return out  # views (lm_head.weight.t(): [H, V]) allocate nothing
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                    self.rows = max(self.rows, t.numel() // self.vocab)
            return out

    import transformers.modeling_utils as mu
    calls = [0]
    _checkpoint = mu.checkpoint
    def counted(*a, **k):  # counts the layer calls that run checkpointed
        calls[0] += 1
        return _checkpoint(*a, **k)
    mu.checkpoint = counted

    runs = json.load(open(sys.argv[-1]))
    for run in runs:
        mode = WidestLogits(run["vocab"])
        calls[0] = 0
        with mode:
            train(load_config(None, run["overrides"]), progress=False)
        out = [o.split("=", 1)[1] for o in run["overrides"] if o.startswith("out=")][0]
        losses = [r["loss"] for r in read_metrics(out + "/metrics.jsonl") if "loss" in r]
        print("RESULT " + json.dumps({"name": run["name"], "losses": losses, "rows": mode.rows,
                                      "checkpointed": calls[0]}), flush=True)
    from minitron_fast.distill.engine import exit_process
    exit_process(0)
""")


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    return env


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, demo_model_dir):
    from bench.scale import build_models

    work = tmp_path_factory.mktemp("scale_models")
    teacher, student, n = build_models(work, "tiny", None, 1)   # 1 MB shards: several files per model
    assert len(list(teacher.glob("*.safetensors"))) > 1
    return teacher, student


@pytest.mark.slow
def test_activation_checkpointing_same_trajectory_and_no_full_logits(tiny_models, tmp_path):
    """The student with activation checkpointing follows the run without it step for step (the
    recomputed forward is the same forward), and no op returns a [rows, V] tensor with more
    rows than the fused loss's chunk (N = 2 x 31 = 62 rows per micro-batch; chunk 16)."""
    teacher, student = tiny_models
    common = {"teacher": teacher, "student": student, "steps": 3, "micro_batch_size": 2, "grad_accum": 1,
              "data.seq_len": 32, "data.max_blocks": 32, "data.eval_blocks": 2, "eval_every": 100, "save_every": 100,
              "export": False, "warmup_steps": 0, "schedule": "constant", "lr": 3e-3, "threads": 1,
              "loss.chunk_size": 16, "loss.lm_weight": 0.5, "ds.zero_stage": 0}
    runs = []
    for name, ckpt in (("off", False), ("on", True)):
        o = dict(common, out=tmp_path / name, activation_checkpointing=ckpt)
        runs.append({"name": name, "vocab": VOCAB, "overrides": [f"{k}={v}" for k, v in o.items()]})
    (tmp_path / "w.py").write_text(CKPT_WORKER)
    (tmp_path / "runs.json").write_text(json.dumps(runs, default=str))
    proc = subprocess.run([sys.executable, str(tmp_path / "w.py"), str(tmp_path / "runs.json")], env=_env(),
                          capture_output=True, text=True, timeout=600)
    res = {r["name"]: r for r in (json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT "))}
    assert proc.returncode == 0 and len(res) == 2, proc.stderr[-3000:]
    off, on = res["off"]["losses"], res["on"]["losses"]
    assert len(off) == 3 and off[-1] < off[0]
    assert on == pytest.approx(off, rel=1e-6, abs=1e-7)
    assert 0 < res["on"]["rows"] <= 16 and res["off"]["rows"] <= 16
    # checkpointing really ran: every student layer, every micro-batch (the equal losses cannot show it)
    n_layers = json.loads((student / "config.json").read_text())["num_hidden_layers"]
    assert res["off"]["checkpointed"] == 0 and res["on"]["checkpointed"] == 3 * n_layers


def test_hostfile_reaches_deepspeeds_launcher(tmp_path):
    """Multi-node: launch.hostfile goes to DeepSpeed's runner (``--hostfile``), which starts
    ``num_procs`` ranks per host; torchrun cannot take a hostfile; a missing one is an error."""
    from minitron_fast.distill.launch import trainer_command
    from minitron_fast.errors import MinitronError

    hf = tmp_path / "hostfile"
    hf.write_text("node1 slots=8\nnode2 slots=8\n")
    cmd = trainer_command("r.yaml", num_procs=8, hostfile=str(hf), launcher_args=["--master_port", "29600"])
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--hostfile") + 1] == str(hf)
    assert cmd[cmd.index("--num_gpus") + 1] == "8" and cmd.count("--master_port") == 1
    assert cmd[-4:] == ["--module", "minitron_fast.distill", "--config", os.path.abspath("r.yaml")]
    with pytest.raises(MinitronError, match="needs the deepspeed launcher"):
        trainer_command("r.yaml", num_procs=8, hostfile=str(hf), launcher="torchrun")
    with pytest.raises(MinitronError, match=r"hostfile .*nope does not exist"):
        trainer_command("r.yaml", num_procs=8, hostfile=str(tmp_path / "nope"))


def test_recipe_launch_hostfile_key(tmp_path):
    """``launch.hostfile`` in a recipe is the hostfile of the pipeline's training stages."""
    from minitron_fast.pipeline.recipe import load_recipe

    hf = tmp_path / "hosts"
    hf.write_text("a slots=8\nb slots=8\n")
    r = load_recipe("llama3.1-8b-to-4b-width", [f"launch.hostfile={hf}"])
    assert r.launch.hostfile == str(hf) and r.launch.num_procs == 8


@pytest.mark.slow
def test_scale_rehearsal_tiny(tmp_path, demo_model_dir):
    """Scale CI: the bench's own code at tiny sizes, with the row contract: data_stream small /
    large (peak_mb, tokens_per_s), zero3_rank rank0 / rank1 and single (tokens_per_s), and the
    ZeRO-3 run's first loss equal to the single process's."""
    from bench.common import finalize_rows
    from bench.scale import data_rows, teacher_rows

    rows = data_rows(tmp_path, 0.3) + teacher_rows(tmp_path, size="tiny", vocab=None, seq_len=32, steps=2, shard_mb=1)
    rows = finalize_rows(rows, bench="scale")
    got = {(r["impl"], r["case"]): r for r in rows}
    assert set(got) == {("data_stream", "small"), ("data_stream", "large"), ("zero3_rank", "rank0"),
                        ("zero3_rank", "rank1"), ("single", "single")}
    for r in rows:
        assert r["ok"], r
        assert r["tokens_per_s"] > 0 and r["peak_mb"] > 0
    assert got[("data_stream", "large")]["n_tokens"] > 5 * got[("data_stream", "small")]["n_tokens"]
    assert got[("zero3_rank", "rank0")]["first_loss"] == pytest.approx(got[("single", "single")]["first_loss"], rel=1e-4)


HEAP_CHURN = textwrap.dedent("""
    import json, sys
    import torch
    from minitron_fast.distill.cpu_memory import cap_heap_retention, resident_memory_mb
    capped = cap_heap_retention() if sys.argv[-1] == "cap" else None
    torch.empty(2 << 20).fill_(1.0)  # one 8 MB block mapped and freed (glibc's threshold adapts to it)
    base = resident_memory_mb()
    big, small = [], []
    for _ in range(40):  # 8 MB blocks (per-module gathers) between 200 KB tensors that outlive them
        big.append(torch.empty(2 << 20).fill_(1.0))
        small.append(torch.ones(50_000))
    del big
    print(json.dumps({"capped": capped, "kept_mb": resident_memory_mb() - base}))
""")


def test_cpu_training_returns_freed_gathers_to_the_os(tmp_path):
    """The trainer's allocator policy on the CPU (``cap_heap_retention``): forty 8 MB blocks
    allocated between 200 KB tensors that outlive them and then freed leave the process's
    resident size where it was; with glibc's adaptive default the same churn keeps them resident
    (the control: 320 MB allocated)."""
    script = tmp_path / "churn.py"
    script.write_text(HEAP_CHURN)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = {}
    for mode in ("cap", "default"):
        proc = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["cap"]["capped"] is False:
        pytest.skip("not glibc: no mallopt")
    assert out["cap"]["capped"] is True
    assert out["cap"]["kept_mb"] < 40, out
    assert out["default"]["kept_mb"] > 200, out  # (the control; 320 MB allocated)
