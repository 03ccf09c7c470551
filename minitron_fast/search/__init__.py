"""minitron_fast.search: candidate student shapes at a parameter budget, each pruned, briefly
retrained by KD and ranked by held-out LM loss.

- ``enumerate_candidates(config, budget, ...)``: pure arithmetic over geometries (no weights).
- ``run_search(model, scores, budget, ...)``: prune + retrain + rank; writes the winner's plan.
"""
from minitron_fast.search.candidates import KINDS, Candidate, SearchError, enumerate_candidates, format_candidates

__all__ = ["KINDS", "Candidate", "SearchError", "enumerate_candidates", "format_candidates", "run_search"]


def __getattr__(name: str):
    if name in ("run_search", "retrain", "teacher_targets"):
        from minitron_fast.search import run

        return getattr(run, name)
    raise AttributeError(f"module 'minitron_fast.search' has no attribute {name!r}")
