"""Qwen3 (``Qwen3ForCausalLM``): Llama's layout plus per-head RMSNorms on queries and keys
(``q_norm``/``k_norm``, weight ``[head_dim]``, shared by every head: head pruning leaves them
whole), explicit ``head_dim`` (128 at 8B: 4096 / 32 heads), optional sliding-window layers above
``max_window_layers`` (``layer_types``), no biases by default (``attention_bias``)."""
from torch import nn

from minitron_fast.models.base import LayerView, ModelView


class Qwen3View(ModelView):
    family = "qwen3"
    hf_classes = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    head_norms_per_layer = 2

    def layer_view(self, i: int, layer: nn.Module) -> LayerView:
        lv = super().layer_view(i, layer)
        lv.head_norms = (layer.self_attn.q_norm, layer.self_attn.k_norm)
        return lv
