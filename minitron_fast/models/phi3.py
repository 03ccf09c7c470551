"""Phi-3 / Phi-3.5 / Phi-4-mini (``Phi3ForCausalLM``): fused ``qkv_proj`` (rows ``[q | k | v]``)
and ``gate_up_proj`` (rows ``[gate | up]``), activation in ``mlp.activation_fn``, no biases.
``Phi3Config`` has no ``head_dim`` field; the pruned config writes one (the attention reads it
with ``getattr``). Longrope checkpoints (128k) validate their factor lists against
``hidden_size // num_attention_heads``, so there hidden and heads must shrink together."""
from typing import Any

from torch import nn

from minitron_fast.models.base import LayerView, ModelView


class Phi3View(ModelView):
    family = "phi3"
    hf_classes = ("Phi3ForCausalLM",)
    model_types = ("phi3",)

    def layer_view(self, i: int, layer: nn.Module) -> LayerView:
        a, m = layer.self_attn, layer.mlp
        return LayerView(index=i, module=layer, attn=a, mlp=m, qkv_proj=a.qkv_proj, o_proj=a.o_proj,
                         gate_up_proj=m.gate_up_proj, down_proj=m.down_proj, act_fn=m.activation_fn,
                         input_norm=layer.input_layernorm, post_attn_norm=layer.post_attention_layernorm)

    @classmethod
    def biases_of(cls, config: Any) -> dict[str, bool]:
        return {"qkv": False, "o": False, "mlp": False}
