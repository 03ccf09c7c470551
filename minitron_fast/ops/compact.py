"""In-place compaction of kept rows or columns of a 2-D tensor (the pruning primitive).

``compact_(t, kept, dim)`` keeps the entries ``kept`` (sorted, unique) of ``t`` along ``dim``
inside ``t``'s own storage and reshapes ``t`` to the smaller size: an ``nn.Parameter`` stays the
same Python object, no second copy of the tensor is made, and whole freed pages can be returned
to the operating system.

Implementations (all share one schedule: output rows are written in rounds whose destination
bytes never reach a byte a later or concurrent read still needs; rounds at the very start of
the buffer, where that would be too small, go through a bounded staging block):

- ``cpp``: ``minitron_fast._C``, multi-threaded ``memmove``s of runs of kept rows/columns, any
  dtype (fp32, bf16, fp16, int8, ...), then ``madvise(MADV_DONTNEED)`` on the freed whole pages.
- ``torch``: the same rounds with ``index_select(out=)`` (CPU or CUDA), at most ``stage_bytes``
  extra memory; cannot return pages to the OS.
- ``triton``: ``kernels/compact.py`` gather kernels on CUDA tensors (or under TRITON_INTERPRET).

``compact_reference(t, kept, dim)`` = ``t.index_select(dim, kept)`` is the ground truth.
"""
from __future__ import annotations

import itertools

import torch

from minitron_fast.ops._dispatch import resolve_impl

_C_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.float64,
             torch.int32, torch.int64, torch.int16, torch.bool}
STAGE_BYTES = 8 << 20
_STAGE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # reused: fresh pages cost page faults
MIN_DIRECT_BYTES = 1 << 20


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
    kept = torch.as_tensor(kept, dtype=torch.long).flatten().cpu().contiguous()
    # numpy, not torch ops: these are tiny, and torch would wake its thread pool for each one
    k = kept.numpy()
    size = t.shape[dim]
    if k.size and (int(k.min()) < 0 or int(k.max()) >= size):
        raise ValueError(f"compact_: kept indices must lie in [0, {size}) along dim {dim}")
    if k.size > 1 and not bool((k[1:] > k[:-1]).all()):
        raise ValueError("compact_: kept indices must be strictly increasing (sort and deduplicate them)")
    return kept


