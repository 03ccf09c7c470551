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
from minitron_fast._lazy import exported_names, lazy_getattr

_EXPORTS = {
    "minitron_fast.prune.config": ("PruneConfig",),
    "minitron_fast.prune.api": ("run_prune", "plan_for"),
    "minitron_fast.artifacts.plan": ("Plan", "PlanError", "validate_plan"),
    "minitron_fast.artifacts.targets": ("TargetError", "parse_target", "resolve_budget", "target_geometry"),
    "minitron_fast.prune.plan": ("identity_plan", "make_plan"),
    "minitron_fast.prune.streaming": ("CheckpointError", "prune_checkpoint"),
    "minitron_fast.prune.surgery": ("apply_plan", "pruned_config"),
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = exported_names(_EXPORTS)
