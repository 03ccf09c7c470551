"""The one device guard of every Triton launch.

Triton launches a kernel on the *current* CUDA device, not on its arguments' device: a launcher
called with tensors on ``cuda:3`` while ``cuda:0`` is current hands cuda:3 pointers to a cuda:0
launch ("Pointer argument cannot be accessed from Triton", or an illegal memory access). Every
function in ``kernels/`` that launches a kernel is decorated with :func:`on_tensor_device`, which
makes its first tensor argument's device current for the launch.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# device type -> context manager that makes that device current (tests add a recorder for "meta")
GUARDS: dict[str, Callable[[torch.device], Any]] = {"cuda": torch.cuda.device}


def on_tensor_device(fn: F) -> F:
    """Decorator for a launcher: runs it with the device of its first tensor argument current."""

    @functools.wraps(fn)
    def launch(*args: Any, **kwargs: Any) -> Any:
        t = next((a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)), None)
        guard = GUARDS.get(t.device.type) if t is not None else None
        if guard is None:
            return fn(*args, **kwargs)
        with guard(t.device):
            return fn(*args, **kwargs)

    launch.__launches_on_tensor_device__ = True  # type: ignore[attr-defined]
    return launch  # type: ignore[return-value]
