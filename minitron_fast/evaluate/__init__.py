"""Evaluation: held-out LM loss and perplexity, and lm-evaluation-harness tasks.

- :class:`EvaluateConfig`: the stage's options (recipe section, CLI flags, entry point argument).
- :func:`lm_loss`; :func:`evaluate_model` (``minitron-fast eval``); ``perplexity`` (the function)
  is ``minitron_fast.perplexity`` (``minitron_fast.evaluate.perplexity`` is its module).
"""
from minitron_fast._lazy import exported_names, lazy_getattr

_EXPORTS = {
    "minitron_fast.evaluate.config": ("EvaluateConfig",),
    "minitron_fast.evaluate.perplexity": ("lm_loss",),  # perplexity(): minitron_fast.perplexity
    "minitron_fast.evaluate.harness": ("evaluate_model",),
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = exported_names(_EXPORTS)
