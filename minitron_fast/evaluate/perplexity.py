"""Held-out LM loss and perplexity over packed token blocks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def lm_loss(model: torch.nn.Module, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = True,
            desc: str = "eval") -> float:
    """Mean next-token negative log-likelihood (nats/token) of ``model`` over ``blocks [n, T]``,
    weighted by tokens. Each block predicts its T-1 next tokens."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty [n, T] tensor, got {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            ids = blocks[i : i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, **kw) -> float:
    """``exp`` of :func:`lm_loss`."""
    return math.exp(lm_loss(model, blocks, **kw))
