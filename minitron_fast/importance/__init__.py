"""minitron_fast.importance: activation-based importance (heads, KV groups, MLP neurons, embedding
channels, layers) from forward passes only, and the scores file the pruning stage reads.

- :class:`ImportanceConfig`: the stage's options (recipe section, CLI flags, entry point argument).
- :func:`compute_importance` / :func:`collect_importance`: scores of an in-memory model.
- :func:`run_importance`: end to end from a checkpoint path and a data source (the CLI).
- :func:`depth_lm_loss`: held-out LM loss with each layer / contiguous block skipped.
- :func:`save_scores` / :func:`load_scores`: the safetensors + JSON scores file
  (``minitron_fast.artifacts.scores``).

Names are imported on first use (the CLI reads ``ImportanceConfig`` without importing torch).
"""
from minitron_fast._lazy import exported_names, lazy_getattr

_EXPORTS = {
    "minitron_fast.importance.config": ("ImportanceConfig",),
    "minitron_fast.importance.api": ("compute_importance", "run_importance"),
    "minitron_fast.importance.collect": ("AGGS", "ImportanceCollector", "NonFiniteActivationError",
                                         "collect_importance"),
    "minitron_fast.importance.depth": ("depth_lm_loss", "skip_layers"),
    "minitron_fast.artifacts.scores": ("ImportanceScores", "ScoresFileError", "load_scores", "read_metadata",
                                       "save_scores"),
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = exported_names(_EXPORTS)
