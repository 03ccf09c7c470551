"""Importance collection on a model spread by accelerate (``device_map``; issue 23, defect 3), on the CPU.

Two kinds of evidence, since this machine has one device with data:

- exactness and accelerate's hooks: a tiny model dispatched with ``dispatch_model`` (some layers
  offloaded to "disk": their weights sit on ``meta`` between forwards and accelerate's
  ``AlignDevicesHook`` loads them around each forward; every other module hooked too) or with
  ``cpu_offload`` gives the same scores, bit for bit, as the plain model; accelerate's hooks are
  the same objects after ``detach()``, and the model still computes the same logits;
- placement: a device map that puts the last decoder layer on ``meta`` (standing in for a second
  GPU: mixing a CPU tensor with a meta tensor raises, as mixing cuda:0 with cuda:1 does) runs the
  whole collection; that layer's statistics live on meta, the others' on the CPU and equal the
  plain run's.
"""
from __future__ import annotations

import pytest
import torch
from accelerate import cpu_offload, dispatch_model

from minitron_fast.importance import collect as collect_mod
from minitron_fast.importance.collect import ImportanceCollector, collect_importance
from minitron_fast.importance.depth import depth_lm_loss
from minitron_fast.models import get_view
from minitron_fast.ops import importance as ops
from tests.models.test_moe import BUILDERS as MOE_BUILDERS, build as build_moe

pytestmark = pytest.mark.usefixtures("one_thread")

META = torch.device("meta")
CPU = torch.device("cpu")


def _model(tiny_builders, family):
    torch.manual_seed(0)
    return build_moe(family) if family in MOE_BUILDERS else tiny_builders[family]()


