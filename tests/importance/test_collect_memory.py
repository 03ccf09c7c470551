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


def test_cpu_micro_batches_keep_temporaries_under_the_threshold_and_scores_unchanged(tiny_builders, monkeypatch):
    """On the CPU each batch runs as forwards of ``cpu_micro_batch`` samples (the widest
    activation below the mmap threshold); every aggregation and the padded samples give the
    scores of whole batches. The forwards are counted."""
    from minitron_fast.importance import collect as collect_mod

    torch.manual_seed(0)
    model = tiny_builders["gemma2"]().eval()
    n, T = 5, 11
    ids = torch.randint(0, model.config.vocab_size, (n, T))
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    g = collect_mod.get_view(model).geometry()
    width = max(g.hidden_size, g.intermediate_size, g.num_attention_heads * g.head_dim)
    assert collect_mod.cpu_micro_batch(model, T) == collect_mod.MMAP_THRESHOLD // (T * width * 4)
    forwards = []
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: forwards.append(out.shape[0]))
    for seq_agg, batch_agg in (("mean", "l2"), ("l2", "mean"), ("var", "var")):
        whole = collect_mod.collect_importance(model, ids, attention_mask=mask, batch_size=4, seq_agg=seq_agg,
                                               batch_agg=batch_agg, impl="torch", progress=False).to_tensors()
        assert forwards == [4, 1]   # the tiny model's samples fit the threshold many times over
        forwards.clear()
        monkeypatch.setattr(collect_mod, "MMAP_THRESHOLD", 2 * T * width * 4)   # 2 samples a forward
        micro = collect_mod.collect_importance(model, ids, attention_mask=mask, batch_size=4, seq_agg=seq_agg,
                                               batch_agg=batch_agg, impl="torch", progress=False).to_tensors()
        monkeypatch.undo()
        assert forwards == [2, 2, 1]
        forwards.clear()
        for k, v in whole.items():
            torch.testing.assert_close(micro[k], v, rtol=1e-5, atol=1e-6, msg=f"{seq_agg}/{batch_agg} {k}")
