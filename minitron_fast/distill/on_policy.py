"""On-policy distillation (GKD's ``lmbda``): the student writes part of each block, the teacher
scores the student's own text through the same fused loss.

``on_policy_step(cfg, step)`` draws whether a step is on-policy (seeded by the run's seed and the
step, so every rank and a resumed run draw the same); ``rollout(model, ids, ...)`` keeps each
block's first ``seq_len - max_new_tokens`` tokens as the prompt and lets the student sample the
rest (exactly ``max_new_tokens``: EOS is not allowed to end a row early, so every rank runs the
same number of forwards, which ZeRO-3's gathers need), returning the new blocks and labels that
cover the written tokens only. Generation runs in eval mode under ``no_grad`` with its own RNG
stream (``seed``), leaving the training RNG as it was.
"""
from __future__ import annotations

import random

import torch
from torch import nn

from minitron_fast.ops.kd_step import IGNORE_INDEX


def on_policy_step(lmbda: float, seed: int, step: int) -> bool:
    """Whether training step ``step`` is on-policy: always at ``lmbda`` 1, never at 0, else a draw
    seeded by ``seed`` and ``step``."""
    if lmbda >= 1.0:
        return True
    if lmbda <= 0.0:
        return False
    return random.Random(f"{seed}:on_policy:{step}").random() < lmbda


@torch.no_grad()
def rollout(model: nn.Module, ids: torch.Tensor, *, max_new_tokens: int, temperature: float, seed: int,
            synced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, labels)``, both ``[B, L]`` like ``ids``: the first ``L - max_new_tokens`` tokens
    of each row, then the student's ``max_new_tokens`` samples at ``temperature`` (0: greedy);
    ``labels`` is ``blocks`` with the prompt positions set to ``IGNORE_INDEX`` (HF convention,
    unshifted). ``synced``: ZeRO-3 with several ranks (``generate(synced_gpus=True)``)."""
    B, L = ids.shape
    if not 1 <= max_new_tokens < L:
        raise ValueError(f"max_new_tokens={max_new_tokens} must lie in [1, {L - 1}] for blocks of {L} tokens")
    prompt = ids[:, : L - max_new_tokens]
    was_training = model.training
    model.eval()
    devices = [ids.device] if ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
                dict(do_sample=False)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, use_cache=True,
                                 pad_token_id=getattr(model.config, "pad_token_id", None) or 0,
                                 synced_gpus=synced, **kw)
    finally:
        model.train(was_training)
    if out.shape != ids.shape:
        raise RuntimeError(f"generate returned {tuple(out.shape)} for blocks {tuple(ids.shape)}")
    labels = out.clone()
    labels[:, : L - max_new_tokens] = IGNORE_INDEX
    return out, labels


__all__ = ["on_policy_step", "rollout"]
