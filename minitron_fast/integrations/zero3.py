"""DeepSpeed ZeRO-3 support for the fused losses: gather a partitioned lm_head around the loss.

Under ZeRO-3 a parameter's ``.data`` is an empty placeholder outside the module that owns it, so a
fused loss that reads ``lm_head.weight`` directly (it never calls ``lm_head.forward``) sees nothing.
``gathered(*params)`` all-gathers them for the duration of the block. The fused loss computes the
weight's gradient inside its forward pass (while gathered) and hands it to autograd in backward,
where ZeRO-3's gradient hooks reduce-scatter it into the partitions; backward never reads the
weight, so nothing needs to stay gathered after the block. Without DeepSpeed, or for parameters
that are not ZeRO-3 partitioned, it does nothing.
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
