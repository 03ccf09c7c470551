"""Gemma 3 text (``Gemma3ForCausalLM``, ``model_type: gemma3_text``): Gemma 2's layout (four
``(1 + w)`` norms per layer, ``sqrt(hidden)`` embedding scale, ``query_pre_attn_scalar``) plus
per-head ``q_norm``/``k_norm`` (``[head_dim]``, shared by every head), five sliding layers per
global one (``layer_types``, each type with its own RoPE), no attention softcap (the config field
exists and is ``None``). Runs SDPA."""
from torch import nn

from minitron_fast.models.base import LayerView
from minitron_fast.models.gemma2 import Gemma2View


class Gemma3View(Gemma2View):
    family = "gemma3"
    hf_classes = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    head_norms_per_layer = 2
    default_attn_implementation = "sdpa"

    def layer_view(self, i: int, layer: nn.Module) -> LayerView:
        lv = super().layer_view(i, layer)
        lv.head_norms = (layer.self_attn.q_norm, layer.self_attn.k_norm)
        return lv
