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
from minitron_fast._lazy import lazy_getattr

_EXPORTS = {
    "ImportanceConfig": "minitron_fast.importance.config",
    "compute_importance": "minitron_fast.importance.api", "run_importance": "minitron_fast.importance.api",
    "AGGS": "minitron_fast.importance.collect", "ImportanceCollector": "minitron_fast.importance.collect",
    "NonFiniteActivationError": "minitron_fast.importance.collect",
    "collect_importance": "minitron_fast.importance.collect",
    "depth_lm_loss": "minitron_fast.importance.depth", "skip_layers": "minitron_fast.importance.depth",
    "ImportanceScores": "minitron_fast.artifacts.scores", "ScoresFileError": "minitron_fast.artifacts.scores",
    "load_scores": "minitron_fast.artifacts.scores", "read_metadata": "minitron_fast.artifacts.scores",
    "save_scores": "minitron_fast.artifacts.scores",
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
