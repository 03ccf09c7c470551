"""Evaluation: held-out LM loss and perplexity, and lm-evaluation-harness tasks.

- :class:`EvaluateConfig`: the stage's options (recipe section, CLI flags, entry point argument).
- :func:`lm_loss` / :func:`perplexity`; :func:`evaluate_model` (``minitron-fast eval``).
"""
from minitron_fast._lazy import lazy_getattr

_EXPORTS = {
    "EvaluateConfig": "minitron_fast.evaluate.config",
    "lm_loss": "minitron_fast.evaluate.perplexity", "perplexity": "minitron_fast.evaluate.perplexity",
    "evaluate_model": "minitron_fast.evaluate.harness",
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
