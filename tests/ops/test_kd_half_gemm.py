"""The fused loss's CUDA half-precision branch, run on the CPU (GPU-path defects: fp16 gradients
flushed to zero; the dW GEMM ran in full fp32).

On the CPU a half head normally takes the blocked fp32 emulation, which hides what the CUDA branch
does: here ``LinearSource.CPU_HALF_EMULATION = False`` runs the CUDA branch itself (the chunk's
dL/dz rounded to the head's dtype, the GEMMs through ``mm_f32_``; on the CPU ``mm_f32_`` takes its
fallback, an fp32 GEMM of the same rounded operands, which is what cuBLAS computes with fp32
accumulation). Judged against float64.
"""
from __future__ import annotations

import pytest
import torch

from minitron_fast.ops.kd_loss import fused_linear_kd_loss
from minitron_fast.ops.kd_loss import sources
from minitron_fast.ops.kd_loss.reference import kd_loss_reference


@pytest.fixture
def cuda_half_branch(monkeypatch):
    monkeypatch.setattr(sources.LinearSource, "CPU_HALF_EMULATION", False)


def _case(dtype, N=37, H=24, V=211, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 0.5).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_()
    th = torch.randn(N, H, generator=g).to(dtype)
    tw = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    return h, W, th, tw


@pytest.mark.parametrize("num_items", [None, 10**6, 10**8], ids=["mean", "ga-1e6", "ga-1e8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_head_gradients_match_float64_at_any_token_count(cuda_half_branch, dtype, num_items):
    """``num_items`` (gradient accumulation's token count) makes each row's dL/dz ~1/num_items: at
    1e6-1e8 those are 1e-8 to 1e-10, below fp16's smallest subnormal (6e-8). The loss scale of fp16
    training (65,536 here, as a GradScaler's) arrives only in backward, after the forward had
    rounded dL/dz to fp16: without the power-of-two scale every fp16 gradient was exactly zero."""
    h, W, th, tw = _case(dtype)
    loss = fused_linear_kd_loss(h, W, th, tw, reduction="mean", num_items=num_items, impl="torch")
    loss_scale = 65536.0
    gh, gw = torch.autograd.grad(loss * loss_scale, (h, W))
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = kd_loss_reference(h64 @ W64.t(), th.double() @ tw.double().t(), reduction="mean", num_items=num_items)
    rh, rw = torch.autograd.grad(ref * loss_scale, (h64, W64))
    for got, want, name in ((gh, rh, "dh"), (gw, rw, "dW")):
        assert got.dtype == dtype
        assert got.abs().max() > 0, f"{name} flushed to zero"
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        # the operands are rounded to the head's dtype; a relative error of a few ulps of it
        assert err < (8e-3 if dtype == torch.float16 else 4e-2), (name, err)


def test_fp16_grad_scale_is_a_power_of_two_from_host_numbers():
    from minitron_fast.ops.kd_loss.options import _Cfg

    cfg = _Cfg(divergence="forward_kl", beta=0.5, temperature=1.0, t2_scaling=False, hard_label_weight=0.0,
               ignore_index=-100, chunk_size=0, impl="torch")
    for divisor in (1, 7, 1000, 10**6, 10**9):
        s = sources.fp16_grad_scale(divisor, cfg)
        assert s >= 1 and s == 2.0 ** round(torch.tensor(s).log2().item())
        # bound 4 here: the largest |dL/dz| (<= 2 / divisor) lands in (1/4, 1/2] after scaling
        assert s == 1.0 if divisor < 8 else divisor / 8 < s <= divisor / 4


def test_half_gemms_take_out_dtype_with_no_head_sized_temporary():
    """Where torch has ``mm/addmm(out_dtype=float32)`` (CUDA, and the meta device that mirrors it),
    ``mm_f32_`` uses it: dW accumulates in place, no ``[V, H]`` fp32 temporary and no fp32 GEMM."""
    sources._OUT_DTYPE.pop("meta", None)
    V, H, c = 128_256, 4096, 512
    dw = torch.empty(V, H, device="meta")
    g = torch.empty(c, V, dtype=torch.float16, device="meta")
    hc = torch.empty(c, H, dtype=torch.float16, device="meta")
    sources.mm_f32_(dw, g.t(), hc, accumulate=True, alpha=0.5)
    dh = torch.empty(c, H, device="meta")
    sources.mm_f32_(dh, g, torch.empty(V, H, dtype=torch.float16, device="meta"))
    assert sources._OUT_DTYPE["meta"] is True
