"""ZeRO-3 loading shard by shard (``models.loading.load_zero3_by_shard``): 2 CPU ranks load real
safetensors checkpoints under ``partitioned``; every gathered parameter equals the file's tensor
bit for bit, each is split across the ranks, and the loader that ran is the one expected."""
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


def _llama(tmp: Path, name: str, *, tied: bool, shard: str | None = None, strip_prefix: bool = False) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(len(name))
    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=131, tie_word_embeddings=tied, max_position_embeddings=64)
    d = tmp / name
    LlamaForCausalLM(cfg).save_pretrained(d, max_shard_size=shard or "1GB")
    if strip_prefix:  # a base-model-style checkpoint: names transformers maps, ours do not match
        st = load_file(d / "model.safetensors")
        save_file({k.removeprefix("model."): v for k, v in st.items()}, d / "model.safetensors",
                  metadata={"format": "pt"})
    return d


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_zero3_loads_shard_by_shard_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    sharded = _llama(tmp_path, "sharded", tied=False, shard="20KB")
    tied = _llama(tmp_path, "tied", tied=True)
    base = _llama(tmp_path, "base_names", tied=True, strip_prefix=True)
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    out = tmp_path / "res.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "zero3_load_worker.py"), str(out), str(sharded), str(tied), str(base)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for i, (d, ours) in enumerate(((sharded, True), (tied, True), (base, False))):
        r = res[str(d)]
        assert r["by_shard"] is ours, (d.name, r)  # base-model names: transformers' loader maps them
        assert r["partitioned"] and r["eval"], (d.name, r)
        got = torch.load(f"{out}.{i}.pt")
        want = _tensors(d)
        if d is base:
            want = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in want.items()}
        assert set(got) == set(want), (d.name, sorted(set(got) ^ set(want)))
        for k, v in got.items():
            assert torch.equal(v, want[k]), (d.name, k)
