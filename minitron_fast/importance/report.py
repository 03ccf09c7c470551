"""The one-screen summary and the per-layer heatmap PNG of an importance scores file."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from minitron_fast.artifacts.scores import ImportanceScores
from minitron_fast.io import save_figure


def summary(scores: ImportanceScores, *, top: int = 3) -> str:
    """A short text summary: data and aggregation, most/least important layers by each depth
    metric, the best contiguous block to drop, and a per-layer table."""
    m = scores.meta
    L = scores.num_layers
    lines = [f"importance of {m.get('source_model', 'model')} ({m.get('family', '?')}, {L} layers): "
             f"{m.get('calib_samples', '?')} samples x {m.get('seq_len', '?')} tokens = {m.get('calib_tokens', '?')} "
             f"calibration tokens; aggregation {m.get('seq_agg')} over sequence, {m.get('batch_agg')} over batch"]
    bi = scores.block_importance
    order = bi.argsort(descending=True).tolist()
    lines.append(f"block importance (1 - cos): most important layers {order[:top]}, least important {order[::-1][:top]}")
    if scores.lm_loss is not None:
        d = m.get("depth_lm_loss", {})
        o = scores.lm_loss.argsort(descending=True).tolist()
        lines.append(f"LM loss with one layer skipped (base {d.get('base', float('nan')):.4f}): most important {o[:top]}, "
                     f"least important {o[::-1][:top]}")
        if scores.block_lm_loss is not None:
            k, s = d.get("block_size"), d.get("best_block_start")
            lines.append(f"best contiguous block of {k} layers to drop: layers {s}..{s + k - 1} "
                         f"(held-out loss {float(scores.block_lm_loss[s]):.4f})")
    head = f"{'layer':>5}  {'BI':>8}  {'lm_loss':>8}  {'heads mean':>10}  {'heads min/max':>13}  {'neurons mean':>12}  {'channels mean':>13}"
    lines.append(head)
    for i in range(L):
        h = scores.heads[i]
        ll = f"{float(scores.lm_loss[i]):8.4f}" if scores.lm_loss is not None else f"{'-':>8}"
        lines.append(f"{i:>5}  {float(bi[i]):8.4f}  {ll}  {float(h.mean()):10.4g}  {float(h.min() / h.max()):13.3f}  "
                     f"{float(scores.neurons[i].mean()):12.4g}  {float(scores.layer_channels[i].mean()):13.4g}")
    return "\n".join(lines)


def heatmap(scores: ImportanceScores, path: str | os.PathLike) -> Path:
    """Writes a PNG: per-layer head scores and neuron scores (each row normalized by its max, so
    the pattern within a layer shows), and the depth metrics. Atomic write."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    def norm_rows(ts: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(ts)
        return (x / x.amax(1, keepdim=True).clamp_min(1e-30)).numpy()

    ncols = 3
    fig, ax = plt.subplots(1, ncols, figsize=(15, max(3.0, 0.18 * scores.num_layers + 1.5)),
                           gridspec_kw={"width_ratios": [1, 3, 1]})
    im = ax[0].imshow(norm_rows(scores.heads), aspect="auto", cmap="viridis", interpolation="nearest")
    ax[0].set(title="query heads (score / layer max)", xlabel="head", ylabel="layer")
    fig.colorbar(im, ax=ax[0])
    neurons = torch.stack(scores.neurons).sort(dim=1, descending=True).values
    # log scale: a few outlier neurons per layer carry most of the activation mass
    im = ax[1].imshow(np.log10(np.clip(norm_rows(list(neurons)), 1e-4, None)), aspect="auto", cmap="viridis",
                      interpolation="nearest")
    ax[1].set(title="MLP neurons, sorted per layer (log10 score / layer max)", xlabel="neuron rank", ylabel="layer")
    fig.colorbar(im, ax=ax[1])
    L = scores.num_layers
    ax[2].barh(range(L), scores.block_importance.numpy(), color="tab:blue", label="block importance")
    ax[2].set(title="depth", xlabel="BI = 1 - cos", ylim=(L - 0.5, -0.5))
    if scores.lm_loss is not None:
        a2 = ax[2].twiny()
        a2.plot(scores.lm_loss.numpy(), range(L), "o-", color="tab:red", ms=3, label="LM loss, layer skipped")
        a2.set_xlabel("held-out LM loss with the layer skipped", color="tab:red")
    ax[2].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"importance: {scores.meta.get('source_model', '')} ({scores.meta.get('calib_tokens', '?')} tokens, "
                 f"{scores.meta.get('seq_agg')}/{scores.meta.get('batch_agg')})")
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


__all__ = ["summary", "heatmap"]
