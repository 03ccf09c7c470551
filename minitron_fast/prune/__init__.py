"""minitron_fast.prune: structured width and depth pruning to a target shape.

- :class:`PruneConfig`: the stage's options (recipe section, CLI flags, entry point argument).
- ``parse_target`` / ``target_geometry`` / ``resolve_budget``: targets and parameter budgets
  (from ``minitron_fast.artifacts.targets``, the one grammar).
- ``make_plan(model_or_config, scores, target) -> Plan``: kept indices from importance scores;
  ``Plan.save/load`` (JSON) and ``validate_plan`` (from ``minitron_fast.artifacts.plan``).
- ``apply_plan(model, plan)``: in-place surgery through the ``ModelView`` (C++ compaction).
- ``prune_checkpoint(src_dir, plan, out_dir, streaming=True)``: checkpoint to checkpoint.
- ``run_prune(model, scores, out, config)``: the stage's entry point (plan + checkpoint).

Names are imported on first use (the CLI reads ``PruneConfig`` without importing torch).
"""
from minitron_fast._lazy import lazy_getattr

_EXPORTS = {
    "PruneConfig": "minitron_fast.prune.config", "run_prune": "minitron_fast.prune.api",
    "plan_for": "minitron_fast.prune.api",
    "Plan": "minitron_fast.artifacts.plan", "PlanError": "minitron_fast.artifacts.plan",
    "validate_plan": "minitron_fast.artifacts.plan",
    "TargetError": "minitron_fast.artifacts.targets", "parse_target": "minitron_fast.artifacts.targets",
    "resolve_budget": "minitron_fast.artifacts.targets", "target_geometry": "minitron_fast.artifacts.targets",
    "identity_plan": "minitron_fast.prune.plan", "make_plan": "minitron_fast.prune.plan",
    "CheckpointError": "minitron_fast.prune.streaming", "prune_checkpoint": "minitron_fast.prune.streaming",
    "apply_plan": "minitron_fast.prune.surgery", "pruned_config": "minitron_fast.prune.surgery",
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
