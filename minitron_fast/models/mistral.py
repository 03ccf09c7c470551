"""Mistral and Mistral-NeMo (``MistralForCausalLM``). NeMo sets ``head_dim`` (128) apart from
hidden_size / num_heads (5120 / 32 = 160), which the base view reads from the config."""
from typing import Any

from minitron_fast.models.base import ModelView


class MistralView(ModelView):
    family = "mistral"
    hf_classes = ("MistralForCausalLM",)
    model_types = ("mistral",)

    @classmethod
    def biases_of(cls, config: Any) -> dict[str, bool]:
        return {"qkv": False, "o": False, "mlp": False}
