"""The importance stage's entry points: on an in-memory model, and end to end from paths."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron_fast.errors import DataError, MinitronError
from minitron_fast.importance.collect import collect_importance
from minitron_fast.importance.depth import depth_lm_loss
from minitron_fast.importance.scores import ImportanceScores, save_scores

log = logging.getLogger(__name__)


def compute_importance(model: nn.Module, calib: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                       heldout: torch.Tensor | None = None, depth_block: int | None = None, batch_size: int = 8,
                       seq_agg: str = "mean", batch_agg: str = "l2", impl: str = "auto", progress: bool = True,
                       meta: dict[str, Any] | None = None, head_score: str = "input") -> ImportanceScores:
    """Every importance score of an in-memory model: width axes and block importance from one
    pass over ``calib [n, T]``; with ``heldout [m, T]``, also the LM loss with each layer (and each
    contiguous block of ``depth_block`` layers) skipped.

    Example:
        >>> scores = compute_importance(model, calib_blocks, heldout=heldout_blocks, depth_block=4)
        >>> save_scores(scores, "scores.safetensors")
    """
    scores = collect_importance(model, calib, attention_mask=attention_mask, batch_size=batch_size, seq_agg=seq_agg,
                                batch_agg=batch_agg, impl=impl, progress=progress, meta=meta, head_score=head_score)
    if heldout is not None:
        d = depth_lm_loss(model, heldout, block_size=depth_block, batch_size=batch_size, progress=progress)
        scores.lm_loss = d["per_layer"]
        scores.block_lm_loss = d["block"]
        scores.meta["depth_lm_loss"] = {"base": d["base"], "block_size": d["block_size"],
                                        "best_block_start": d["best_block_start"], "heldout_tokens": d["heldout_tokens"],
                                        "sign": "held-out loss with the layer(s) skipped; higher = more important"}
    return scores


def run_importance(model: str | os.PathLike = "demo", data: str | os.PathLike = "demo", *, out: str | os.PathLike,
                   samples: int = 1024, seq_len: int = 256, batch_size: int = 8, seq_agg: str = "mean",
                   batch_agg: str = "l2", with_depth_lm_loss: bool = False, depth_block: int | None = None,
                   heldout_samples: int = 16, allow_fewer: bool = False, text_field: str = "text",
                   dtype: str = "float32", device: str = "cpu", impl: str = "auto", heatmap_png: bool = True,
                   progress: bool = True, head_score: str = "input",
                   overwrite: bool = False) -> tuple[ImportanceScores, dict[str, Path]]:
    """Loads ``model`` and the ``calib`` split of ``data``, computes the scores, writes ``out``
    (and ``<out stem>.png`` beside it). Returns the scores and the written paths. An existing
    ``out`` (or heatmap) is an error unless ``overwrite``; neither may be an input."""
    from minitron_fast.data import token_blocks
    from minitron_fast.io import check_output
    from minitron_fast.models.loading import check_device, check_seq_len, load_config, load_model, load_tokenizer, \
        resolve_model_path

    for name, v in (("--samples", samples), ("--batch-size", batch_size), ("--heldout-samples", heldout_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MinitronError(f"{name} must be at least 1, got {v}")
    if depth_block is not None and depth_block < 1:
        raise MinitronError(f"--depth-block must be at least 1, got {depth_block}")
    config = load_config(model)  # unsupported families fail here, before any weight is read
    src = resolve_model_path(model)
    inputs = [src, data]
    out = check_output(out, inputs=inputs, kind="--out", overwrite=overwrite)
    if heatmap_png:
        png = out.with_suffix(".png")
        if png == out:
            raise MinitronError(f"--out {out}: the heatmap {png} would be written over the scores; name the scores "
                                "file *.safetensors, or pass --no-heatmap")
        check_output(png, inputs=inputs, kind="heatmap", overwrite=overwrite)
    check_seq_len(config, seq_len)
    check_device(device)
    tok = load_tokenizer(model)
    calib = token_blocks(tok, data, "calib", seq_len, text_field=text_field)
    if calib.shape[0] < samples:
        msg = (f"the calib split of {data} holds {calib.shape[0]} blocks of {seq_len} tokens "
               f"({calib.numel():,} tokens), fewer than --samples {samples}")
        if not allow_fewer:
            raise DataError(msg + "; pass --allow-fewer to proceed with them, or lower --samples/--seq-len")
        log.warning("warning: %s; proceeding with %d (--allow-fewer)", msg, calib.shape[0])
    calib = calib[:samples]
    heldout = None
    if with_depth_lm_loss:
        heldout = token_blocks(tok, data, "heldout", seq_len, max_blocks=heldout_samples, text_field=text_field)
    L = config.num_hidden_layers
    if with_depth_lm_loss and depth_block is None:
        depth_block = max(1, min(L - 1, L // 4))
    m = load_model(model, dtype=dtype, device=device)
    meta = {"source_model": str(model) if str(model) == "demo" else str(src), "data": str(data),
            "requested_samples": samples}
    scores = compute_importance(m, calib, heldout=heldout, depth_block=depth_block if with_depth_lm_loss else None,
                                batch_size=batch_size, seq_agg=seq_agg, batch_agg=batch_agg, impl=impl,
                                progress=progress, meta=meta, head_score=head_score)
    paths = {"scores": save_scores(scores, out)}
    if heatmap_png:
        from minitron_fast.importance.report import heatmap

        paths["heatmap"] = heatmap(scores, out.with_suffix(".png"))
    return scores, paths


__all__ = ["compute_importance", "run_importance"]
