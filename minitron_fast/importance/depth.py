"""Depth importance by held-out LM loss: each single layer skipped, and every contiguous block of
``k`` layers skipped (the second Minitron paper found dropping the best contiguous block better
than dropping the individually least important layers).

A skipped layer passes its input through unchanged, which is exactly what dropping it from the
checkpoint does (tested). Higher loss when skipped = more important layer.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minitron_fast.errors import MinitronError
from minitron_fast.models import ModelView, get_view


class _SkipLayer(nn.Module):
    """Stands in for a decoder layer: returns its hidden states unchanged. Every transformers-5
    decoder layer of the supported families returns the hidden-states tensor itself (some, e.g.
    Gemma 3's, still carry a stale ``tuple`` return annotation, so the annotation is not read)."""

    def __init__(self, replaced: nn.Module):
        super().__init__()
        for attr, value in vars(replaced).items():  # plain attributes some decoders' loops read (layer index, type)
            if not attr.startswith("_") and isinstance(value, (str, int, float, bool)):
                setattr(self, attr, value)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        return hidden_states


@contextlib.contextmanager
def skip_layers(model: nn.Module | ModelView, indices: Sequence[int]) -> Iterator[None]:
    """Temporarily skips the decoder layers ``indices`` (restored on exit, even on error)."""
    view = model if isinstance(model, ModelView) else get_view(model)
    layers = view.decoder_layers
    saved = {}
    try:
        for i in indices:
            if not 0 <= i < len(layers):
                raise MinitronError(f"layer index {i} out of range for {len(layers)} layers")
            saved[i] = layers[i]
            layers[i] = _SkipLayer(saved[i])
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


@torch.no_grad()
def heldout_loss(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats/token) over ``blocks [n, T]``. The ids go to the embedding's
    device (accelerate's execution device when it places the model, whose first parameter may be
    offloaded to ``meta``); the targets to the logits' device."""
    from minitron_fast.importance.collect import module_device

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = module_device(emb) if emb is not None else next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, blocks.shape[0], batch_size):
        ids = blocks[s: s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        target = ids[:, 1:].to(logits.device)
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       reduction="sum"))
        count += ids[:, 1:].numel()
    return total / count


class _InjectLayer(_SkipLayer):
    """Stands in for the last layer of a skipped run ``s .. e``: returns ``states``, the cached input
    of layer ``s``, whatever it is given (the layers before it are skipped too, so nothing upstream
    is computed again)."""

    def __init__(self, replaced: nn.Module, states: torch.Tensor):
        super().__init__(replaced)
        self.states = states

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self.states


@contextlib.contextmanager
def _capture_layer_inputs(layers: Sequence[nn.Module], out: list[torch.Tensor | None]) -> Iterator[None]:
    """Records the hidden states each decoder layer receives (``out[i]``: layer ``i``'s input), as
    its caller passes them (before any accelerate hook moves them)."""
    def hook(i: int):
        def pre(mod, args, kwargs):
            out[i] = args[0] if args else kwargs["hidden_states"]
        return pre

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _resume_after(view: ModelView, start: int, end: int, states: torch.Tensor) -> Iterator[None]:
    """The forward with layers ``start .. end`` skipped, computed from layer ``end + 1`` on: layers
    ``0 .. end - 1`` pass through, layer ``end`` returns ``states`` (layer ``start``'s input)."""
    layers = view.decoder_layers
    saved = {i: layers[i] for i in range(end + 1)}
    try:
        for i in range(end):
            layers[i] = _SkipLayer(saved[i])
        layers[end] = _InjectLayer(saved[end], states)
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