def _rounds(dim: int, kept: torch.Tensor, n_rows: int, n_cols: int, es: int, stage_bytes: int):
    """The in-place schedule: yields ``(a, b, direct)`` for output rows ``[a, b)``; a direct
    round may be written straight into place, others are staged."""
    if dim == 0:
        n_out, unit = kept.numel(), n_cols
        gaps = (kept - torch.arange(n_out)).tolist()  # non-decreasing: kept is strictly increasing
        a = next((i for i, g in enumerate(gaps) if g != 0), n_out)
        safe = lambda a: gaps[a]  # noqa: E731
    else:
        n_out, unit = n_rows, kept.numel()
        if unit == n_cols:
            return
        a = 0
        safe = lambda a: (a * (n_cols - unit)) // unit  # noqa: E731
    stage_units = max(1, stage_bytes // max(unit * es, 1))
    while a < n_out:
        s = min(safe(a), n_out - a)
        direct = s >= 1 and (s * unit * es >= MIN_DIRECT_BYTES or a + s >= n_out)
        b = a + s if direct else min(n_out, a + stage_units)
        yield a, b, direct
        a = b


def _compact_torch(flat: torch.Tensor, n_rows: int, n_cols: int, kept: torch.Tensor, dim: int,
                   stage_bytes: int = STAGE_BYTES) -> None:
    es = flat.element_size()
    kd = kept.to(flat.device)
    K = kept.numel()
    stage = None
    for a, b, direct in _rounds(dim, kept, n_rows, n_cols, es, stage_bytes):
        if dim == 0:
            lo, hi = int(kept[a]), int(kept[b - 1]) + 1
            src = flat[lo * n_cols: hi * n_cols].view(hi - lo, n_cols)  # only the rows this round reads
            idx, d = kd[a:b] - lo, 0
            dst = flat[a * n_cols: b * n_cols].view(b - a, n_cols)
        else:
            src = flat[a * n_cols: b * n_cols].view(b - a, n_cols)
            idx, d = kd, 1
            dst = flat[a * K: b * K].view(b - a, K)
        if direct:  # src and dst do not overlap
            torch.index_select(src, d, idx, out=dst)
        else:
            if stage is None:
                unit = n_cols if dim == 0 else K  # a round holds at least one output row
                need = max(unit, stage_bytes // es)
                stage = _STAGE.get((flat.device, flat.dtype))
                if stage is None or stage.numel() < need:
                    stage = torch.empty(need, dtype=flat.dtype, device=flat.device)
                    if need * es <= STAGE_BYTES:
                        _STAGE[(flat.device, flat.dtype)] = stage
            tmp = stage[: dst.numel()].view(dst.shape)
            torch.index_select(src, d, idx, out=tmp)
            dst.copy_(tmp)


def compact_(t: torch.Tensor, kept: torch.Tensor, dim: int = 0, *, impl: str = "auto",
             release: bool = True, n_threads: int | None = None) -> torch.Tensor:
    """Keeps ``kept`` along ``dim`` of the contiguous tensor ``t`` in place and returns ``t``.

    Args:
        t: ``[R, C]`` or ``[R]`` contiguous tensor (a parameter's ``.data`` or the parameter).
        kept: ``[K]`` int indices along ``dim``, strictly increasing.
        dim: 0 keeps rows, 1 keeps columns.
        impl: ``"auto"`` (``triton`` on CUDA, ``cpp`` on CPU when built, else ``torch``),
            ``"cpp"``, ``"torch"`` or ``"triton"``.
        release: return the whole pages this tensor no longer uses to the OS (``cpp`` only;
            only pages inside this tensor's own byte range, so views sharing a storage are safe).
        n_threads: threads for ``cpp`` (default ``torch.get_num_threads()``).

    Example:
        >>> w = torch.arange(12.0).view(3, 4)
        >>> compact_(w, torch.tensor([0, 2]), dim=1).tolist()
        [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]]
    """
    kept = _check(t, kept, dim)
    dim = dim % t.dim()
    impl = resolve_impl(impl, t, op="compact_", choices=("cpp", "torch", "triton"))
    if impl == "cpp" and t.dtype not in _C_DTYPES:
        impl = "torch"
    new_shape = list(t.shape)
    new_shape[dim] = kept.numel()
    n_rows = t.shape[0]
    n_cols = t.shape[1] if t.dim() == 2 else 1
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    old_bytes = t.numel() * t.element_size()
    with torch.no_grad():
        if t.numel() and kept.numel():
            if impl == "cpp":
                from minitron_fast._ext import _C

                es = t.element_size()
                idx = kept.numpy()
                nt = torch.get_num_threads() if n_threads is None else n_threads
                if dim == 0:
                    used = _C.compact_rows(data.data_ptr(), n_rows, es * n_cols, idx, nt)
                else:
                    used = _C.compact_cols(data.data_ptr(), n_rows, n_cols, es, idx, nt)
                if release:
                    _C.release_tail(data.data_ptr(), used, old_bytes)
            elif impl == "triton":
                from minitron_fast.kernels.compact import compact_triton_

                compact_triton_(data.view(-1), n_rows, n_cols, kept.to(t.device), dim)
            else:
                _compact_torch(data.view(-1), n_rows, n_cols, kept, dim)
        strides = [1] if t.dim() == 1 else [new_shape[1], 1]
        # Re-view the same storage at the new shape; assigning .data keeps a Parameter the same
        # object (optimizers and modules holding it see the new shape).
        t.data = data.as_strided(new_shape, strides)
    return t


def shrink_storage_(module: torch.nn.Module) -> torch.nn.Module:
    """Moves every parameter and buffer of ``module`` whose storage is larger than the tensor
    (what in-place compaction leaves: the pruned tensor re-views the source's storage) into a
    storage of its own size, and returns ``module``. The big storage is freed once nothing else
    holds it. On CUDA (and for the torch path) compaction returns nothing to the allocator, so a
    pruned copy of a teacher would otherwise keep the teacher's size for as long as it lives;
    the C++ path returns the pages, but the storage still claims them. Tied parameters are one
    object and are moved once."""
    seen: set[int] = set()
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                t.data = t.data.clone(memory_format=torch.contiguous_format)
    return module


def compact_2d_(t: torch.Tensor, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None, *,
                impl: str = "auto", release: bool = True, n_threads: int | None = None) -> torch.Tensor:
    """Keeps ``rows`` (dim 0) and ``cols`` (dim 1) of ``t`` in place and returns ``t``; None
    keeps all. With ``impl="cpp"`` both axes move in one pass over the buffer (half the memory
    traffic of two ``compact_`` calls); other impls run rows, then columns.

    Args:
        t: ``[R, C]`` or ``[R]`` contiguous tensor; ``rows``: ``[Kr]``; ``cols``: ``[Kc]`` (2-D only).

    Example:
        >>> w = torch.arange(12.0).view(3, 4)
        >>> compact_2d_(w, torch.tensor([0, 2]), torch.tensor([1, 3])).tolist()
        [[1.0, 3.0], [9.0, 11.0]]
    """
    if rows is None and cols is None:
        return t
    if cols is not None and t.dim() != 2:
        raise ValueError(f"compact_2d_: cols given for a {t.dim()}-D tensor")
    impl_r = resolve_impl(impl, t, op="compact_2d_", choices=("cpp", "torch", "triton"))
    if impl_r != "cpp" or t.dtype not in _C_DTYPES or rows is None or cols is None:
        if rows is not None:
            compact_(t, rows, 0, impl=impl, release=release, n_threads=n_threads)
        if cols is not None:
            compact_(t, cols, 1, impl=impl, release=release, n_threads=n_threads)
        return t
    rows = _check(t, rows, 0)
    cols = _check(t, cols, 1)
    from minitron_fast._ext import _C

    data = t.data if isinstance(t, torch.nn.Parameter) else t
    old_bytes = t.numel() * t.element_size()
    nt = torch.get_num_threads() if n_threads is None else n_threads
    with torch.no_grad():
        if t.numel() and rows.numel() and cols.numel():
            used = _C.compact_2d(data.data_ptr(), t.shape[0], t.shape[1], t.element_size(), rows.numpy(),
                                 cols.numpy(), nt)
            if release:
                _C.release_tail(data.data_ptr(), used, old_bytes)
        t.data = data.as_strided((rows.numel(), cols.numel()), (cols.numel(), 1))
    return t
