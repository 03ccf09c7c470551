"""minitron_fast: Minitron structured pruning and knowledge distillation for Hugging Face LLMs.

Public API (imported lazily, so ``import minitron_fast`` stays light and has no side effects
beyond a one-line warning when the optional ``_C`` extension is missing):

- ``get_view(model)``: the uniform ``ModelView`` over a supported HF causal LM.
- ``load_model(path_or_"demo")``, ``load_tokenizer(...)``: loaders (``"demo"`` is the embedded
  SmolLM2-135M teacher).
"""
from __future__ import annotations

import importlib
from typing import Any

from minitron_fast._ext import HAS_C  # noqa: F401  (warns once when _C is missing)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "get_view": "minitron_fast.models",
    "ModelView": "minitron_fast.models",
    "Geometry": "minitron_fast.models",
    "load_model": "minitron_fast.models.loading",
    "load_tokenizer": "minitron_fast.models.loading",
    "token_blocks": "minitron_fast.data",
    "perplexity": "minitron_fast.evaluate.perplexity",
    "compact_": "minitron_fast.ops.compact",
    "compact_2d_": "minitron_fast.ops.compact",
    "make_plan": "minitron_fast.prune",
    "apply_plan": "minitron_fast.prune",
    "prune_checkpoint": "minitron_fast.prune",
    "Plan": "minitron_fast.prune",
    "resolve_budget": "minitron_fast.prune",
    "export_hf": "minitron_fast.models.export",
    "compute_importance": "minitron_fast.importance",
    "load_scores": "minitron_fast.importance",
    "save_scores": "minitron_fast.importance",
    "fused_linear_kd_loss": "minitron_fast.ops.kd_loss",
    "fused_linear_cross_entropy": "minitron_fast.ops.kd_loss",
    "kd_loss_from_logits": "minitron_fast.ops.kd_loss",
    "FusedLinearKDLoss": "minitron_fast.losses",
    "FusedLinearCrossEntropyLoss": "minitron_fast.losses",
    "KDTrainer": "minitron_fast.integrations.hf_trainer",
    "causal_lm_kd_loss": "minitron_fast.integrations.hf_trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minitron_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = sorted(_LAZY) + ["HAS_C", "__version__"]
