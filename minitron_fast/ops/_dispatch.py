"""Choosing an implementation for an op: ``impl="auto" | "triton" | "torch" | "cpp"``."""
from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "triton", "torch", "cpp")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (it may still have no GPU driver; see ``triton_runnable``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runnable(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t``: a CUDA tensor, or any tensor when interpreted."""
    return triton_available() and (t.is_cuda or triton_interpreted())


# ops whose C++ path needs a specific _C function (a _C built before it existed lacks it)
_CPP_SYMBOL = {"fused_linear_kd_loss": "kd_forward_kl_rows", "kd_loss_from_logits": "kd_forward_kl_rows",
               "fused_linear_cross_entropy": "ce_rows"}


def _cpp_has(op: str) -> bool:
    from minitron_fast._ext import HAS_C, _C

    return HAS_C and hasattr(_C, _CPP_SYMBOL.get(op, "__doc__"))


def resolve_impl(impl: str, t: torch.Tensor, *, op: str, choices: tuple[str, ...] = ("triton", "torch")) -> str:
    """Resolves ``impl`` for tensor ``t``: "auto" picks Triton on CUDA tensors, else the first CPU
    choice (``cpp`` when offered and built, else ``torch``). Raises a ValueError naming the op."""
    if impl not in IMPLS or (impl != "auto" and impl not in choices):
        raise ValueError(f"{op}: impl={impl!r} is not one of {('auto',) + tuple(choices)}")
    if impl == "auto":
        if t.is_cuda and "triton" in choices and triton_available():
            return "triton"
        if "cpp" in choices and not t.is_cuda and _cpp_has(op):
            return "cpp"
        return "torch"
    if impl == "triton" and not triton_runnable(t):
        raise RuntimeError(
            f"{op}: impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter); "
            f"got a {t.device.type} tensor. Use impl='auto' or 'torch'."
        )
    if impl == "cpp":
        if not _cpp_has(op):
            raise RuntimeError(f"{op}: impl='cpp' needs minitron_fast._C with this op, which is not built "
                               "(reinstall with `pip install -e .`); use impl='torch'.")
        if t.is_cuda:
            raise RuntimeError(f"{op}: impl='cpp' works on CPU tensors only; got {t.device}.")
    return impl
