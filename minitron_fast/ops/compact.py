"""In-place compaction of kept rows or columns of a 2-D tensor (the pruning primitive).

``compact_(t, kept, dim)`` keeps the entries ``kept`` (sorted, unique) of ``t`` along ``dim``
inside ``t``'s own storage and reshapes ``t`` to the smaller size: an ``nn.Parameter`` stays the
same Python object, no second copy of the tensor is made (with ``impl="cpp"``), and whole freed
pages can be returned to the operating system.

Implementations: ``cpp`` (``minitron_fast._C``, multi-threaded, CPU), ``torch`` (CPU or CUDA;
stages the kept slice through one temporary), and ``reference`` semantics ``t.index_select(dim,
kept)``, which tests compare against.
"""
from __future__ import annotations

import torch

from minitron_fast.ops._dispatch import resolve_impl

_C_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.float64,
             torch.int32, torch.int64, torch.int16}


def compact_reference(t: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    """Ground truth: a new tensor ``t.index_select(dim, kept)``."""
    return t.index_select(dim, kept.to(device=t.device, dtype=torch.long))


def _check(t: torch.Tensor, kept: torch.Tensor, dim: int) -> torch.Tensor:
    if t.dim() not in (1, 2):
        raise ValueError(f"compact_: expected a 1-D or 2-D tensor, got shape {tuple(t.shape)}")
    if dim not in (0, 1, -1, -2) or (t.dim() == 1 and dim not in (0, -1)):
        raise ValueError(f"compact_: dim={dim} is invalid for a {t.dim()}-D tensor")
    if not t.is_contiguous():
        raise ValueError("compact_: the tensor must be contiguous (call .contiguous() first)")
    kept = torch.as_tensor(kept, dtype=torch.long).flatten().cpu()
    size = t.shape[dim]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= size):
        raise ValueError(f"compact_: kept indices must lie in [0, {size}) along dim {dim}")
    if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
        raise ValueError("compact_: kept indices must be strictly increasing (sort and deduplicate them)")
    return kept


def compact_(t: torch.Tensor, kept: torch.Tensor, dim: int = 0, *, impl: str = "auto",
             release: bool = True) -> torch.Tensor:
    """Keeps ``kept`` along ``dim`` of the contiguous tensor ``t`` in place and returns ``t``.

    Args:
        t: ``[R, C]`` or ``[R]`` contiguous tensor (a parameter's ``.data`` or the parameter).
        kept: ``[K]`` int indices along ``dim``, strictly increasing.
        dim: 0 keeps rows, 1 keeps columns.
        impl: ``"auto"`` (``cpp`` on CPU when built, else ``torch``), ``"cpp"`` or ``"torch"``.
        release: return whole freed pages at the storage's tail to the OS (``cpp`` only).

    Example:
        >>> w = torch.arange(12.0).view(3, 4)
        >>> compact_(w, torch.tensor([0, 2]), dim=1).tolist()
        [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]]
    """
    kept = _check(t, kept, dim)
    dim = dim % t.dim()
    impl = resolve_impl(impl, t, op="compact_", choices=("cpp", "torch"))
    if impl == "cpp" and t.dtype not in _C_DTYPES:
        impl = "torch"
    new_shape = list(t.shape)
    new_shape[dim] = kept.numel()
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    with torch.no_grad():
        if impl == "cpp":
            from minitron_fast._ext import _C

            es = t.element_size()
            idx = kept.numpy()
            if t.dim() == 1 or dim == 0:
                row_bytes = es * (t.shape[1] if t.dim() == 2 else 1)
                used = _C.compact_rows(data.data_ptr(), t.shape[0], row_bytes, idx)
            else:
                used = _C.compact_cols(data.data_ptr(), t.shape[0], t.shape[1], es, idx, 0)
            if release:
                storage = data.untyped_storage()
                offset = data.storage_offset() * es
                _C.release_tail(storage.data_ptr(), offset + used, storage.nbytes())
        else:
            kept_d = kept.to(t.device)
            flat = data.view(-1)
            n = 1
            for s in new_shape:
                n *= s
            flat[:n].copy_(data.index_select(dim, kept_d).reshape(-1))
        strides = [1] if t.dim() == 1 else [new_shape[1], 1]
        # Re-view the same storage at the new shape; assigning .data keeps a Parameter the same
        # object (optimizers and modules holding it see the new shape).
        t.data = data.as_strided(new_shape, strides)
    return t
