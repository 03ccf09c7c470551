"""minitron_fast.distill: logit distillation and teacher correction on DeepSpeed ZeRO.

- ``load_config(path, overrides)`` -> ``DistillConfig`` (YAML recipe + ``key=value`` overrides)
- ``train(cfg, resume=False)``: runs one rank of the job (or a world of one)
- ``python -m minitron_fast.distill --config recipe.yaml [--resume] [key=value ...]``, also under
  ``deepspeed --num_gpus N --module minitron_fast.distill ...``

Heavy imports (deepspeed, transformers) happen only when ``train`` runs.
"""
from __future__ import annotations

from typing import Any

from minitron_fast.distill.config import ConfigError, DistillConfig, load_config, parse_overrides

__all__ = ["ConfigError", "DistillConfig", "load_config", "parse_overrides", "train", "read_metrics", "plot_metrics"]


def __getattr__(name: str) -> Any:
    if name in ("train", "read_metrics", "plot_metrics", "Trainer", "NaNLossError", "ResumeError"):
        from minitron_fast.distill import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'minitron_fast.distill' has no attribute {name!r}")
