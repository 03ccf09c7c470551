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
from minitron_fast.importance.config import ImportanceConfig
from minitron_fast.importance.depth import depth_lm_loss
from minitron_fast.artifacts.scores import ImportanceScores, save_scores

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
                   config: ImportanceConfig | None = None, text_field: str = "text", default_seq_len: int = 256,
                   heatmap_png: bool = True, progress: bool = True) -> tuple[ImportanceScores, dict[str, Path]]:
    """Loads ``model`` and the ``calib`` split of ``data``, computes the scores with the options in
    ``config`` (:class:`ImportanceConfig`; its ``seq_len`` None means ``default_seq_len``), writes
    ``out`` (and ``<out stem>.png`` beside it). Returns the scores and the written paths.

    Example:
        >>> scores, paths = run_importance("demo", "demo", out="scores.safetensors",
        ...                                config=ImportanceConfig(samples=64, device="cuda", dtype="bfloat16"))
    """
    from minitron_fast.data import token_blocks
    from minitron_fast.io import same_or_inside
    from minitron_fast.models.loading import load_config, load_model, load_tokenizer, resolve_model_path

    cfg = (config or ImportanceConfig()).validate()
    samples, seq_len = cfg.samples, cfg.seq_len or default_seq_len
    load_kw = cfg.load_kwargs()  # device: cuda without CUDA fails here, before any model loads
    cfg.check_impl(load_kw["device"] if cfg.device_map in (None, "cpu") else "cuda")
    config = load_config(model)  # unsupported families fail here, before any weight is read
    src = resolve_model_path(model)
    out = Path(out)
    if same_or_inside(out.parent, src):
        raise MinitronError(f"--out {out} lies inside the input model directory {src}; write the scores elsewhere")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise MinitronError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    tok = load_tokenizer(model)
    calib = token_blocks(tok, data, "calib", seq_len, text_field=text_field)
    if calib.shape[0] < samples:
        msg = (f"the calib split of {data} holds {calib.shape[0]} blocks of {seq_len} tokens "
               f"({calib.numel():,} tokens), fewer than --samples {samples}")
        if not cfg.allow_fewer:
            raise DataError(msg + "; pass --allow-fewer to proceed with them, or lower --samples/--seq-len")
        log.warning("warning: %s; proceeding with %d (--allow-fewer)", msg, calib.shape[0])
    calib = calib[:samples]
    heldout = None
    if cfg.depth_lm_loss:
        heldout = token_blocks(tok, data, "heldout", seq_len, max_blocks=cfg.heldout_samples, text_field=text_field)
    L = config.num_hidden_layers
    depth_block = cfg.depth_block
    if cfg.depth_lm_loss and depth_block is None:
        depth_block = max(1, min(L - 1, L // 4))
    m = load_model(model, **load_kw)
    meta = {"source_model": str(model) if str(model) == "demo" else str(src), "data": str(data),
            "requested_samples": samples}
    scores = compute_importance(m, calib, heldout=heldout, depth_block=depth_block if cfg.depth_lm_loss else None,
                                batch_size=cfg.batch_size, seq_agg=cfg.seq_agg, batch_agg=cfg.batch_agg, impl=cfg.impl,
                                progress=progress, meta=meta, head_score=cfg.head_score)
    paths = {"scores": save_scores(scores, out)}
    if heatmap_png:
        from minitron_fast.importance.report import heatmap

        paths["heatmap"] = heatmap(scores, out.with_suffix(".png"))
    return scores, paths


__all__ = ["compute_importance", "run_importance"]
