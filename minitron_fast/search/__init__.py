"""minitron_fast.search: candidate student shapes at a parameter budget, each pruned, briefly
retrained by KD and ranked by held-out LM loss.

- :class:`SearchConfig`: the stage's options (recipe section, CLI flags, entry point argument).
- ``enumerate_candidates(config, budget, ...)``: pure arithmetic over geometries (no weights).
- ``run_search(model, scores, config, ...)``: prune + retrain + rank; writes the winner's plan.

Names are imported on first use (the CLI reads ``SearchConfig`` without importing torch).
"""
from minitron_fast._lazy import exported_names, lazy_getattr

_EXPORTS = {
    "minitron_fast.search.config": ("KINDS", "SearchConfig", "SearchError"),
    "minitron_fast.search.candidates": ("Candidate", "enumerate_candidates", "format_candidates"),
    "minitron_fast.search.run": ("retrain", "run_search", "teacher_targets"),
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = exported_names(_EXPORTS)
