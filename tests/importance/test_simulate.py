"""Pruning simulated by zeroing equals real surgery (the structural truth the quality bench uses)."""
import copy

import pytest
import torch

from minitron_fast.importance.simulate import (heads_within_groups, magnitude_scores, top_k, zero_channels, zero_heads,
                                               zero_neurons)
from minitron_fast.models import get_view


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _surgery(model, keep_heads, keep_neurons, keep_channels):
    """Builds the smaller model by slicing weights (independent of the zeroing code)."""
    view = get_view(model)
    g = view.geometry()
    hd = g.head_dim
    nh2 = len(keep_heads[0])
    new_g = g.replace(hidden_size=len(keep_channels), intermediate_size=len(keep_neurons[0]), num_attention_heads=nh2)
    cfg = view.config_for(model.config, new_g)
    small = type(model)(cfg).eval()
    sv = get_view(small)
    c = torch.tensor(keep_channels)
    sv.embed_tokens.weight.copy_(view.embed_tokens.weight[:, c])
    if not view.tied:
        sv.lm_head.weight.copy_(view.lm_head.weight[:, c])
    sv.final_norm.weight.copy_(view.final_norm.weight[c])
    for lv, sl, kh, kn in zip(view.layers, sv.layers, keep_heads, keep_neurons):
        rows = torch.tensor([h * hd + d for h in kh for d in range(hd)])
        (q, k, v), (sq, sk, sv_) = lv.qkv_weights(), sl.qkv_weights()  # views into a fused qkv_proj too
        sq.copy_(q[rows][:, c])
        sk.copy_(k[:, c])
        sv_.copy_(v[:, c])
        if lv.q_proj is not None and lv.q_proj.bias is not None:
            sl.q_proj.bias.copy_(lv.q_proj.bias[rows])
        for n in ("k_proj", "v_proj"):
            if getattr(lv, n) is not None and getattr(lv, n).bias is not None:
                getattr(sl, n).bias.copy_(getattr(lv, n).bias)
        sl.o_proj.weight.copy_(lv.o_proj.weight[c][:, rows])
        n_ = torch.tensor(kn)
        for w, sw in zip(lv.gate_up_weights(), sl.gate_up_weights()):
            sw.copy_(w[n_][:, c])
        sl.down_proj.weight.copy_(lv.down_proj.weight[c][:, n_])
        for nm, snm in zip(lv.hidden_norms(), sl.hidden_norms()):
            snm.weight.copy_(nm.weight[c])
        for nm, snm in zip(lv.head_norms, sl.head_norms):
            snm.weight.copy_(nm.weight)
    scale = view.embed_scale_of(model.config) / sv.embed_scale_of(cfg)
    if scale != 1.0:  # Gemma: embedding * sqrt(H') == original kept channels * sqrt(H)
        sv.embed_tokens.weight.mul_(scale)
        if sv.tied:  # the lm_head is the rescaled embedding: the final norm gives the factor back
            off = sv.norm_weight_offset
            sv.final_norm.weight.copy_((sv.final_norm.weight + off) / scale - off)
    return small


def test_zeroing_equals_surgery(tiny_model):
    view = get_view(tiny_model)
    g = view.geometry()
    torch.manual_seed(1)
    per_group = g.num_attention_heads // g.num_key_value_heads - 1
    keep_heads = [heads_within_groups(torch.rand(g.num_attention_heads), g.num_key_value_heads, per_group)
                  for _ in range(g.num_hidden_layers)]
    keep_neurons = [top_k(torch.rand(g.intermediate_size), g.intermediate_size * 2 // 3) for _ in range(g.num_hidden_layers)]
    keep_channels = top_k(torch.rand(g.hidden_size), g.hidden_size * 3 // 4)
    small = _surgery(tiny_model, keep_heads, keep_neurons, keep_channels)
    sim = copy.deepcopy(tiny_model)
    zero_heads(sim, keep_heads)
    zero_neurons(sim, keep_neurons)
    zero_channels(sim, keep_channels)
    ids = torch.randint(0, g.vocab_size, (2, 9))
    with torch.no_grad():
        want = small(input_ids=ids, use_cache=False).logits
        got = sim(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_magnitude_scores_shapes_and_selection():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    s = magnitude_scores(m)
    assert s["heads"][0].shape == (4,) and s["neurons"][1].shape == (24,) and s["channels"].shape == (16,)
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[:, 5] *= 100
    assert int(magnitude_scores(m)["neurons"][0].argmax()) == 5
    assert heads_within_groups(torch.tensor([0.1, 0.9, 0.5, 0.2]), 2, 1) == [1, 2]
