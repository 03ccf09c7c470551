"""Model adapters: one ``ModelView`` subclass per supported HF family.

Nothing outside this package touches family-specific attribute names.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from minitron_fast.errors import UnsupportedModelError
from minitron_fast.models.base import AXES, Geometry, LayerView, ModelView, info_record
from minitron_fast.models.gemma2 import Gemma2View
from minitron_fast.models.gemma3 import Gemma3View
from minitron_fast.models.llama import LlamaView
from minitron_fast.models.mistral import MistralView
from minitron_fast.models.mixtral import MixtralView
from minitron_fast.models.phi3 import Phi3View
from minitron_fast.models.qwen2 import Qwen2View
from minitron_fast.models.qwen2_moe import Qwen2MoeView
from minitron_fast.models.qwen3 import Qwen3View
from minitron_fast.models.qwen3_moe import Qwen3MoeView

VIEWS: tuple[type[ModelView], ...] = (LlamaView, MistralView, Qwen2View, Qwen3View, Gemma2View, Gemma3View, Phi3View,
                                      MixtralView, Qwen2MoeView, Qwen3MoeView)
SUPPORTED = ", ".join(c for v in VIEWS for c in v.hf_classes)


def view_class_for_config(config: Any) -> type[ModelView]:
    """The adapter class for an HF config; raises UnsupportedModelError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    for v in VIEWS:
        if model_type in v.model_types:
            return v
    got = archs[0] if archs else type(config).__name__
    raise UnsupportedModelError(
        f"unsupported model family {got!r} (model_type {model_type!r}); minitron_fast supports {SUPPORTED}"
    )


def get_view(model: nn.Module) -> ModelView:
    """Wraps a loaded HF causal LM in its family's ``ModelView``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> view = get_view(LlamaForCausalLM(LlamaConfig(hidden_size=64, ...)))
    """
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no HF config; minitron_fast supports {SUPPORTED}")
    cls = view_class_for_config(config)
    if type(model).__name__ not in cls.hf_classes:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a causal LM with an lm_head; load it with "
            f"AutoModelForCausalLM (minitron_fast supports {SUPPORTED})"
        )
    return cls(model)


__all__ = ["AXES", "Geometry", "LayerView", "ModelView", "get_view", "view_class_for_config", "info_record",
           "SUPPORTED", "VIEWS"]
