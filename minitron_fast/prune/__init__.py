"""minitron_fast.prune: structured width and depth pruning to a target shape.

- ``parse_target`` / ``target_geometry`` / ``resolve_budget``: targets and parameter budgets.
- ``make_plan(model_or_config, scores, target) -> Plan``: kept indices from importance scores;
  ``Plan.save/load`` (JSON) and ``validate_plan``.
- ``apply_plan(model, plan)``: in-place surgery through the ``ModelView`` (C++ compaction).
- ``prune_checkpoint(src_dir, plan, out_dir, streaming=True)``: checkpoint to checkpoint.
"""
from minitron_fast.prune.plan import Plan, PlanError, identity_plan, load_scores, make_plan, validate_plan
from minitron_fast.prune.streaming import CheckpointError, prune_checkpoint
from minitron_fast.prune.surgery import apply_plan, pruned_config
from minitron_fast.prune.targets import TargetError, parse_target, resolve_budget, target_geometry

__all__ = ["Plan", "PlanError", "TargetError", "CheckpointError", "make_plan", "validate_plan", "identity_plan",
           "load_scores", "apply_plan", "pruned_config", "prune_checkpoint", "parse_target", "resolve_budget",
           "target_geometry"]
