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
    product of two bf16/fp16 values is exact in fp32), with the head upcast once (V x H x 4 bytes,
    independent of N). Gradients accumulate in fp32 and are cast back to each input's dtype by
    the caller."""

    def __init__(self, h, W, b, dtype=None, need_dh=False, need_dw=False, need_db=False):
        dtype = dtype or h.dtype
        self.h, self.b = h, b
        self.dtype = dtype
        if W.is_cuda:
            self.Wc = W.to(dtype)
        else:
            self.Wc = W.to(dtype).float() if dtype in _HALF else W.float()
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
        if self.Wc.dtype == torch.float32 and hc.dtype != torch.float32:
            hc = hc.float()
        return hc

    def fill(self, out, c0, c1, scale):
        hc = self._hc(c0, c1)
        if hc.dtype == torch.float32:
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
        if self.need_dh:
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