def _nll_sum(model: nn.Module, ids: torch.Tensor) -> float:
    """Summed next-token NLL of ``ids [B, T]``, a sequence at a time: the cross-entropy's
    temporaries are one sequence's logits, not the batch's (on SmolLM2-135M, batch 8 x 256, the
    batch's log-softmax and contiguous copy were 0.8 GB)."""
    logits = model(input_ids=ids, use_cache=False).logits
    target = ids[:, 1:].to(logits.device)
    total = logits.new_zeros((), dtype=torch.float32)
    for b in range(logits.shape[0]):
        total += F.cross_entropy(logits[b, :-1].float(), target[b], reduction="sum")
    return float(total)


def depth_lm_loss(model: nn.Module, blocks: torch.Tensor, *, block_size: int | None = None, batch_size: int = 8,
                  progress: bool = True) -> dict[str, Any]:
    """Held-out LM loss with each layer skipped, and with each contiguous block of ``block_size``
    layers skipped.

    Each batch runs once whole, recording every layer's input; a run with layers ``s .. e``
    skipped then starts from layer ``s``'s recorded input at layer ``e + 1``, so it computes only
    the layers after the run (and the head). For ``L`` layers that is about ``L^2 / 2`` layer
    forwards instead of ``L^2``, and the same losses bit for bit (tested against skipping the
    layers in a whole forward). The recording holds ``L`` hidden-state tensors of one batch.

    Returns ``{"base": float, "per_layer": [L] tensor, "block_size": k or None,
    "block": [L-k+1] tensor or None, "best_block_start": int or None}``; ``block[s]`` is the loss
    with layers ``s .. s+k-1`` skipped, and the best block to drop is the one with the lowest loss.

    Example:
        >>> d = depth_lm_loss(model, token_blocks(tok, "demo", "heldout", 256, max_blocks=4), block_size=8)
        >>> d["best_block_start"]
    """
    from minitron_fast.importance.collect import cpu_micro_batch, module_device

    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise MinitronError(f"held-out blocks must be a non-empty [n, T] tensor, got {tuple(blocks.shape)}")
    view = get_view(model)
    L = view.num_layers
    if block_size is not None and not 1 <= block_size < L:
        raise MinitronError(f"depth block size must be in [1, {L - 1}] for a {L}-layer model, got {block_size}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = module_device(emb) if emb is not None else next(model.parameters()).device
    if device.type == "cpu":
        from minitron_fast.io import cap_heap_retention

        cap_heap_retention()   # each run's freed logits otherwise stay resident (see collect.collect_importance)
        batch_size = min(batch_size, cpu_micro_batch(model, blocks.shape[1]))   # the same losses, less memory
    runs = [(i, i) for i in range(L)]
    if block_size:
        runs += [(s, s + block_size - 1) for s in range(L - block_size + 1)]
    was_training = model.training
    model.eval()
    base, totals, count = 0.0, [0.0] * len(runs), 0
    starts = range(0, blocks.shape[0], batch_size)
    bar = tqdm(total=len(starts) * (len(runs) + 1), desc="depth (LM loss, layers skipped)", disable=not progress,
               leave=False)
    try:
        with torch.no_grad():
            for s0 in starts:
                ids = blocks[s0: s0 + batch_size].to(device)
                states: list[torch.Tensor | None] = [None] * L
                with _capture_layer_inputs(view.decoder_layers, states):
                    base += _nll_sum(model, ids)
                bar.update()
                for r, (s, e) in enumerate(runs):
                    with _resume_after(view, s, e, states[s]):
                        totals[r] += _nll_sum(model, ids)
                    bar.update()
                count += ids[:, 1:].numel()
                del states
    finally:
        bar.close()
        model.train(was_training)
    losses = [t / count for t in totals]
    per_layer = torch.tensor(losses[:L], dtype=torch.float32)
    block = torch.tensor(losses[L:], dtype=torch.float32) if block_size else None
    return {"base": base / count, "per_layer": per_layer, "block_size": block_size, "block": block,
            "best_block_start": int(block.argmin()) if block is not None else None,
            "heldout_tokens": int(blocks.numel())}


__all__ = ["skip_layers", "heldout_loss", "depth_lm_loss"]
