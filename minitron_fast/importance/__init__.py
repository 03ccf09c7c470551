"""minitron_fast.importance: activation-based importance (heads, KV groups, MLP neurons, embedding
channels, layers) from forward passes only, and the scores file the pruning stage reads.

- :func:`compute_importance` / :func:`collect_importance`: scores of an in-memory model.
- :func:`run_importance`: end to end from a checkpoint path and a data source (the CLI).
- :func:`depth_lm_loss`: held-out LM loss with each layer / contiguous block skipped.
- :func:`save_scores` / :func:`load_scores`: the safetensors + JSON scores file.
"""
from minitron_fast.importance.api import compute_importance, run_importance
from minitron_fast.importance.collect import AGGS, ImportanceCollector, NonFiniteActivationError, collect_importance
from minitron_fast.importance.depth import depth_lm_loss, skip_layers
from minitron_fast.importance.scores import ImportanceScores, ScoresFileError, load_scores, read_metadata, save_scores

__all__ = ["AGGS", "ImportanceCollector", "ImportanceScores", "NonFiniteActivationError", "ScoresFileError",
           "collect_importance", "compute_importance", "depth_lm_loss", "load_scores", "read_metadata",
           "run_importance", "save_scores", "skip_layers"]
