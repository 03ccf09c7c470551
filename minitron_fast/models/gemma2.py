"""Gemma 2 (``Gemma2ForCausalLM``): RMSNorm ``x * rstd * (1 + w)`` computed in fp32; four
``[hidden]`` norms per layer (``input_layernorm`` before attention, ``post_attention_layernorm``
on the attention output, ``pre_feedforward_layernorm`` before the MLP,
``post_feedforward_layernorm`` on its output); the embedding times ``sqrt(hidden_size)`` (a
buffer set from the config); attention and final-logit softcapping; alternating sliding and
global layers (``layer_types``); ``query_pre_attn_scalar`` for the attention scale; GELU-tanh
gated MLP; tied embeddings. Softcapped attention runs ``eager`` (SDPA cannot softcap)."""
from typing import Any

from torch import nn

from minitron_fast.models.base import LayerView, ModelView


class Gemma2View(ModelView):
    family = "gemma2"
    hf_classes = ("Gemma2ForCausalLM",)
    model_types = ("gemma2",)
    norm_weight_offset = 1.0
    hidden_norms_per_layer = 4
    default_attn_implementation = "eager"

    def layer_view(self, i: int, layer: nn.Module) -> LayerView:
        lv = super().layer_view(i, layer)
        lv.post_attn_norm = layer.pre_feedforward_layernorm
        lv.extra_norms = (layer.post_attention_layernorm, layer.post_feedforward_layernorm)
        return lv

    @classmethod
    def embed_scale_of(cls, config: Any, hidden_size: int | None = None) -> float:
        return float(hidden_size or config.hidden_size) ** 0.5

    def sync_modules_(self) -> None:
        super().sync_modules_()
        emb = self.embed_tokens  # the scaled embedding caches sqrt(hidden) as a buffer
        emb.scalar_embed_scale = self.embed_scale_of(self.config)
        emb.embed_scale.fill_(emb.scalar_embed_scale)
