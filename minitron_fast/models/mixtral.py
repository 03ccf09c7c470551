"""Mixtral (``MixtralForCausalLM``): every layer is a MoE layer, each expert's width is the
config's ``intermediate_size`` (there is no dense FFN), the router renormalises its top-k
probabilities, and ``save_pretrained`` writes ``block_sparse_moe.experts.{e}.w1/w2/w3``."""
from typing import Any

from minitron_fast.models.base import Geometry
from minitron_fast.models.moe import MoEModelView


class MixtralView(MoEModelView):
    family = "mixtral"
    hf_classes = ("MixtralForCausalLM",)
    model_types = ("mixtral",)
    expert_ffn_key = "intermediate_size"
    saved_moe_prefix = "block_sparse_moe"
    saved_expert_names = {"gate": "w1.weight", "up": "w3.weight", "down": "w2.weight"}

    @classmethod
    def biases_of(cls, config: Any) -> dict[str, bool]:
        return {"qkv": False, "o": False, "mlp": False}

    @classmethod
    def normalize_geometry(cls, config: Any, g: Geometry) -> Geometry:
        # one config field: an `ffn=` or an `expert_ffn=` change moves both geometry fields
        f = g.moe_intermediate_size if g.moe_intermediate_size != config.intermediate_size else g.intermediate_size
        return super().normalize_geometry(config, g.replace(intermediate_size=f, moe_intermediate_size=f))
