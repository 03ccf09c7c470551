"""minitron_fast.search: candidate student shapes at a parameter budget, each pruned, briefly
retrained by KD and ranked by held-out LM loss.

- :class:`SearchConfig`: the stage's options (recipe section, CLI flags, entry point argument).
- ``enumerate_candidates(config, budget, ...)``: pure arithmetic over geometries (no weights).
- ``run_search(model, scores, config, ...)``: prune + retrain + rank; writes the winner's plan.

Names are imported on first use (the CLI reads ``SearchConfig`` without importing torch).
"""
from minitron_fast._lazy import lazy_getattr

_EXPORTS = {
    "SearchConfig": "minitron_fast.search.config", "KINDS": "minitron_fast.search.config",
    "Candidate": "minitron_fast.search.candidates", "SearchError": "minitron_fast.search.candidates",
    "enumerate_candidates": "minitron_fast.search.candidates", "format_candidates": "minitron_fast.search.candidates",
    "run_search": "minitron_fast.search.run", "retrain": "minitron_fast.search.run",
    "teacher_targets": "minitron_fast.search.run",
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
