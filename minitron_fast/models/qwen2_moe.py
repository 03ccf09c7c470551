"""Qwen1.5-MoE / Qwen2-MoE (``Qwen2MoeForCausalLM``): q/k/v biases, a shared expert with a
sigmoid gate beside the routed experts, ``norm_topk_prob`` (default off: the top-k weights are
raw softmax probabilities), and dense layers among MoE layers (``mlp_only_layers``,
``decoder_sparse_step``)."""
from typing import Any

from minitron_fast.models.moe import MoEModelView


class Qwen2MoeView(MoEModelView):
    family = "qwen2_moe"
    hf_classes = ("Qwen2MoeForCausalLM",)
    model_types = ("qwen2_moe",)
    has_shared_expert = True

    @classmethod
    def biases_of(cls, config: Any) -> dict[str, bool]:
        qkv = bool(getattr(config, "qkv_bias", True))
        return {"qkv": qkv, "o": False, "mlp": False}
