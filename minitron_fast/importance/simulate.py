"""Width pruning simulated by zeroing, exactly equal to surgery, for judging scores without
touching shapes (the importance quality benchmark; quick what-if checks).

- A pruned query head: its ``o_proj`` input columns are zeroed (its output never reaches the
  residual stream; q/k/v rows of it then feed nothing).
- A pruned MLP neuron: its ``down_proj`` column is zeroed.
- Pruned embedding channels: the embedding columns, the ``o_proj``/``down_proj`` output rows (and
  biases) and the norm weights at those channels are zeroed, so the residual stream is exactly 0
  there; and because an RMSNorm of the pruned model averages over ``H'`` channels instead of
  ``H``, every norm's kept weights are scaled by ``sqrt(H'/H)`` and its eps by ``H'/H``:
  ``w x / sqrt(S/H' + eps) == w sqrt(H'/H) x / sqrt(S/H + eps H'/H)`` (for Gemma's ``(1 + w)``
  norms the factor ``1 + w`` is what is scaled, and set to 0 at pruned channels). The embedding
  scale is left as it is: the pruner rescales the embedding so that its residual stream is
  exactly this one (``prune.surgery.hidden_rescale``).

Also weight-magnitude scores, the baseline activation scores are compared with.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from minitron_fast.errors import MinitronError
from minitron_fast.models import ModelView, get_view


def _view(model: nn.Module | ModelView) -> ModelView:
    return model if isinstance(model, ModelView) else get_view(model)


@torch.no_grad()
def zero_heads(model: nn.Module | ModelView, keep: Sequence[Sequence[int]]) -> None:
    """Zeroes every query head not in ``keep[i]`` (head indices of layer i)."""
    view = _view(model)
    hd, nh = view.head_dim, view.num_heads
    for lv, k in zip(view.layers, keep):
        for h in sorted(set(range(nh)) - set(int(j) for j in k)):
            lv.o_proj.weight[:, h * hd:(h + 1) * hd] = 0


@torch.no_grad()
def zero_neurons(model: nn.Module | ModelView, keep: Sequence[Sequence[int]]) -> None:
    """Zeroes every MLP neuron not in ``keep[i]`` (its ``down_proj`` column)."""
    view = _view(model)
    for lv, k in zip(view.layers, keep):
        mask = torch.ones(view.intermediate_size, dtype=torch.bool)
        mask[torch.as_tensor(list(k), dtype=torch.long)] = False
        lv.down_proj.weight[:, mask] = 0


@torch.no_grad()
def zero_channels(model: nn.Module | ModelView, keep: Sequence[int]) -> None:
    """Zeroes every hidden channel not in ``keep`` and rescales the RMSNorms so the model equals
    the one with those channels cut out (see the module docstring)."""
    view = _view(model)
    H = view.hidden_size
    keep_t = torch.as_tensor(sorted(set(int(c) for c in keep)), dtype=torch.long)
    pruned = torch.ones(H, dtype=torch.bool)
    pruned[keep_t] = False
    ratio = len(keep_t) / H
    view.embed_tokens.weight[:, pruned] = 0
    if not view.tied:
        view.lm_head.weight[:, pruned] = 0
    norms = [view.final_norm]
    for lv in view.layers:
        for lin in (lv.o_proj, lv.down_proj):
            lin.weight[pruned, :] = 0
            if lin.bias is not None:
                lin.bias[pruned] = 0
        norms += lv.hidden_norms()
    for n in norms:
        rms = view.rmsnorm_of(n)
        if rms is None:
            raise MinitronError(f"channel pruning simulation supports RMSNorm only, got {type(n).__name__}")
        w, eps, off = rms
        w[pruned] = -off  # (off + w) = 0
        w[~pruned] = (w[~pruned] + off) * math.sqrt(ratio) - off
        view.set_rmsnorm_eps_(n, eps * ratio)


@torch.no_grad()
def magnitude_scores(model: nn.Module | ModelView) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """Weight-magnitude importance (L2 norm of every weight tied to a unit): ``heads`` (q rows and
    o columns), ``neurons`` (gate and up rows, down column), ``channels`` (embedding column and
    every projection's slice along the hidden dimension)."""
    view = _view(model)
    hd, nh = view.head_dim, view.num_heads
    heads, neurons = [], []
    ch = view.embed_tokens.weight.float().pow(2).sum(0)
    for lv in view.layers:
        wq, wk, wv = lv.qkv_weights()
        wg, wu = lv.gate_up_weights()
        q = wq.float().pow(2).view(nh, hd, -1).sum((1, 2))
        o = lv.o_proj.weight.float().pow(2).view(-1, nh, hd).sum((0, 2))
        heads.append((q + o).sqrt())
        neurons.append((wg.float().pow(2).sum(1) + wu.float().pow(2).sum(1)
                        + lv.down_proj.weight.float().pow(2).sum(0)).sqrt())
        for w in (wq, wk, wv, wg, wu):
            ch += w.float().pow(2).sum(0)
        for lin in (lv.o_proj, lv.down_proj):
            ch += lin.weight.float().pow(2).sum(1)
    return {"heads": heads, "neurons": neurons, "channels": ch.sqrt()}


def top_k(score: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending (ties broken by index, deterministic)."""
    order = torch.argsort(score.double(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def heads_within_groups(score: torch.Tensor, n_kv: int, per_group: int) -> list[int]:
    """GQA-uniform head selection: the top ``per_group`` query heads inside each KV group."""
    g = score.numel() // n_kv
    keep = []
    for j in range(n_kv):
        keep += [j * g + i for i in top_k(score[j * g:(j + 1) * g], per_group)]
    return keep


__all__ = ["zero_heads", "zero_neurons", "zero_channels", "magnitude_scores", "top_k", "heads_within_groups"]
