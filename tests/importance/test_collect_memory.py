"""Importance on the CPU caps glibc's heap retention (the trainer's policy) before its forward
passes: without it each batch's freed temporaries stay resident (SmolLM2-135M, 64 x 256 tokens,
batch 8: peak RSS 1.91 GB without, 1.11 GB with; the measurement is ``bench peers``' prune rows)."""
from __future__ import annotations

import torch


def test_collect_importance_caps_heap_retention_on_the_cpu(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron_fast.importance import collect as collect_mod

    calls = []
    monkeypatch.setattr(collect_mod, "cap_heap_retention", lambda *a: calls.append(a) or True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    scores = collect_mod.collect_importance(model, torch.randint(0, 61, (3, 9)), batch_size=2, progress=False)
    assert calls == [()]
    assert scores.neurons[0].shape == (64,) and torch.isfinite(scores.neurons[0]).all()
