"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): biases on q/k/v, none on o_proj or the MLP."""
from typing import Any

from minitron_fast.models.base import ModelView


class Qwen2View(ModelView):
    family = "qwen2"
    hf_classes = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)

    @classmethod
    def biases_of(cls, config: Any) -> dict[str, bool]:
        return {"qkv": True, "o": False, "mlp": False}