def _data(vocab, n=3, T=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[n - 1, T - 2:] = 0  # right padding
    return ids, mask


def _device_map(model, layer_device, other="cpu"):
    """``{module name: device}`` at decoder-layer granularity (as transformers' "auto" makes it)."""
    dm = {f"model.{name}": other for name, _ in model.model.named_children() if name != "layers"}
    dm.update({f"model.layers.{i}": layer_device(i) for i in range(len(model.model.layers))})
    dm["lm_head"] = other
    return dm


def _accelerate_hooks(model):
    """Every module accelerate hooked, with the objects its hook consists of."""
    return {name: (vars(m)["forward"], vars(m)["_old_forward"], m._hf_hook)
            for name, m in model.named_modules() if "_hf_hook" in vars(m)}


def _assert_hooks_intact(model, before):
    after = _accelerate_hooks(model)
    assert after.keys() == before.keys()
    for name, objs in before.items():
        assert all(a is b for a, b in zip(after[name], objs)), f"{name}: accelerate's hook was replaced"
    for name, m in model.named_modules():  # nothing of ours is left
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert "forward" not in vars(m) or "_hf_hook" in vars(m), name


# -- exactness, with accelerate's hooks moving tensors and loading offloaded weights ----------------------------

CASES = [("llama", "torch", "output"), ("mixtral", "torch", "input"), ("qwen2_moe", "torch", "input"),
         ("gemma2", "triton", "input"), ("phi3", "triton", "input"), ("qwen3_moe", "triton", "input")]


@pytest.mark.parametrize("family,impl,head_score", CASES, ids=["-".join(c) for c in CASES])
def test_offloaded_dispatch_scores_equal_single_device(tiny_builders, tmp_path, family, impl, head_score):
    """Layers 1 and 2 and the final norm offloaded to disk (an MoE layer among them in every MoE
    family), the rest on the CPU; the norms, MLPs and experts the collector patches are
    accelerate-hooked. The scores equal the plain model's exactly; accelerate's hooks survive."""
    model = _model(tiny_builders, family)
    ids, mask = _data(model.config.vocab_size)
    with torch.no_grad():
        plain_logits = model(input_ids=ids, attention_mask=mask).logits
    kw = dict(attention_mask=mask, batch_size=2, seq_agg="var", batch_agg="l2", impl=impl, progress=False,
              head_score=head_score)
    ref = collect_importance(model, ids, **kw).to_tensors()
    dm = _device_map(model, lambda i: "disk" if i in (1, 2) else "cpu")
    dm["model.norm"] = "disk"
    dispatch_model(model, dm, main_device="cpu", offload_dir=str(tmp_path))
    view = get_view(model)
    assert view.layers[1].o_proj.weight.device == META  # really offloaded
    hooks = _accelerate_hooks(model)
    assert any(name.endswith(("mlp", "experts")) for name in hooks) and any("norm" in name for name in hooks)
    got = collect_importance(model, ids, **kw).to_tensors()
    assert got.keys() == ref.keys()
    for key, v in ref.items():
        assert torch.equal(got[key], v), key
    _assert_hooks_intact(model, hooks)
    with torch.no_grad():  # the hooked modules we patched work again (offloaded weights load)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain_logits)


def test_fused_forwards_keep_accelerate_hooks_without_offload(tiny_builders):
    """dispatch_model hooks every submodule of a layer with its execution device (what
    ``device_map="auto"`` does on several GPUs): the fused norm and MLP forwards go inside those
    hooks, which are the same after detach (they were replaced, then deleted)."""
    model = _model(tiny_builders, "llama")
    ids, mask = _data(model.config.vocab_size)
    ref = collect_importance(model, ids, attention_mask=mask, impl="triton", progress=False).to_tensors()
    dispatch_model(model, _device_map(model, lambda i: "cpu"), main_device="cpu", force_hooks=True)
    hooks = _accelerate_hooks(model)
    view = get_view(model)
    assert {"mlp", "input_layernorm"} <= {n.rsplit(".", 1)[-1] for n in hooks}
    with ImportanceCollector(model, impl="triton") as col:
        # our fused forward runs inside accelerate's wrapper, which is still the module's forward
        for lv in view.layers:
            for m in (lv.mlp, lv.input_norm, lv.post_attn_norm, lv.module):
                assert vars(m)["forward"] is hooks[next(n for n, x in model.named_modules() if x is m)][0]
        col.step(ids, mask)
    got = col.scores().to_tensors()
    for key, v in ref.items():
        assert torch.equal(got[key], v), key
    _assert_hooks_intact(model, hooks)


def test_cpu_offload_whole_model_scores_and_depth_equal(tiny_builders):
    """accelerate's ``cpu_offload``: every weight (the embedding's too) is on meta between
    forwards, so the first parameter's device says nothing about where the ids go."""
    model = _model(tiny_builders, "qwen2_bias")
    ids, mask = _data(model.config.vocab_size)
    ref = collect_importance(model, ids, attention_mask=mask, impl="torch", progress=False).to_tensors()
    ref_depth = depth_lm_loss(model, ids, block_size=1, progress=False)
    cpu_offload(model, execution_device="cpu")
    assert next(model.parameters()).device == META
    got = collect_importance(model, ids, attention_mask=mask, impl="torch", progress=False).to_tensors()
    for key, v in ref.items():
        assert torch.equal(got[key], v), key
    d = depth_lm_loss(model, ids, block_size=1, progress=False)
    assert d["base"] == ref_depth["base"] and torch.equal(d["per_layer"], ref_depth["per_layer"])
    assert collect_mod.module_device(model.model.embed_tokens) == CPU  # where the ids went


# -- placement: one layer on another device ----------------------------------------------------------------------

def _last_layer_on_meta(model):
    L = len(model.model.layers)
    dm = _device_map(model, lambda i: "meta" if i == L - 1 else "cpu")
    dm["model.norm"] = dm["lm_head"] = "meta"
    dispatch_model(model, dm, main_device="cpu", force_hooks=True)
    return L


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_statistics_live_on_each_layers_device(tiny_builders, family):
    """The last layer computes on meta. The masks, the per-batch sums and the block cosine of
    that layer are made there (before: on the first parameter's device, and mixing them raised);
    the other layers' statistics equal the plain run's exactly."""
    model = _model(tiny_builders, family)
    ids, mask = _data(model.config.vocab_size)
    kw = dict(impl="torch", seq_agg="var", batch_agg="var", check_finite=False)  # finite checks read values
    with ImportanceCollector(model, **kw) as ref:
        ref.step(ids, mask)
    L = _last_layer_on_meta(model)
    with ImportanceCollector(model, **kw) as col:
        col.step(ids, mask)
    for i in range(L):
        stats = [col.heads[i], col.neurons[i], *col.norms[i]]
        want = META if i == L - 1 else CPU
        assert all(st.S1.device == want and st.S2.device == want for st in stats), i
        assert col._cos_acc[i].device == want
        if i < L - 1:
            for st, st_ref in zip(stats, [ref.heads[i], ref.neurons[i], *ref.norms[i]]):
                assert torch.equal(st.result(), st_ref.result()), st.label
            assert torch.equal(col._cos_acc[i], ref._cos_acc[i])


def test_block_cosine_sees_the_layer_input_after_accelerate_moved_it(tiny_builders, monkeypatch):
    """The layer's input is read where the layer reads it: on the layer's device, after
    accelerate's hook moved it (a pre-hook on the layer saw it on the previous layer's device)."""
    model = _model(tiny_builders, "llama")
    ids, _ = _data(model.config.vocab_size)
    L = _last_layer_on_meta(model)
    seen = []
    monkeypatch.setattr(ops, "block_cosine", lambda x, y, mask, out, **kw: seen.append((x.device, y.device, out.device)))
    with ImportanceCollector(model, impl="torch", check_finite=False) as col:
        col.step(ids)  # no padding mask
    assert seen == [(CPU, CPU, CPU)] * (L - 1) + [(META, META, META)]


def test_moe_router_and_shared_expert_statistics_on_their_device():
    """A MoE layer computing on another device than the input's: the router's probability mass
    and the shared expert's neurons combine the mask copied to that device, into sums made there."""
    model = build_moe("qwen2_moe")  # layer 0: experts + shared expert
    moe = get_view(model).layers[0].moe
    B, T, H = 2, 5, model.config.hidden_size
    mask = torch.ones(B, T)
    mask[0, :2] = 0
    with ImportanceCollector(model, impl="torch") as col:
        col._B = B  # a batch begun with the sums and the mask on the input device (the CPU)
        for st in col._all_stats():
            st.begin(B, CPU)
        col._mask = mask
        moe.router.to(META)
        moe.shared_down.to(META)
        moe.router(torch.randn(B * T, H, device=META))
        moe.shared_down(torch.randn(B * T, moe.shared_down.in_features, device=META))
        assert col.moe[0].mass_sum.device == META and col.moe[0].tokens.device == META
        assert col.shared[0].device == META
        assert col._masks[META].device == META and torch.equal(col._mask_on(CPU), mask)
        col._mask = None


def test_module_device_and_the_forward_slot():
    """The helpers the placement rests on: the device a module computes on (accelerate's
    execution device over offloaded meta weights), and where a patch goes (``_old_forward``
    under accelerate's hook, ``forward`` otherwise), undone exactly."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    lin = torch.nn.Linear(3, 2)
    assert collect_mod.module_device(lin) == CPU and collect_mod.module_device(torch.nn.ReLU()) == CPU
    assert collect_mod.module_device(torch.nn.Linear(3, 2, device=META)) == META
    restore = collect_mod._swap_forward(lin, lambda inner: lambda x: inner(x) * 2)
    assert "forward" in vars(lin)
    restore()
    assert "forward" not in vars(lin)

    hooked = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    want = hooked(x)
    weights = {k: v.clone() for k, v in hooked.state_dict().items()}
    add_hook_to_module(hooked, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=weights))
    assert hooked.weight.device == META  # offloaded: loaded around each forward
    assert collect_mod.accelerate_hooked(hooked) and collect_mod.module_device(hooked) == CPU
    wrapper, inner = vars(hooked)["forward"], vars(hooked)["_old_forward"]
    got = []
    restore = collect_mod._swap_forward(hooked, lambda inner: got.append(inner) or (lambda x: inner(x) * 2))
    assert got == [inner] and vars(hooked)["forward"] is wrapper and vars(hooked)["_old_forward"] is not inner
    assert torch.equal(hooked(x), want * 2)  # inside the hook: the weights were loaded
    restore()
    assert vars(hooked)["forward"] is wrapper and vars(hooked)["_old_forward"] is inner
    assert torch.equal(hooked(x), want) and hooked.weight.device == META
