"""Evaluation: held-out LM loss and perplexity (and, later, lm-evaluation-harness tasks)."""
from minitron_fast.evaluate.perplexity import lm_loss, perplexity

__all__ = ["lm_loss", "perplexity"]
