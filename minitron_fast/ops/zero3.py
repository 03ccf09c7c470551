"""DeepSpeed ZeRO-3 support for the fused losses: keep a partitioned lm_head gathered across the
loss's forward **and** backward.

Under ZeRO-3 a parameter's ``.data`` is an empty placeholder outside the module that owns it, so a
fused loss that reads ``lm_head.weight`` directly (it never calls ``lm_head.forward``) sees nothing,
and the gradient it hands back in backward lands on a released parameter (measured: autograd fails
with a size mismatch). ``call_through(module, fn, *args)`` runs ``fn`` *as* the module's forward,
so DeepSpeed's own module hooks gather the parameters before the forward and again before the
backward and reduce-scatter the gradient afterwards, exactly as for a plain ``nn.Linear``.
``gathered(*params)`` all-gathers read-only parameters (a frozen teacher's head) for a block.
Without DeepSpeed, or for parameters that are not ZeRO-3 partitioned, both do nothing special.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def is_zero3_param(p) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (it carries ``ds_id``)."""
    return p is not None and hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(*params: torch.nn.Parameter | None) -> Iterator[None]:
    """All-gathers the ZeRO-3 partitioned ``params`` (None entries and ordinary tensors are
    skipped) for the block; read-only (``modifier_rank=None``: nothing is broadcast back).

    Example:
        >>> head = torch.nn.Linear(4, 3)
        >>> with gathered(head.weight, head.bias):
        ...     w = head.weight.sum()
    """
    ps = [p for p in params if is_zero3_param(p)]
    if not ps:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):
        yield


def call_through(module: torch.nn.Module, fn, *args, **kwargs):
    """Calls ``fn(*args, **kwargs)`` in place of ``module.forward`` through ``module.__call__``, so
    the module's hooks (DeepSpeed ZeRO-3's gather / release / pre-backward re-gather) wrap it.
    Without ZeRO-3 parameters it is a plain call of ``fn``."""
    if not any(is_zero3_param(p) for p in module.parameters(recurse=False)):
        return fn(*args, **kwargs)
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args, **kwargs)
    finally:
        if had:
            module.forward = old
        else:
            del module.forward
