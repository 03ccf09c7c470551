"""In-place compaction of kept rows or columns of a contiguous CUDA tensor (the pruning primitive
on GPU). The kernels gather; the launcher schedules rounds so no program writes a byte another
program of the same launch still has to read (the same schedule as ``csrc/compact.cpp``):

- output rows ``[a, b)`` can go straight to their place when their destination bytes end before
  the first source byte of row ``a``;
- where that round would be too small (the start of the buffer), the round is gathered into a
  bounded staging buffer and copied back.

Public entry: ``minitron_fast.ops.compact.compact_(t, kept, dim, impl="triton")``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_tensor_device


@triton.jit
def _gather_rows_kernel(src_ptr, dst_ptr, kept_ptr, n_out, n_cols,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # dst[i, :] = src[kept[i], :] for the n_out rows of this round; kept_ptr points at the round's indices.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    rm = r < n_out
    cm = c < n_cols
    src_r = tl.load(kept_ptr + r, mask=rm, other=0).to(tl.int64)  # [BLOCK_R]
    m = rm[:, None] & cm[None, :]
    c64 = c.to(tl.int64)
    # int64 offsets: rows * cols passes 2**31 on embeddings of 128k vocabularies
    x = tl.load(src_ptr + src_r[:, None] * n_cols + c64[None, :], mask=m)  # [BLOCK_R, BLOCK_C]
    tl.store(dst_ptr + r.to(tl.int64)[:, None] * n_cols + c64[None, :], x, mask=m)


@triton.jit
def _gather_cols_kernel(src_ptr, dst_ptr, kept_ptr, n_rows, n_cols, n_kept,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # dst[r, j] = src[r, kept[j]] for the n_rows rows of this round (src_ptr, dst_ptr at row 0 of the round).
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BLOCK_R]
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
    rm = r < n_rows
    km = k < n_kept
    col = tl.load(kept_ptr + k, mask=km, other=0).to(tl.int64)  # [BLOCK_K]
    m = rm[:, None] & km[None, :]
    x = tl.load(src_ptr + r[:, None] * n_cols + col[None, :], mask=m)  # [BLOCK_R, BLOCK_K]
    tl.store(dst_ptr + r[:, None] * n_kept + k.to(tl.int64)[None, :], x, mask=m)


_BLOCK_R, _BLOCK_C = 16, 256


@on_tensor_device
def _launch_rows(src: torch.Tensor, dst: torch.Tensor, kept: torch.Tensor, n_cols: int) -> None:
    n = kept.numel()
    grid = (triton.cdiv(n, _BLOCK_R), triton.cdiv(max(n_cols, 1), _BLOCK_C))
    _gather_rows_kernel[grid](src, dst, kept, n, n_cols, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=4)


@on_tensor_device
def _launch_cols(src: torch.Tensor, dst: torch.Tensor, kept: torch.Tensor, n_rows: int, n_cols: int) -> None:
    k = kept.numel()
    grid = (triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(k, _BLOCK_C))
    _gather_cols_kernel[grid](src, dst, kept, n_rows, n_cols, k, BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_C, num_warps=4)


def compact_triton_(flat: torch.Tensor, n_rows: int, n_cols: int, kept: torch.Tensor, dim: int, *,
                    stage_bytes: int = 64 << 20, min_direct_bytes: int = 1 << 20) -> int:
    """Compacts the contiguous ``[n_rows, n_cols]`` buffer ``flat`` (1-D view of it) in place,
    keeping ``kept`` (int64, sorted, on ``flat``'s device) along ``dim``. Returns the elements
    now in use. Staging memory is bounded by ``stage_bytes``."""
    es = flat.element_size()
    if dim == 0:
        n_out, unit = kept.numel(), n_cols
        gap = kept - torch.arange(n_out, device=kept.device)  # non-decreasing
        gaps = gap.tolist()  # host copy of the schedule (one sync)
        first = next((i for i, g in enumerate(gaps) if g != 0), n_out)
        safe = lambda a: gaps[a]  # noqa: E731
    else:
        n_out, unit = n_rows, kept.numel()
        if unit == n_cols:
            return n_rows * n_cols
        first = 0
        safe = lambda a: (a * (n_cols - unit)) // unit  # noqa: E731
    stage_units = max(1, stage_bytes // max(unit * es, 1))
    stage = None
    a = first
    while a < n_out:
        s = min(safe(a), n_out - a)
        direct = s >= 1 and (s * unit * es >= min_direct_bytes or a + s >= n_out)
        b = a + s if direct else min(n_out, a + stage_units)
        dst = flat[a * unit: b * unit]
        if not direct:
            if stage is None:
                stage = torch.empty(stage_units * unit, dtype=flat.dtype, device=flat.device)
            out = stage[: (b - a) * unit]
        else:
            out = dst
        if dim == 0:
            _launch_rows(flat, out, kept[a:b], n_cols)
        else:
            _launch_cols(flat[a * n_cols:], out, kept, b - a, n_cols)
        if not direct:
            dst.copy_(out)
        a = b
    return n_out * unit


def _specs() -> list[dict]:
    specs = []
    for dt in ("fp32", "bf16", "fp16", "i8"):
        p = f"*{dt}"
        specs.append({
            "name": f"compact_gather_rows[{dt},BLOCK_R=16,BLOCK_C=256]", "fn": _gather_rows_kernel,
            "signature": {"src_ptr": p, "dst_ptr": p, "kept_ptr": "*i64", "n_out": "i32", "n_cols": "i32",
                          "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
            "constexprs": {"BLOCK_R": 16, "BLOCK_C": 256}, "num_warps": 4, "num_stages": 1,
            "flops": "0 (data movement)", "min_bytes": "2*K*C*E (read kept rows, write them) + 8*K"})
        specs.append({
            "name": f"compact_gather_cols[{dt},BLOCK_R=16,BLOCK_K=256]", "fn": _gather_cols_kernel,
            "signature": {"src_ptr": p, "dst_ptr": p, "kept_ptr": "*i64", "n_rows": "i32", "n_cols": "i32",
                          "n_kept": "i32", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
            "constexprs": {"BLOCK_R": 16, "BLOCK_K": 256}, "num_warps": 4, "num_stages": 1,
            "flops": "0 (data movement)", "min_bytes": "2*R*K*E (read kept columns, write them) + 8*K"})
    return specs


AOT_SPECS = _specs()
