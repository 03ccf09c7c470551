"""Where a chunk's logits come from: a linear head (hidden states x weight, + bias) or given logits;
both fill an fp32 ``[chunk, V]`` buffer and take the chunk's dL/dz back. Also the dtype rule for
mixed (autocast-style) inputs."""
from __future__ import annotations

import torch

from minitron_fast.ops.kd_loss.options import KDInputError

_HALF = (torch.bfloat16, torch.float16)


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
    each input's dtype by the caller."""

    BLOCK_ELEMS = 1 << 23  # fp32 elements of one upcast block of the head (32 MB)

    def __init__(self, h, W, b, dtype=None, need_dh=False, need_dw=False, need_db=False):
        dtype = dtype or h.dtype
        self.h, self.b = h, b
        self.dtype = dtype
        self.W = W
        self.blocked = not W.is_cuda and dtype in _HALF  # CPU emulation of a half GEMM: blocks of W
        if W.is_cuda:
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

    def fill(self, out, c0, c1, scale):
        hc = self._hc(c0, c1)
        if self.blocked:
            for v0, v1, blk in self._blocks():
                torch.mm(hc, blk.t(), out=out[:, v0:v1])
        elif hc.dtype == torch.float32:
            torch.mm(hc, self.Wc.t(), out=out)
        else:  # CUDA, half precision: fp32 output of the half GEMM (never bf16 logits)
            try:
                torch.mm(hc, self.Wc.t(), out_dtype=torch.float32, out=out)
            except (RuntimeError, TypeError):  # older torch: upcast this chunk's operands
                torch.mm(hc.float(), self.Wc.t().float(), out=out)
        if self.b32 is not None:
            out.add_(self.b32)
        if scale != 1.0:
            out.mul_(scale)

    def backprop(self, g, c0, c1):
        """``g``: ``[c, V]`` fp32 dL/dz for rows c0:c1 (already scaled)."""
        W = self.Wc
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
                self.dh[c0:c1] = torch.mm(g.to(W.dtype), W).float()
        if self.need_dw:
            hc = self._hc(c0, c1)
            self.dw.addmm_(g.t(), hc if hc.dtype == torch.float32 else hc.float())
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
