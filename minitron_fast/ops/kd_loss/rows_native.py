"""The native row implementations of one chunk: the C++ rows (``csrc/kd_rows.cpp``, ``impl="cpp"``)
and the Triton kernel (``kernels/kd_loss.py``, ``impl="triton"``). Both take the student's and the
teacher's scaled logits in fp32 row buffers and overwrite the student's with dL/dz_s."""
from __future__ import annotations

import torch

from minitron_fast.ops.kd_loss.divergences import REGISTRY


def chunk_cpp(S, Tt, a, cfg, need_grad):
    """Dense forward KL in the C++ row kernel: three passes over each row instead of ~20, fp64 row
    sums across blocks. Returns (kd_rows, G = S)."""
    from minitron_fast._ext import _C

    c, V = S.shape
    g = (a * (cfg.kd_scale / cfg.temperature)).contiguous()
    kd_rows = torch.empty(c, dtype=torch.float32)
    _C.kd_forward_kl_rows(S.data_ptr(), S.stride(0), Tt.data_ptr(), Tt.stride(0), g.data_ptr(), kd_rows.data_ptr(),
                          c, V, bool(need_grad), torch.get_num_threads())
    return kd_rows, S


def chunk_triton(S, Tt, a, cfg, need_grad):
    """Dense-teacher rows of every divergence in one Triton kernel launch per chunk."""
    from minitron_fast.kernels import kd_loss as kd_kernels

    kd_rows = torch.empty(S.shape[0], dtype=torch.float32, device=S.device)
    kd_kernels.kd_softmax(S, Tt, a.contiguous(), kd_rows, div_code=REGISTRY[cfg.divergence].code, beta=cfg.beta,
                          g_mult=cfg.kd_scale / cfg.temperature, write_grad=need_grad)
    return kd_rows, S


def chunk_cpp_div(S, teacher, a, cfg, need_grad):
    """Reverse KL / JSD with a dense teacher (``kd_div_rows``: four passes per row), and every
    divergence against a top-k teacher with or without its tail bucket (``kd_topk_rows``), in the
    C++ rows. ``teacher``: ``("dense", Tt)`` or ``("topk", vals, idx, tail)`` (scaled). Returns
    (kd_rows, G = S)."""
    from minitron_fast._ext import _C

    c, V = S.shape
    code = REGISTRY[cfg.divergence].code
    g = (a * (cfg.kd_scale / cfg.temperature)).contiguous()
    kd_rows = torch.empty(c, dtype=torch.float32)
    threads = torch.get_num_threads()
    if teacher[0] == "dense":
        Tt = teacher[1]
        _C.kd_div_rows(code, cfg.beta, S.data_ptr(), S.stride(0), Tt.data_ptr(), Tt.stride(0), g.data_ptr(),
                       kd_rows.data_ptr(), c, V, bool(need_grad), threads)
        return kd_rows, S
    _, vals, idx, tail = teacher
    vals = vals.float().contiguous()
    idx = idx.long().contiguous()
    tail = None if tail is None else tail.float().contiguous()
    _C.kd_topk_rows(code, cfg.beta, S.data_ptr(), S.stride(0), idx.data_ptr(), vals.data_ptr(), vals.shape[1],
                    0 if tail is None else tail.data_ptr(), g.data_ptr(), kd_rows.data_ptr(), c, V, bool(need_grad),
                    threads)
    return kd_rows, S
