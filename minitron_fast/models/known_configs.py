"""Published configs (the hub's ``config.json`` values) of the models the shipped recipes name,
so that every shipped recipe can be planned and checked without a checkpoint here (no hub
access): ``distill.memory`` plans from them and ``pipeline.check`` checks against them. Family
attribute names live in ``models/`` only, so these facts do too."""
from __future__ import annotations

from typing import Any

# Published configs (the hub's config.json values) of the shipped recipes' models, so that every
# shipped recipe plans without a checkpoint here (no hub access). ``dtype`` is the checkpoint's
# (what an in-memory prune with no ``dtype`` loads); the parameter counts the plan computes are the
# published ones: Llama-3.1-8B 8.03B, Minitron-4B-Width 4.51B, Mistral-NeMo 12.25B, Mixtral-8x7B
# 46.70B (8 experts, top-2), Qwen3-8B 8.19B, Gemma-2-9B 9.24B, SmolLM2-135M 134.5M
# (tests/distill/test_recipes_fit.py).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                                    max_position_embeddings=131072, dtype="bfloat16"),
    "nvidia/Llama-3.1-Minitron-4B-Width-Base": dict(model_type="llama", hidden_size=3072, intermediate_size=9216,
                                                    num_hidden_layers=32, num_attention_heads=32,
                                                    num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                                    tie_word_embeddings=False, max_position_embeddings=131072,
                                                    dtype="bfloat16"),
    "mistralai/Mistral-Nemo-Base-2407": dict(model_type="mistral", hidden_size=5120, intermediate_size=14336,
                                             num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                                             head_dim=128, vocab_size=131072, tie_word_embeddings=False,
                                             max_position_embeddings=1024000, dtype="bfloat16"),
    "mistralai/Mixtral-8x7B-v0.1": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                        head_dim=128, vocab_size=32000, tie_word_embeddings=False,
                                        max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
                                        sliding_window=None, rope_theta=1e6, dtype="bfloat16"),
    "Qwen/Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          tie_word_embeddings=False, max_position_embeddings=40960, use_sliding_window=False,
                          sliding_window=None, max_window_layers=36, rope_theta=1e6, dtype="bfloat16"),
    "google/gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                              tie_word_embeddings=True, max_position_embeddings=8192, query_pre_attn_scalar=256,
                              sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                              hidden_activation="gelu_pytorch_tanh", dtype="float32"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                                head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                                                max_position_embeddings=8192, rope_theta=1e5, dtype="bfloat16"),
}
# ``demo`` (the embedded teacher, models/embedded.py) is SmolLM2-135M-Instruct converted to fp32: the
# plan takes its shape from here, so planning the demo never converts the embedded model (a minute).
DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
