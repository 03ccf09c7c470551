"""Where a chunk's logits come from: a linear head (hidden states x weight, + bias) or given logits;
both fill an fp32 ``[chunk, V]`` buffer and take the chunk's dL/dz back. Also the dtype rule for
mixed (autocast-style) inputs."""
from __future__ import annotations

import math

import torch

from minitron_fast.ops.kd_loss.options import KDInputError

_HALF = (torch.bfloat16, torch.float16)
_OUT_DTYPE: dict[str, bool] = {}  # device type -> whether this torch has mm/addmm(out_dtype=float32) there


def _block_rows(cols: int) -> int:
    return max(1, LinearSource.BLOCK_ELEMS // max(cols, 1))


def mm_f32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool = False, alpha: float = 1.0) -> None:
    """``out (+)= alpha * a @ b`` for half operands into the fp32 ``out``: the GEMM runs in the
    operands' dtype with fp32 accumulation and output (cuBLAS through ``mm``/``addmm(out_dtype=)``),
    never an fp32 GEMM and never an ``[M, N]`` temporary. Where this torch lacks ``out_dtype`` for
    the device, the operands are upcast one block of ``out``'s rows at a time (an fp32 GEMM of
    the same rounded operands: the same sums, at fp32 GEMM speed), never the whole head."""
    dev = out.device.type
    if _OUT_DTYPE.get(dev, True):
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=torch.float32, alpha=alpha, out=out)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
                if alpha != 1.0:
                    out.mul_(alpha)
            _OUT_DTYPE[dev] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[dev] = False
    # Fallback: block the largest of the three dimensions, so only blocks of the big operand (the
    # head, or the chunk's [c, V] gradient) are ever upcast.
    M, K = a.shape
    N = b.shape[1]
    if not accumulate:
        out.zero_()
    if M >= max(N, K):
        b32, step = b.float(), _block_rows(K)
        for r0 in range(0, M, step):
            out[r0:r0 + step].addmm_(a[r0:r0 + step].float(), b32, alpha=alpha)
    elif N >= K:
        a32, step = a.float(), _block_rows(K)
        for c0 in range(0, N, step):
            out[:, c0:c0 + step].addmm_(a32, b[:, c0:c0 + step].float(), alpha=alpha)
    else:
        step = _block_rows(max(M, N))
        for k0 in range(0, K, step):
            out.addmm_(a[:, k0:k0 + step].float(), b[k0:k0 + step].float(), alpha=alpha)


def fp16_grad_scale(divisor: float, cfg) -> float:
    """A power of two ``s`` that brings the chunk gradients ``dL/dz`` of an fp16 head into fp16's
    normal range before they are rounded to fp16 for the backward GEMMs (divided out afterwards,
    exactly). Each row of ``dL/dz`` is bounded by ``(kd_scale / T + w) / divisor`` (differences of
    probabilities times the row's 1 / divisor); at ``divisor`` = a micro-batch's token count
    (1e3-1e6, or ``num_items`` under gradient accumulation) the unscaled values, 1e-10 to 1e-6,
    flush to zero in fp16 (smallest normal 6.1e-5). The scale depends on host numbers only: no
    sync."""
    bound = (cfg.kd_scale / min(cfg.temperature, 1.0) + cfg.hard_label_weight + 1.0) * 2.0
    return float(2.0 ** max(0, math.floor(math.log2(max(divisor, 1e-30) / bound))))


def compute_dtype(name_h: str, h: torch.Tensor, name_w: str, W: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMMs run in, as ``torch.autocast`` would: the autocast dtype when
    autocast is on for the device, else the activations' dtype (bf16/fp16 activations with fp32
    weights run the GEMM in bf16/fp16 with fp32 accumulation; fp32 activations with half weights
    run in fp32). bf16 against fp16 cannot be reconciled: a one-line error."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if h.dtype in _HALF and W.dtype in _HALF and h.dtype != W.dtype:
        raise KDInputError(f"{name_h} is {h.dtype} but {name_w} is {W.dtype}: cast one to the other's dtype "
                           f"(or pass fp32 weights, or run under torch.autocast)")
    return h.dtype


