"""Importance statistics fused into the ops that produce the activations (forward only).

Every kernel reads an activation tile once, (optionally) writes the op's normal output, and adds
per-sample, per-unit sums over valid tokens into small fp32 buffers with atomics:

    s1[b, u] += sum_t m[b, t] * a[b, t, u]        s2[b, u] += sum_t m[b, t] * a[b, t, u]**2

where ``a`` is ``|y|`` for norm outputs and SwiGLU outputs (neurons), the per-token L2 norm of
each head's slice for attention outputs, and ``m`` the attention mask (1 valid, 0 padding).
Sequence aggregation (mean, l2, var) and batch aggregation happen on these [B, U] sums in torch.
Tokens are flattened as row ``b * T + t`` of a contiguous ``[B*T, C]`` matrix.

Bytes per call (E = element size, R = B*T rows):
- ``_swiglu_stats_kernel``: reads gate, up (2*R*F*E), writes h (R*F*E): the same bytes as the
  unfused ``silu(gate) * up`` minus its temporary; the stats add only atomics on [B, F].
- ``_rmsnorm_stats_kernel``: reads x twice (the second pass mostly from L2) and w, writes y
  (R*H*E): an RMSNorm's own traffic.
- ``_head_stats_kernel``: reads the o_proj input once (R*nh*hd*E), writes nothing but [B, nh]:
  one extra read of that activation (it is not fused into the attention epilogue).
- ``_block_cos_kernel``: reads layer input and output (2*R*H*E), writes [B]: one extra read of
  both (the residual add that makes the output lives inside HF's decoder layer).
FLOPs are a few per element in all four; they are bandwidth-bound.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import on_tensor_device


@triton.jit
def _swiglu_stats_kernel(g_ptr, u_ptr, h_ptr, mask_ptr, s1_ptr, s2_ptr, T, F, n_tblocks,
                         HAS_MASK: tl.constexpr, WANT_S1: tl.constexpr, WANT_S2: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, ACT: tl.constexpr = 0):
    pid = tl.program_id(0)
    pid_f = tl.program_id(1)
    b = pid // n_tblocks
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    tmask = t < T
    fmask = f < F
    rows = (b * T + t).to(tl.int64)  # R * F can pass 2**31
    offs = rows[:, None] * F + f[None, :]  # [BLOCK_T, BLOCK_F]
    m2 = tmask[:, None] & fmask[None, :]
    g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    if ACT == 0:  # silu (Llama, Qwen, Mistral, Phi-3)
        h = (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty)
    else:  # gelu-tanh (Gemma): 0.5 g (1 + tanh(z)) == g * sigmoid(2 z), z = sqrt(2/pi) (g + 0.044715 g^3)
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        h = (g * tl.sigmoid(2.0 * z) * u).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + offs, h, mask=m2)
    # statistics of the value down_proj actually sees (rounded to the output dtype)
    a = tl.abs(h.to(tl.float32))
    if HAS_MASK:
        w = tl.load(mask_ptr + b * T + t, mask=tmask, other=0.0)  # [BLOCK_T]
        a = tl.where(w[:, None] > 0, a, 0.0)  # where, not *: padded rows may hold NaN
    if WANT_S1:
        tl.atomic_add(s1_ptr + b * F + f, tl.sum(a, axis=0), mask=fmask)
    if WANT_S2:
        tl.atomic_add(s2_ptr + b * F + f, tl.sum(a * a, axis=0), mask=fmask)


@triton.jit
def _rmsnorm_stats_kernel(x_ptr, w_ptr, y_ptr, mask_ptr, s1_ptr, s2_ptr, T, H, eps, n_tblocks,
                          HAS_MASK: tl.constexpr, WANT_S1: tl.constexpr, WANT_S2: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, OFFSET: tl.constexpr = 0.0):
    pid = tl.program_id(0)
    b = pid // n_tblocks
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    tmask = t < T
    rows = (b * T + t).to(tl.int64)
    # pass 1: mean square per token, in fp32 like HF's RMSNorm
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        m2 = tmask[:, None] & (hh < H)[None, :]
        x = tl.load(x_ptr + rows[:, None] * H + hh[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(acc / H + eps)  # [BLOCK_T]
    if HAS_MASK:
        wt = tl.load(mask_ptr + b * T + t, mask=tmask, other=0.0)
    # pass 2: y = w * (x * rstd cast back to x's dtype), as HF's Llama computes it, or with a
    # weight offset (Gemma) y = (x * rstd * (OFFSET + w)) in fp32, cast once; stats of y
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hmask = hh < H
        m2 = tmask[:, None] & hmask[None, :]
        offs = rows[:, None] * H + hh[None, :]  # [BLOCK_T, BLOCK_H]
        xr = tl.load(x_ptr + offs, mask=m2, other=0.0)
        w = tl.load(w_ptr + hh, mask=hmask, other=0.0).to(tl.float32)  # [BLOCK_H]
        if OFFSET == 0.0:
            xn = (xr.to(tl.float32) * rstd[:, None]).to(xr.dtype).to(tl.float32)
            y = (w[None, :] * xn).to(y_ptr.dtype.element_ty)
        else:
            y = (xr.to(tl.float32) * rstd[:, None] * (OFFSET + w[None, :])).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, y, mask=m2)
        a = tl.abs(y.to(tl.float32))
        if HAS_MASK:
            a = tl.where(wt[:, None] > 0, a, 0.0)
        if WANT_S1:
            tl.atomic_add(s1_ptr + b * H + hh, tl.sum(a, axis=0), mask=hmask)
        if WANT_S2:
            tl.atomic_add(s2_ptr + b * H + hh, tl.sum(a * a, axis=0), mask=hmask)


@triton.jit
def _head_stats_kernel(x_ptr, mask_ptr, s1_ptr, s2_ptr, T, NH, HD, n_tblocks,
                       HAS_MASK: tl.constexpr, WANT_S1: tl.constexpr, WANT_S2: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    hd_id = tl.program_id(1)
    b = pid // n_tblocks
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    tmask = t < T
    rows = (b * T + t).to(tl.int64)
    offs = rows[:, None] * (NH * HD) + hd_id * HD + d[None, :]  # [BLOCK_T, BLOCK_D]
    x = tl.load(x_ptr + offs, mask=tmask[:, None] & (d < HD)[None, :], other=0.0).to(tl.float32)
    n = tl.sqrt(tl.sum(x * x, axis=1))  # [BLOCK_T] per-token norm of this head's output
    if HAS_MASK:
        n = tl.where(tl.load(mask_ptr + b * T + t, mask=tmask, other=0.0) > 0, n, 0.0)
    if WANT_S1:
        tl.atomic_add(s1_ptr + b * NH + hd_id, tl.sum(n, axis=0))
    if WANT_S2:
        tl.atomic_add(s2_ptr + b * NH + hd_id, tl.sum(n * n, axis=0))


@triton.jit
def _block_cos_kernel(x_ptr, y_ptr, mask_ptr, out_ptr, T, H, eps, n_tblocks,
                      HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_tblocks
    t = (pid % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    tmask = t < T
    rows = (b * T + t).to(tl.int64)
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    nx = tl.zeros([BLOCK_T], dtype=tl.float32)
    ny = tl.zeros([BLOCK_T], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        m2 = tmask[:, None] & (hh < H)[None, :]
        offs = rows[:, None] * H + hh[None, :]  # [BLOCK_T, BLOCK_H]
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        dot += tl.sum(x * y, axis=1)
        nx += tl.sum(x * x, axis=1)
        ny += tl.sum(y * y, axis=1)
    cos = dot / tl.maximum(tl.sqrt(nx) * tl.sqrt(ny), eps)  # [BLOCK_T]
    cos = tl.where(tmask, cos, 0.0)
    if HAS_MASK:
        cos = tl.where(tl.load(mask_ptr + b * T + t, mask=tmask, other=0.0) > 0, cos, 0.0)
    tl.atomic_add(out_ptr + b, tl.sum(cos, axis=0))


# -- launchers ---------------------------------------------------------------------------------

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _bt(T: int) -> int:
    # The interpreter pays per program: one block of tokens per sample there.
    if _interpreted():
        return max(16, triton.next_power_of_2(T))
    return 16


def _mask_arg(mask: torch.Tensor | None, ref: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if mask is None:
        return ref, False  # never read (HAS_MASK=False)
    return mask.to(torch.float32).contiguous(), True


def _stat_args(s1, s2, ref):
    return (s1 if s1 is not None else ref, s2 if s2 is not None else ref, s1 is not None, s2 is not None)


ACT_CODES = {"silu": 0, "gelu_tanh": 1}


@on_tensor_device
def swiglu_stats(gate: torch.Tensor, up: torch.Tensor, mask: torch.Tensor | None, s1: torch.Tensor | None,
                 s2: torch.Tensor | None, act: str = "silu") -> torch.Tensor:
    """h = act(gate) * up ``[B, T, F]`` (``act``: "silu" or "gelu_tanh"); adds sums of ``|h|`` (s1)
    and ``h**2`` (s2) over valid tokens into ``[B, F]`` fp32 buffers."""
    B, T, F = gate.shape
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    m, has_m = _mask_arg(mask, gate)
    a1, a2, w1, w2 = _stat_args(s1, s2, gate)
    bt = _bt(T)
    bf = min(128 if not _interpreted() else 1024, triton.next_power_of_2(F))
    nt = triton.cdiv(T, bt)
    _swiglu_stats_kernel[(B * nt, triton.cdiv(F, bf))](gate, up, h, m, a1, a2, T, F, nt, HAS_MASK=has_m,
                                                       WANT_S1=w1, WANT_S2=w2, BLOCK_T=bt, BLOCK_F=bf,
                                                       ACT=ACT_CODES[act])
    return h


@on_tensor_device
def rmsnorm_stats(x: torch.Tensor, weight: torch.Tensor, eps: float, mask: torch.Tensor | None,
                  s1: torch.Tensor | None, s2: torch.Tensor | None, offset: float = 0.0) -> torch.Tensor:
    """HF RMSNorm of ``x [B, T, H]`` (``offset`` 1: Gemma's ``(1 + w)``, output in x's dtype); adds
    sums of ``|y|`` and ``y**2`` over valid tokens into ``[B, H]`` fp32 buffers."""
    B, T, H = x.shape
    x = x.contiguous()
    ydt = torch.result_type(weight, x) if offset == 0.0 else x.dtype
    y = torch.empty(x.shape, dtype=ydt, device=x.device)
    m, has_m = _mask_arg(mask, x)
    a1, a2, w1, w2 = _stat_args(s1, s2, x)
    bt = _bt(T)
    bh = min(128 if not _interpreted() else 8192, triton.next_power_of_2(H))
    nt = triton.cdiv(T, bt)
    _rmsnorm_stats_kernel[(B * nt,)](x, weight.contiguous(), y, m, a1, a2, T, H, float(eps), nt, HAS_MASK=has_m,
                                     WANT_S1=w1, WANT_S2=w2, BLOCK_T=bt, BLOCK_H=bh, OFFSET=float(offset))
    return y


@on_tensor_device
def head_stats(x: torch.Tensor, n_heads: int, mask: torch.Tensor | None, s1: torch.Tensor | None,
               s2: torch.Tensor | None) -> None:
    """Adds sums over valid tokens of each head's per-token L2 norm (s1) and squared norm (s2) of
    ``x [B, T, n_heads * head_dim]`` into ``[B, n_heads]`` fp32 buffers."""
    B, T, C = x.shape
    hd = C // n_heads
    x = x.contiguous()
    m, has_m = _mask_arg(mask, x)
    a1, a2, w1, w2 = _stat_args(s1, s2, x)
    bt = _bt(T)
    nt = triton.cdiv(T, bt)
    _head_stats_kernel[(B * nt, n_heads)](x, m, a1, a2, T, n_heads, hd, nt, HAS_MASK=has_m, WANT_S1=w1,
                                          WANT_S2=w2, BLOCK_T=bt, BLOCK_D=triton.next_power_of_2(hd))


@on_tensor_device
def block_cos(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor, eps: float = 1e-8) -> None:
    """Adds the sum over valid tokens of cos(x[b, t], y[b, t]) into ``out [B]`` (fp32);
    ``x, y: [B, T, H]``."""
    B, T, H = x.shape
    x, y = x.contiguous(), y.contiguous()
    m, has_m = _mask_arg(mask, x)
    bt = _bt(T)
    bh = min(128 if not _interpreted() else 8192, triton.next_power_of_2(H))
    nt = triton.cdiv(T, bt)
    _block_cos_kernel[(B * nt,)](x, y, m, out, T, H, float(eps), nt, HAS_MASK=has_m, BLOCK_T=bt, BLOCK_H=bh)


# -- ahead-of-time compilation specs for the kernel report -------------------------------------

def _specs() -> list[dict]:
    specs = []
    for dt, act in (("bf16", "silu"), ("fp16", "silu"), ("fp32", "silu"), ("bf16", "gelu_tanh")):
        p = f"*{dt}"
        specs.append({
            "name": f"importance_swiglu_stats[{dt},{act},BLOCK_T=16,BLOCK_F=128]", "fn": _swiglu_stats_kernel,
            "signature": {"g_ptr": p, "u_ptr": p, "h_ptr": p, "mask_ptr": "*fp32", "s1_ptr": "*fp32",
                          "s2_ptr": "*fp32", "T": "i32", "F": "i32", "n_tblocks": "i32", "HAS_MASK": "constexpr",
                          "WANT_S1": "constexpr", "WANT_S2": "constexpr", "BLOCK_T": "constexpr",
                          "BLOCK_F": "constexpr", "ACT": "constexpr"},
            "constexprs": {"HAS_MASK": True, "WANT_S1": True, "WANT_S2": True, "BLOCK_T": 16, "BLOCK_F": 128,
                           "ACT": ACT_CODES[act]},
            "num_warps": 4, "num_stages": 1,
            "flops": "~6*R*F (silu, product, abs, square, two sums)",
            "min_bytes": "3*R*F*E (read gate, up; write h) + atomics 2*B*F*4*ceil(T/16)"})
        off = 1.0 if act == "gelu_tanh" else 0.0  # the Gemma variant: (1 + w) with its GELU-tanh MLP
        specs.append({
            "name": f"importance_rmsnorm_stats[{dt},offset={off:g},BLOCK_T=16,BLOCK_H=128]", "fn": _rmsnorm_stats_kernel,
            "signature": {"x_ptr": p, "w_ptr": p, "y_ptr": p, "mask_ptr": "*fp32", "s1_ptr": "*fp32",
                          "s2_ptr": "*fp32", "T": "i32", "H": "i32", "eps": "fp32", "n_tblocks": "i32",
                          "HAS_MASK": "constexpr", "WANT_S1": "constexpr", "WANT_S2": "constexpr",
                          "BLOCK_T": "constexpr", "BLOCK_H": "constexpr", "OFFSET": "constexpr"},
            "constexprs": {"HAS_MASK": True, "WANT_S1": True, "WANT_S2": True, "BLOCK_T": 16, "BLOCK_H": 128,
                           "OFFSET": off},
            "num_warps": 4, "num_stages": 1,
            "flops": "~8*R*H", "min_bytes": "2*R*H*E (read x, write y) + H*E; x is read twice (2nd from L2)"})
        if act != "silu":
            continue  # head and cosine kernels do not depend on the family
        specs.append({
            "name": f"importance_head_stats[{dt},BLOCK_T=16,BLOCK_D=128]", "fn": _head_stats_kernel,
            "signature": {"x_ptr": p, "mask_ptr": "*fp32", "s1_ptr": "*fp32", "s2_ptr": "*fp32", "T": "i32",
                          "NH": "i32", "HD": "i32", "n_tblocks": "i32", "HAS_MASK": "constexpr",
                          "WANT_S1": "constexpr", "WANT_S2": "constexpr", "BLOCK_T": "constexpr",
                          "BLOCK_D": "constexpr"},
            "constexprs": {"HAS_MASK": True, "WANT_S1": True, "WANT_S2": True, "BLOCK_T": 16, "BLOCK_D": 128},
            "num_warps": 4, "num_stages": 1,
            "flops": "~2*R*nh*hd", "min_bytes": "R*nh*hd*E (one read of the o_proj input)"})
        specs.append({
            "name": f"importance_block_cos[{dt},BLOCK_T=16,BLOCK_H=128]", "fn": _block_cos_kernel,
            "signature": {"x_ptr": p, "y_ptr": p, "mask_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "H": "i32",
                          "eps": "fp32", "n_tblocks": "i32", "HAS_MASK": "constexpr", "BLOCK_T": "constexpr",
                          "BLOCK_H": "constexpr"},
            "constexprs": {"HAS_MASK": True, "BLOCK_T": 16, "BLOCK_H": 128},
            "num_warps": 4, "num_stages": 1,
            "flops": "~6*R*H", "min_bytes": "2*R*H*E (one read of layer input and output)"})
    return specs


AOT_SPECS = _specs()
