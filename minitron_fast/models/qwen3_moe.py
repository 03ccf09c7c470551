"""Qwen3-MoE (``Qwen3MoeForCausalLM``): per-head ``q_norm`` / ``k_norm``, no biases, no shared
expert, ``norm_topk_prob``, dense layers among MoE layers (``mlp_only_layers``,
``decoder_sparse_step``)."""
from typing import Any

from minitron_fast.models.moe import MoEModelView


class Qwen3MoeView(MoEModelView):
    family = "qwen3_moe"
    hf_classes = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    head_norms_per_layer = 2  # q_norm, k_norm

    @classmethod
    def biases_of(cls, config: Any) -> dict[str, bool]:
        b = bool(getattr(config, "attention_bias", False))
        return {"qkv": b, "o": b, "mlp": False}

