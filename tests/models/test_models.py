"""Model adapters: geometry, projections and parameter counts equal what transformers reports."""
from __future__ import annotations

import pytest
import torch

from minitron_fast.errors import UnsupportedModelError
from minitron_fast.models import SUPPORTED, get_view, view_class_for_config
from minitron_fast.models.loading import meta_model


def _numel_unique(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already yields tied weights once


def test_geometry_matches_config(tiny_model):
    view = get_view(tiny_model)
    cfg = tiny_model.config
    g = view.geometry()
    assert g.hidden_size == cfg.hidden_size
    assert g.intermediate_size == cfg.intermediate_size
    assert g.num_attention_heads == cfg.num_attention_heads
    assert g.num_key_value_heads == cfg.num_key_value_heads
    assert g.num_hidden_layers == cfg.num_hidden_layers == len(view.layers)
    assert g.vocab_size == cfg.vocab_size
    # head_dim as the attention module itself uses it
    assert g.head_dim == view.layers[0].attn.head_dim


def test_projection_shapes(tiny_model):
    view = get_view(tiny_model)
    g = view.geometry()
    H, F, nq, nkv, hd = g.hidden_size, g.intermediate_size, g.num_attention_heads, g.num_key_value_heads, g.head_dim
    for lv in view.layers:
        q, k, v = lv.qkv_weights()  # views of a fused qkv_proj where the family fuses them
        assert q.shape == (nq * hd, H)
        assert k.shape == (nkv * hd, H)
        assert v.shape == (nkv * hd, H)
        assert lv.o_proj.weight.shape == (H, nq * hd)
        gate, up = lv.gate_up_weights()
        assert gate.shape == (F, H)
        assert up.shape == (F, H)
        assert lv.down_proj.weight.shape == (H, F)
        assert all(n.weight.shape == (H,) for n in lv.hidden_norms())
        assert all(n.weight.shape == (hd,) for n in lv.head_norms)
    assert view.embed_tokens.weight.shape == (g.vocab_size, H)
    assert view.lm_head.weight.shape == (g.vocab_size, H)
    assert view.final_norm.weight.shape == (H,)


def test_param_counts_equal_transformers(tiny_model):
    view = get_view(tiny_model)
    live = view.param_counts()
    assert live["total"] == _numel_unique(tiny_model) == tiny_model.num_parameters()
    analytic = view.count_params(tiny_model.config)
    assert analytic == live


def test_family_specifics(tiny_builders):
    qwen = get_view(tiny_builders["qwen2_bias"]())
    assert qwen.family == "qwen2" and qwen.tied
    assert all(lv.q_proj.bias is not None and lv.k_proj.bias is not None and lv.v_proj.bias is not None for lv in qwen.layers)
    assert all(lv.o_proj.bias is None and lv.down_proj.bias is None for lv in qwen.layers)

    nemo = get_view(tiny_builders["mistral_nemo_like"]())
    assert nemo.family == "mistral"
    assert nemo.head_dim == 24 != nemo.hidden_size // nemo.num_heads

    llama = get_view(tiny_builders["llama"]())
    assert llama.family == "llama" and not llama.tied
    assert get_view(tiny_builders["llama_tied"]()).tied


def test_llama_bias_flags_counted(tiny_builders):
    m = tiny_builders["llama"](attention_bias=True, mlp_bias=True)
    view = get_view(m)
    assert view.layers[0].o_proj.bias is not None and view.layers[0].down_proj.bias is not None
    assert view.count_params(m.config) == view.param_counts()


def test_config_for_describes_new_geometry(tiny_builders):
    from transformers import AutoModelForCausalLM

    m = tiny_builders["llama"]()
    view = get_view(m)
    g = view.geometry().replace(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                                num_hidden_layers=2)
    new = AutoModelForCausalLM.from_config(view.config_for(m.config, g))
    nv = get_view(new)
    assert nv.geometry() == g
    assert nv.head_dim == view.head_dim  # kept explicitly although hidden / heads changed
    assert nv.param_counts()["total"] == view.count_params(m.config, g)["total"]
    with pytest.raises(ValueError, match="unknown geometry keys"):
        g.replace(hiden_size=1)


@pytest.mark.parametrize(
    "name,cfg,expected_total",
    [
        # Published parameter counts of the real checkpoints, as reported by transformers.
        ("llama-3.1-8b", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False), 8_030_261_248),
        ("llama-3.2-1b", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
         1_235_814_400),
    ],
    ids=["llama-3.1-8b", "llama-3.2-1b"],
)
def test_real_configs_on_meta_device(name, cfg, expected_total):
    from transformers import LlamaConfig

    config = LlamaConfig(**cfg)
    view = get_view(meta_model(config))
    assert view.param_counts()["total"] == expected_total
    assert view.count_params(config)["total"] == expected_total


def test_mistral_nemo_config_on_meta_device():
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    view = get_view(meta_model(config))
    assert view.head_dim == 128
    assert view.layers[0].q_proj.weight.shape == (4096, 5120)
    assert view.param_counts() == view.count_params(config)


def test_unsupported_family_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError) as exc:
        get_view(m)
    msg = str(exc.value)
    assert "gpt2" in msg.lower() and "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg
    with pytest.raises(UnsupportedModelError):
        view_class_for_config(m.config)
    assert "MistralForCausalLM" in SUPPORTED


def test_base_model_without_lm_head_is_refused(tiny_builders):
    m = tiny_builders["llama"]()
    with pytest.raises(UnsupportedModelError, match="AutoModelForCausalLM"):
        get_view(m.model)
