"""The prune stage's entry point: a checkpoint, its importance scores and a :class:`PruneConfig`
in; the plan JSON and the pruned checkpoint out."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from minitron_fast.artifacts.plan import Plan, validate_plan
from minitron_fast.prune.config import PruneConfig


def plan_for(model: str | os.PathLike, scores: Any, config: PruneConfig) -> Plan:
    """The plan of ``config.target`` for ``model`` (a checkpoint directory or ``demo``) from ``scores``."""
    from minitron_fast.errors import MinitronError
    from minitron_fast.models.loading import load_config
    from minitron_fast.prune.plan import make_plan

    if not config.target:
        raise MinitronError("the prune stage has no target: set target (e.g. hidden=3072,ffn=9216 or layers=16)")
    return make_plan(load_config(model), scores, config.target, depth_metric=config.depth_metric,
                     depth_mode=config.depth_mode, budget_axes=config.budget_axes)


def run_prune(model: str | os.PathLike, scores: Any, out: str | os.PathLike, config: PruneConfig, *,
              plan: Plan | None = None, overwrite: bool = False, progress: bool = True) -> tuple[Plan, Path]:
    """Prunes ``model`` to ``config.target`` (or to a given ``plan``) and writes the checkpoint to
    ``out`` (``config.streaming``: from the shards; else in memory on ``config.device``). Returns
    the plan and the output directory.

    Example:
        >>> plan, path = run_prune("demo", "scores.safetensors", "runs/pruned", PruneConfig(target="ffn=768"))
    """
    from minitron_fast.models.loading import load_config
    from minitron_fast.prune.streaming import prune_checkpoint

    cfg = config.validate()
    load_kw = None if cfg.streaming else cfg.load_kwargs()  # cuda without CUDA fails before loading
    cfg.check_impl(load_kw["device"] if load_kw else "cpu")
    if plan is None:
        plan = plan_for(model, scores, cfg)
    else:
        validate_plan(plan, load_config(model))
    path = prune_checkpoint(model, plan, out, streaming=cfg.streaming, overwrite=overwrite,
                            scores_file=scores if isinstance(scores, (str, os.PathLike)) else None, impl=cfg.impl,
                            progress=progress, load_kwargs=load_kw)
    return plan, path


__all__ = ["plan_for", "run_prune"]
