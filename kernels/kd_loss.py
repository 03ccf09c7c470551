"""Triton kernel for the KD loss's per-chunk softmax work: loss rows and dlogits in one kernel.

The chunk's GEMMs (student and teacher logits, then dX and dW from the dlogits) stay cuBLAS
GEMMs (``minitron_fast/ops/kd_loss/sources.py``); this kernel replaces the ~20 elementwise passes of the
torch path by one program per token that streams the vocabulary in ``BLOCK_V`` blocks:

- pass 1: online log-sum-exp of the student's and teacher's scaled logits (and, for forward KL,
  the running ``sum exp(t - m_t) (t - s)``, rescaled as the max moves);
- pass 2 (reverse KL, JSD only): the row sums the gradient needs (the row's KL);
- last pass: dL/dz written in place over the student's logits, scaled by the row's weight.

Cost per chunk of ``c`` tokens over a vocabulary ``V`` (fp32 buffers):
    FLOPs: about ``c * V * 12`` (forward KL; 2 exp + ~10 flops per element per pass), ~``c*V*30``
        for JSD; negligible next to the chunk's GEMMs (``2 c V (Ht + 3 Hs)``).
    minimal bytes: ``3 * 4 * c * V`` (read student and teacher logits once, write dlogits once);
        this kernel moves ``(2 * passes + 1) * 4 * c * V`` (passes = 2 for forward KL, 3 otherwise),
        all with unit stride.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import on_tensor_device

# DIV: the divergence registry's code (minitron_fast/ops/kd_loss/divergences.py): 0 forward KL,
# 1 reverse KL, 2 JSD. The ops layer passes it; this module does not import the ops layer.


@triton.jit
def _kd_softmax_kernel(
    S_ptr,  # [c, V] fp32 student logits / T, overwritten by dL/dz_s
    T_ptr,  # [c, V] fp32 teacher logits / T (read only)
    A_ptr,  # [c] fp32 per-row gradient scale (0 on ignored rows)
    L_ptr,  # [c] fp32 out: the row's divergence (unscaled)
    V,
    stride_s,
    stride_t,
    beta,  # jsd's beta
    g_mult,  # kd_scale / T: d/du -> d/dz and the optional T^2
    DIV: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 at 128k vocabularies
    s_row = S_ptr + row * stride_s
    t_row = T_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    NEG_INF: tl.constexpr = float("-inf")

    # ---- pass 1: online log-sum-exp of both rows (scalar running max / sum per row)
    m_s = tl.full((), NEG_INF, tl.float32)
    d_s = tl.zeros((), tl.float32)
    m_t = tl.full((), NEG_INF, tl.float32)
    d_t = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)  # forward KL: sum exp(t - m_t) * (t - s)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=NEG_INF)  # [BLOCK_V]
        t = tl.load(t_row + cols, mask=mask, other=NEG_INF)
        new_ms = tl.maximum(m_s, tl.max(s, 0))
        new_mt = tl.maximum(m_t, tl.max(t, 0))
        d_s = d_s * tl.exp(m_s - new_ms) + tl.sum(tl.where(mask, tl.exp(s - new_ms), 0.0), 0)
        et = tl.where(mask, tl.exp(t - new_mt), 0.0)
        corr_t = tl.exp(m_t - new_mt)
        d_t = d_t * corr_t + tl.sum(et, 0)
        if DIV == 0:
            # et == 0 where t is masked or -1e30 (clamped -inf): drop those products explicitly
            acc = acc * corr_t + tl.sum(tl.where(et > 0, et * (t - s), 0.0), 0)
        m_s = new_ms
        m_t = new_mt
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)

    one_m_beta = 1.0 - beta
    log_beta = tl.log(beta)
    log_1mb = tl.log(one_m_beta)
    kd = tl.zeros((), tl.float32)
    qbar = tl.zeros((), tl.float32)  # <p_s, q> / sum p_s: centres the gradient row (sums to 0)
    if DIV == 0:
        kd = acc / d_t - lse_t + lse_s
    else:
        # ---- pass 2: the row sums reverse KL and JSD need before their gradient, per element
        # first from d = log p_s - log p_t (no difference of two ~log V row sums)
        sum_ps = tl.zeros((), tl.float32)
        sum_pq = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
            ls = tl.load(s_row + cols, mask=mask, other=0.0) - lse_s
            lt = tl.load(t_row + cols, mask=mask, other=0.0) - lse_t
            ps = tl.where(mask, tl.exp(ls), 0.0)
            d = ls - lt
            sum_ps += tl.sum(ps, 0)
            if DIV == 1:
                pq = tl.where(ps > 0, ps * d, 0.0)
                kd += tl.sum(pq, 0)
            else:
                pt = tl.where(mask, tl.exp(lt), 0.0)
                # log p_s - log m = -log((1 - beta) + beta e^-d); log p_t - log m = -log(beta + (1 - beta) e^d)
                x1 = log_beta - d
                m1 = tl.maximum(x1, log_1mb)
                rs = -(m1 + tl.log(tl.exp(x1 - m1) + tl.exp(log_1mb - m1)))
                x2 = log_1mb + d
                m2 = tl.maximum(x2, log_beta)
                rt = -(m2 + tl.log(tl.exp(x2 - m2) + tl.exp(log_beta - m2)))
                pq = tl.where(ps > 0, ps * rs, 0.0)
                kd += tl.sum(tl.where(pt > 0, beta * pt * rt, 0.0) + one_m_beta * pq, 0)
            sum_pq += tl.sum(pq, 0)
        qbar = sum_pq / sum_ps
    tl.store(L_ptr + row, kd)

    if WRITE_GRAD:
        # ---- last pass: dL/dz_s = a * g_mult * (dD/du_s), in place over the student's logits
        coef = tl.load(A_ptr + row) * g_mult
        inv_ds = 1.0 / d_s
        inv_dt = 1.0 / d_t
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
            ls = tl.load(s_row + cols, mask=mask, other=0.0) - lse_s
            lt = tl.load(t_row + cols, mask=mask, other=0.0) - lse_t
            ps = tl.exp(ls)
            if DIV == 0:
                # normalized by the accumulated sums themselves (not exp(x - lse)): each of
                # p_s, p_t sums to 1 up to the rounding of those sums, so the row of g sums to ~0
                s = tl.load(s_row + cols, mask=mask, other=NEG_INF)
                t = tl.load(t_row + cols, mask=mask, other=NEG_INF)
                g = tl.exp(s - m_s) * inv_ds - tl.exp(t - m_t) * inv_dt
            elif DIV == 1:
                g = tl.where(ps > 0, ps * (ls - lt - qbar), 0.0)
            else:
                x1 = log_beta - (ls - lt)
                m1 = tl.maximum(x1, log_1mb)
                rs = -(m1 + tl.log(tl.exp(x1 - m1) + tl.exp(log_1mb - m1)))
                g = tl.where(ps > 0, one_m_beta * ps * (rs - qbar), 0.0)
            tl.store(s_row + cols, g * coef, mask=mask)


@on_tensor_device
def kd_softmax(S, Tt, a, kd_rows, *, div_code: int, beta: float, g_mult: float, write_grad: bool = True,
               block_v: int | None = None, num_warps: int = 8) -> None:
    """Launches one program per row of the chunk; ``div_code``: the divergence registry's code.

    S: ``[c, V]`` fp32 (student logits / T; overwritten by dL/dz_s when ``write_grad``);
    Tt: ``[c, V]`` fp32 (teacher logits / T); a: ``[c]`` fp32 row scales; kd_rows: ``[c]`` fp32 out.
    """
    c, V = S.shape
    assert S.stride(1) == 1 and Tt.stride(1) == 1 and S.dtype == Tt.dtype == a.dtype == kd_rows.dtype
    if block_v is None:
        block_v = min(4096, triton.next_power_of_2(V))
    _kd_softmax_kernel[(c,)](S, Tt, a, kd_rows, V, S.stride(0), Tt.stride(0), float(beta), float(g_mult),
                             DIV=int(div_code), WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=num_warps)


_SIG = {"S_ptr": "*fp32", "T_ptr": "*fp32", "A_ptr": "*fp32", "L_ptr": "*fp32", "V": "i32", "stride_s": "i32",
        "stride_t": "i32", "beta": "fp32", "g_mult": "fp32"}
_FLOPS = "about 12*c*V (forward_kl) to 30*c*V (jsd) per chunk of c tokens"
_BYTES = "minimal 12*c*V (read s, t once, write dlogits); moves (2*passes+1)*4*c*V"

# Kernels compiled ahead of time by `python -m bench kernel_report` (kernels/__init__.py convention).
AOT_SPECS = [
    {"name": f"kd_softmax[{div},BLOCK_V={bv},warps={nw}]", "fn": _kd_softmax_kernel, "signature": dict(_SIG),
     "constexprs": {"DIV": code, "WRITE_GRAD": True, "BLOCK_V": bv}, "num_warps": nw, "num_stages": 2,
     "flops": _FLOPS, "min_bytes": _BYTES}
    for code, div in enumerate(("forward_kl", "reverse_kl", "jsd")) for bv, nw in ((4096, 8), (2048, 4))
]