class LinearSource:
    """``z = h @ W^T + b`` chunk by chunk into an fp32 buffer; optionally backpropagates ``dz``.

    The GEMMs run in ``dtype`` with fp32 accumulation and an fp32 output. On the CPU a half
    ``dtype`` is emulated exactly: the operands are rounded to it and multiplied in fp32 (a
    product of two bf16/fp16 values is exact in fp32). The head is upcast block by block of
    ``BLOCK_ELEMS`` elements (vocabulary rows) for each chunk, never whole: a whole fp32 copy
    would be ``V x H x 4`` bytes per head (0.4 GB for a 2048-wide head of 49,152 tokens, the
    largest transient of a ZeRO-3 CPU rank), while the per-chunk conversion costs about
    ``1 / (2 x chunk)`` of the chunk's GEMM. Gradients accumulate in fp32 and are cast back to
    each input's dtype by the caller.

    On CUDA a half head runs its three GEMMs (logits, dL/dh, dL/dW) in that dtype with fp32
    accumulation and output (:func:`mm_f32_`); the chunk's ``dL/dz`` is rounded to the head's
    dtype for the backward GEMMs, an fp16 one after scaling by ``grad_scale`` (a power of two,
    :func:`fp16_grad_scale`) so that it does not flush to zero."""

    BLOCK_ELEMS = 1 << 23  # fp32 elements of one upcast block of the head (32 MB)
    CPU_HALF_EMULATION = True  # False runs the CUDA half branch on the CPU (tests of that branch)

    def __init__(self, h, W, b, dtype=None, need_dh=False, need_dw=False, need_db=False, grad_scale=1.0):
        dtype = dtype or h.dtype
        self.h, self.b = h, b
        self.dtype = dtype
        self.W = W
        self.grad_scale = float(grad_scale) if dtype == torch.float16 else 1.0
        # CPU emulation of a half GEMM: blocks of W
        self.blocked = not W.is_cuda and dtype in _HALF and self.CPU_HALF_EMULATION
        half_gemm = dtype in _HALF and not self.blocked
        if W.is_cuda or half_gemm:
            self.Wc = W.to(dtype)
        else:
            self.Wc = None if self.blocked else W.float()
        self.b32 = None if b is None else b.float()
        self.need_dh, self.need_dw, self.need_db = need_dh, need_dw, need_db
        N, H = h.shape
        V = W.shape[0]
        dev = h.device
        self.dh = torch.zeros(N, H, dtype=torch.float32, device=dev) if need_dh else None
        self.dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_dw else None
        self.db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None

    def _hc(self, c0, c1):
        """Rows c0:c1 of h in the GEMM's operand dtype (fp32 on the CPU, rounded to ``dtype`` first)."""
        hc = self.h[c0:c1]
        if hc.dtype != self.dtype:
            hc = hc.to(self.dtype)
        if (self.blocked or self.Wc.dtype == torch.float32) and hc.dtype != torch.float32:
            hc = hc.float()
        return hc

    def _blocks(self):
        """``(v0, v1, W[v0:v1] rounded to the GEMM dtype, in fp32)`` over the vocabulary."""
        V, H = self.W.shape
        step = max(1, self.BLOCK_ELEMS // max(H, 1))
        for v0 in range(0, V, step):
            v1 = min(V, v0 + step)
            yield v0, v1, self.W[v0:v1].to(self.dtype).float()

    def _g_half(self, g):
        """The chunk's dL/dz rounded to the head's dtype for the backward GEMMs (scaled by
        ``grad_scale`` first)."""
        return (g * self.grad_scale if self.grad_scale != 1.0 else g).to(self.Wc.dtype)

    def fill(self, out, c0, c1, scale):
        hc = self._hc(c0, c1)
        if self.blocked:
            for v0, v1, blk in self._blocks():
                torch.mm(hc, blk.t(), out=out[:, v0:v1])
        elif hc.dtype == torch.float32:
            torch.mm(hc, self.Wc.t(), out=out)
        else:  # CUDA, half precision: fp32 output of the half GEMM (never bf16 logits)
            mm_f32_(out, hc, self.Wc.t())
        if self.b32 is not None:
            out.add_(self.b32)
        if scale != 1.0:
            out.mul_(scale)

    def backprop(self, g, c0, c1):
        """``g``: ``[c, V]`` fp32 dL/dz for rows c0:c1 (already scaled)."""
        W = self.Wc
        gh = self._g_half(g) if W is not None and W.dtype in _HALF and (self.need_dh or self.need_dw) else None
        if self.need_dh and self.blocked:
            dh = self.dh[c0:c1]
            for v0, v1, blk in self._blocks():
                if v0 == 0:
                    torch.mm(g[:, v0:v1], blk, out=dh)
                else:
                    dh.addmm_(g[:, v0:v1], blk)
        elif self.need_dh:
            if W.dtype == torch.float32:
                torch.mm(g, W, out=self.dh[c0:c1])
            else:
                mm_f32_(self.dh[c0:c1], gh, W, alpha=1.0 / self.grad_scale)
        if self.need_dw:
            hc = self._hc(c0, c1)
            if hc.dtype == torch.float32:
                self.dw.addmm_(g.t(), hc)
            else:  # CUDA, half head: the GEMM in its dtype, fp32 accumulation into dw
                mm_f32_(self.dw, gh.t(), hc, accumulate=True, alpha=1.0 / self.grad_scale)
        if self.need_db:
            self.db.add_(g.sum(0))


class LogitsSource:
    """Given logits ``[N, V]`` (any float dtype, any strides), copied chunk by chunk into fp32;
    grads into ``dz``."""

    def __init__(self, z, need_grad=False):
        self.z = z
        self.need_grad = need_grad
        self.dz = torch.zeros(z.shape, dtype=torch.float32, device=z.device) if need_grad else None

    def fill(self, out, c0, c1, scale):
        if scale != 1.0:
            torch.mul(self.z[c0:c1], scale, out=out)
        else:
            out.copy_(self.z[c0:c1])

    def backprop(self, g, c0, c1):
        if self.need_grad:
            self.dz[c0:c1] = g


def teacher_source(kind, teacher, cfg):
    """The teacher's source for ``run``: a LinearSource / LogitsSource, or the top-k tuple."""
    if kind == "hidden":
        th, tw, tb = teacher
        return LinearSource(th, tw, tb, dtype=cfg.teacher_dtype)
    if kind == "logits":
        return LogitsSource(teacher)
    return teacher  # "topk": (vals, idx, tail), or None
