"""Llama 2 / 3 / 3.1 / 3.2 (``LlamaForCausalLM``): optional attention and MLP biases, rope
scaling, tied (3.2 1B/3B) or untied embeddings. SmolLM2 is a Llama."""
from minitron_fast.models.base import ModelView


class LlamaView(ModelView):
    family = "llama"
    hf_classes = ("LlamaForCausalLM",)
    model_types = ("llama",)
