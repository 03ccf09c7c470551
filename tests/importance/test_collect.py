"""Exactness of the one-pass collection against a slow reference that stores every activation
with plain forward hooks and aggregates afterwards in float64; patch reversibility; errors."""
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from minitron_fast.errors import MinitronError
from minitron_fast.importance.collect import (AGGS, ImportanceCollector, NonFiniteActivationError,
                                              collect_importance)
from minitron_fast.models import get_view

AGG_PAIRS = [(s, b) for s in AGGS for b in AGGS]


pytestmark = pytest.mark.usefixtures("one_thread")



def _data(vocab, n=5, T=11, padded=True):
    ids = torch.randint(0, vocab, (n, T))
    mask = torch.ones(n, T, dtype=torch.long)
    if padded:
        mask[1, :4] = 0  # left padding
        mask[n - 2, T - 5:] = 0  # right padding
        mask[n - 1, :T - 1] = 0  # a single real token
    return ids, mask


@torch.no_grad()
def _stored_activations(model, ids, mask, batch_size):
    """Every activation the scores are made of, stored whole (the deliberately slow way)."""
    view = get_view(model)
    store = defaultdict(list)
    hooks = []
    for i, lv in enumerate(view.layers):
        hooks.append(lv.o_proj.register_forward_pre_hook(lambda m, a, i=i: store["o_in", i].append(a[0].double())))
        hooks.append(lv.down_proj.register_forward_pre_hook(lambda m, a, i=i: store["down_in", i].append(a[0].double())))
        for j, norm in enumerate(lv.hidden_norms()):  # Llama 2, Gemma 4
            hooks.append(norm.register_forward_hook(lambda m, a, o, i=i, j=j: store["norm", i, j].append(o.double())))
        hooks.append(lv.module.register_forward_pre_hook(
            lambda m, a, k, i=i: store["x_in", i].append((a[0] if a else k["hidden_states"]).double()), with_kwargs=True))
        hooks.append(lv.module.register_forward_hook(
            lambda m, a, o, i=i: store["x_out", i].append((o[0] if isinstance(o, tuple) else o).double())))
    try:
        for s in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[s: s + batch_size], attention_mask=mask[s: s + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return view, {k: torch.cat(v) for k, v in store.items()}


def _agg(a, mask, seq_agg, batch_agg):
    """a [n, T, U] per-token values -> [U], valid tokens only, float64."""
    per_sample = []
    for b in range(a.shape[0]):
        v = a[b][mask[b] > 0]  # [n_b, U]
        per_sample.append({"mean": v.mean(0), "l2": v.norm(dim=0), "var": v.var(0, unbiased=False)}[seq_agg])
    s = torch.stack(per_sample)
    return {"mean": s.mean(0), "l2": s.norm(dim=0), "var": s.var(0, unbiased=False)}[batch_agg]


def _reference_scores(view, acts, mask, seq_agg, batch_agg):
    g = view.geometry()
    out = defaultdict(list)
    for i in range(view.num_layers):
        o = acts["o_in", i]
        heads = _agg(o.view(*o.shape[:2], g.num_attention_heads, -1).norm(dim=-1), mask, seq_agg, batch_agg)
        out["heads"].append(heads)
        out["kv"].append(heads.view(g.num_key_value_heads, -1).sum(1))
        out["neurons"].append(_agg(acts["down_in", i].abs(), mask, seq_agg, batch_agg))
        out["channels"].append(sum(_agg(acts["norm", i, j].abs(), mask, seq_agg, batch_agg)
                                   for j in range(len(view.layers[i].hidden_norms()))))
        cos = F.cosine_similarity(acts["x_in", i], acts["x_out", i], dim=-1)
        out["bi"].append(1 - cos[mask > 0].mean())
    return out


def _close(got, ref, what):
    torch.testing.assert_close(got.double(), ref, rtol=2e-4, atol=2e-5, msg=lambda m: f"{what}: {m}")


def test_scores_equal_slow_reference_every_aggregation_padded(tiny_model):
    ids, mask = _data(tiny_model.config.vocab_size)
    view, acts = _stored_activations(tiny_model, ids, mask, batch_size=2)
    for seq_agg, batch_agg in AGG_PAIRS:
        s = collect_importance(tiny_model, ids, attention_mask=mask, batch_size=2, seq_agg=seq_agg,
                               batch_agg=batch_agg, impl="torch", progress=False)
        ref = _reference_scores(view, acts, mask, seq_agg, batch_agg)
        tag = f"{seq_agg}/{batch_agg}"
        for i in range(view.num_layers):
            _close(s.heads[i], ref["heads"][i], f"{tag} layer {i} heads")
            _close(s.kv_groups[i], ref["kv"][i], f"{tag} layer {i} kv_groups")
            _close(s.neurons[i], ref["neurons"][i], f"{tag} layer {i} neurons")
            _close(s.layer_channels[i], ref["channels"][i], f"{tag} layer {i} channels")
        _close(s.channels, torch.stack(ref["channels"]).sum(0), f"{tag} channels")
        _close(s.block_importance, torch.stack(ref["bi"]), f"{tag} block importance")
        assert s.meta["calib_tokens"] == int(mask.sum()) and s.meta["calib_samples"] == 5


@pytest.mark.parametrize("name", ["llama", "mistral_nemo_like"])
def test_head_score_after_o_proj_equals_reference(tiny_builders, name):
    model = tiny_builders[name]()
    ids, mask = _data(model.config.vocab_size)
    view, acts = _stored_activations(model, ids, mask, batch_size=2)
    g = view.geometry()
    for seq_agg, batch_agg in (("mean", "l2"), ("var", "mean")):
        s = collect_importance(model, ids, attention_mask=mask, batch_size=2, seq_agg=seq_agg, batch_agg=batch_agg,
                               impl="torch", progress=False, head_score="output")
        assert s.meta["head_score"] == "output"
        for i, lv in enumerate(view.layers):
            o = acts["o_in", i].view(*acts["o_in", i].shape[:2], g.num_attention_heads, g.head_dim)
            W = lv.o_proj.weight.double().view(g.hidden_size, g.num_attention_heads, g.head_dim)
            contrib = torch.einsum("btnd,hnd->btnh", o, W).norm(dim=-1)  # [n, T, nh]: explicit per-head outputs
            _close(s.heads[i], _agg(contrib, mask, seq_agg, batch_agg), f"{name} layer {i} heads (after o_proj)")


FUSED_KERNELS = ("swiglu_stats", "rmsnorm_stats", "head_stats", "block_cos")


@pytest.mark.parametrize("name", ["qwen2_bias", "qwen3", "gemma2", "gemma3", "phi3", "mistral_nemo_like"])
def test_every_fused_kernel_runs_and_equals_torch_path(tiny_builders, monkeypatch, name):
    """Under TRITON_INTERPRET the fused forwards (gated MLP, RMSNorm) and Triton reductions run on
    CPU. Each of the four kernels must really launch, once per layer and per [hidden] norm (the
    fallback hooks give the same numbers, so equality alone could not see a kernel never run)."""
    from minitron_fast.kernels import importance as k

    model = tiny_builders[name]()
    view = get_view(model)
    ids, mask = _data(model.config.vocab_size, n=3, T=7)
    ref = collect_importance(model, ids, attention_mask=mask, batch_size=3, seq_agg="var", impl="torch", progress=False)
    launches = dict.fromkeys(FUSED_KERNELS, 0)
    for kern in FUSED_KERNELS:
        def counted(*a, _real=getattr(k, kern), _name=kern, **kw):
            launches[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(k, kern, counted)
    got = collect_importance(model, ids, attention_mask=mask, batch_size=3, seq_agg="var", impl="triton", progress=False)
    L = view.num_layers
    assert launches == {"swiglu_stats": L, "rmsnorm_stats": sum(len(lv.hidden_norms()) for lv in view.layers),
                        "head_stats": L, "block_cos": L}, launches
    for key, v in ref.to_tensors().items():
        torch.testing.assert_close(got.to_tensors()[key], v, rtol=2e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")


def test_gate_activation_detected_by_behaviour():
    from transformers.activations import ACT2FN

    from minitron_fast.ops.importance import gate_activation_kind

    assert gate_activation_kind(ACT2FN["silu"]) == "silu"  # transformers' SiLUActivation, not nn.SiLU
    assert gate_activation_kind(torch.nn.SiLU()) == "silu"
    assert gate_activation_kind(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert gate_activation_kind(ACT2FN["gelu"]) is None  # exact GELU: the kernel does not compute it
    assert gate_activation_kind(torch.nn.ReLU()) is None


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_patch_is_reversible_and_output_unchanged(tiny_builders, impl):
    model = tiny_builders["llama"]()
    ids, mask = _data(model.config.vocab_size, n=2, T=6)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    view = get_view(model)
    with ImportanceCollector(model, impl=impl) as col:
        assert any(lv.o_proj._forward_pre_hooks for lv in view.layers)
        out = col.step(ids, mask, run_lm_head=True)  # logits in the same pass, unchanged
        torch.testing.assert_close(out.logits, before, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the patched model computes the same logits
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=1e-5, atol=1e-5)
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and "forward" not in mod.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)


def test_attention_implementation_does_not_matter(tiny_builders):
    model = tiny_builders["mistral_nemo_like"]()
    ids, mask = _data(model.config.vocab_size, n=3, T=8)
    model.set_attn_implementation("sdpa")
    a = collect_importance(model, ids, attention_mask=mask, progress=False, impl="torch")
    model.set_attn_implementation("eager")
    b = collect_importance(model, ids, attention_mask=mask, progress=False, impl="torch")
    for k, v in a.to_tensors().items():
        torch.testing.assert_close(b.to_tensors()[k], v, rtol=1e-4, atol=1e-5)


def test_nan_activations_name_the_layer(tiny_builders):
    model = tiny_builders["llama"]()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    ids, _ = _data(model.config.vocab_size, padded=False)
    with pytest.raises(NonFiniteActivationError, match="layer 1"):
        collect_importance(model, ids, progress=False, impl="torch")


def test_bad_aggregation_and_input(tiny_builders):
    model = tiny_builders["llama"]()
    with pytest.raises(MinitronError, match="seq_agg"):
        ImportanceCollector(model, seq_agg="median")
    with pytest.raises(MinitronError, match="head_score"):
        ImportanceCollector(model, head_score="q")
    with pytest.raises(MinitronError, match="non-empty"):
        collect_importance(model, torch.zeros(0, 4, dtype=torch.long), progress=False)
    with pytest.raises(MinitronError, match="max_position_embeddings"):
        collect_importance(model, torch.zeros(1, 129, dtype=torch.long), progress=False)


def test_bf16_model_scores_close_to_fp32(tiny_builders):
    model = tiny_builders["llama"]()
    ids = torch.randint(0, 131, (4, 9))
    a = collect_importance(model, ids, progress=False, impl="torch").to_tensors()
    b = collect_importance(model.to(torch.bfloat16), ids, progress=False, impl="torch")
    assert b.meta["dtype"] == "bfloat16"
    for k, v in b.to_tensors().items():
        assert v.dtype == torch.float32  # accumulated in fp32 whatever the model dtype
        torch.testing.assert_close(v, a[k], rtol=2e-2, atol=2e-2 * float(a[k].abs().max()))
