"""The autograd Functions of the KD / CE losses: gradients are produced in the forward pass (one pass
over the student's head) for ``"mean"``/``"sum"`` and returned, scaled by ``grad_output``, in
backward; ``"none"`` recomputes them in backward with the per-token ``grad_output``. The KD and CE
parts and the valid-token count are extra, non-differentiable outputs.

Host reads: a forward reads the device once (``options.DeviceReads``: the queued input checks, a
tensor ``num_items`` and each chunk's valid-token count together); a ``"mean"``/``"sum"`` backward
never (``grad_output`` is multiplied in, not compared with 1 on the host)."""
from __future__ import annotations

import math

import torch

from minitron_fast.ops.kd_loss.chunks import layout, run
from minitron_fast.ops.kd_loss.options import _divisor
from minitron_fast.ops.kd_loss.sources import LinearSource, LogitsSource, fp16_grad_scale, teacher_source


def _row_scale(labels, N, ignore_index, divisor, device):
    if labels is None:
        return torch.full((N,), 1.0 / divisor, dtype=torch.float32, device=device)
    return (labels != ignore_index).float() / divisor


def _host_plan(labels, teacher_kind, cfg, N, V, need_grad, want_ce, reads, num_items, device):
    """The forward's one host read (``DeviceReads.read``). Returns ``(plan, n_valid, num_items,
    count)``: ``run``'s plan ``(chunk, per-chunk valid counts or None)``, the valid-token count and
    ``num_items`` as host numbers, and the count as a 0-dim int64 tensor on ``device``."""
    chunk, counts = layout(cfg, teacher_kind, labels, N, V, need_grad, want_ce)
    per_chunk, items = reads.read(counts, num_items)
    if counts is None:  # a device tensor from a fill, not from a host value (a blocking copy would sync)
        return (chunk, None), N, items, torch.full((), N, dtype=torch.int64, device=device)
    return (chunk, per_chunk), sum(per_chunk), items, counts.sum()


def _times(x, g, dtype):
    """``(x * g).to(dtype)`` in one pass, in place when no cast is needed. ``grad_output`` is
    multiplied in whatever its value: skipping the product when it is 1 would read it on the
    host, a sync in every backward (``x * 1`` is ``x`` exactly)."""
    if x is None:
        return None
    if x.dtype == dtype:
        return x.mul_(g)
    return torch.mul(x, g, out=torch.empty_like(x, dtype=dtype))


def _reduce(rows, reduction, divisor):
    if reduction == "none":
        return rows
    return rows.sum() / divisor


def _outputs(ctx, kd, ce, cfg, reduction, divisor, count):
    """(loss, kd part, ce part, valid-token count): the loss is ``kd + w * ce``; the parts are
    detached outputs (gradients flow through the loss only)."""
    if cfg.divergence is None:
        rows = ce
    elif ce is not None and cfg.hard_label_weight > 0:
        rows = kd + cfg.hard_label_weight * ce
    else:
        rows = kd
    kd_p = _reduce(kd, reduction, divisor)
    ce_p = _reduce(ce, reduction, divisor) if ce is not None else kd_p.new_full(kd_p.shape, math.nan)
    if reduction == "none":  # distinct tensors from the (differentiable) loss rows
        kd_p, ce_p = kd_p.clone(), ce_p.clone()
    ctx.mark_non_differentiable(kd_p, ce_p, count)
    return _reduce(rows, reduction, divisor), kd_p, ce_p, count


class FusedKD(torch.autograd.Function):
    """Inputs: student hidden ``[N, Hs]``, weight ``[V, Hs]``, bias ``[V]`` or None; the teacher
    (kind + tensors) and the labels ride in ``spec``. Gradients are computed in forward for
    ``"mean"``/``"sum"``; ``"none"`` recomputes them in backward with the per-token grad_output."""

    @staticmethod
    def forward(ctx, h, W, b, spec):
        labels, teacher_kind, teacher, cfg, reduction, num_items, want_ce, reads = spec
        N, V = h.shape[0], W.shape[0]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        precompute = any(need) and reduction != "none"
        plan, n_valid, items, count = _host_plan(labels, teacher_kind, cfg, N, V, precompute, want_ce, reads,
                                                 num_items, h.device)
        divisor = _divisor(reduction, items, n_valid)
        scale = _row_scale(labels, N, cfg.ignore_index, divisor, h.device)
        with torch.no_grad():
            student = LinearSource(h, W, b, cfg.dtype, *(need if precompute else (False,) * 3),
                                   grad_scale=fp16_grad_scale(divisor, cfg))
            tsrc = teacher_source(teacher_kind, teacher, cfg)
            kd, ce = run(student, teacher_kind, tsrc, labels, N, V, cfg, scale, precompute, h.device, want_ce, plan)
        ctx.meta = (h.dtype, W.dtype, None if b is None else b.dtype, reduction, need)
        if precompute:
            ctx.grads = (student.dh, student.dw, student.db)
        elif any(need):  # reduction="none": keep inputs, recompute in backward
            ctx.spec = spec
            ctx.save_for_backward(h, W, b)
        return _outputs(ctx, kd, ce, cfg, reduction, divisor, count)

    @staticmethod
    def backward(ctx, grad_out, *_parts):
        hd, wd, bd, reduction, need = ctx.meta
        if reduction != "none":
            dh, dw, db = ctx.grads
            ctx.grads = None
            g = grad_out.float()
            return _times(dh, g, hd), _times(dw, g, wd), _times(db, g, bd), None
        else:
            h, W, b = ctx.saved_tensors
            labels, teacher_kind, teacher, cfg = ctx.spec[:4]
            N, V = h.shape[0], W.shape[0]
            scale = grad_out.float().reshape(-1)
            if labels is not None:
                scale = scale * (labels != cfg.ignore_index).float()
            gs = 1.0
            if (cfg.dtype or h.dtype) == torch.float16:  # one host read of the largest per-token scale
                gs = fp16_grad_scale(1.0 / max(float(scale.abs().max()), 1e-30), cfg)
            with torch.no_grad():
                student = LinearSource(h, W, b, cfg.dtype, *need, grad_scale=gs)
                # (and, with labels, run's one host read of the chunks to skip)
                run(student, teacher_kind, teacher_source(teacher_kind, teacher, cfg), labels, N, V, cfg, scale, True,
                     h.device)
            dh, dw, db = student.dh, student.dw, student.db
        return (None if dh is None else dh.to(hd), None if dw is None else dw.to(wd),
                None if db is None else db.to(bd), None)


class LogitsKD(torch.autograd.Function):
    """``kd_loss_from_logits``: the student given as logits ``[N, V]`` (grads ``[N, V]`` in forward)."""

    @staticmethod
    def forward(ctx, z, spec):
        labels, teacher_kind, teacher, cfg, reduction, num_items, want_ce, reads = spec
        N, V = z.shape
        precompute = ctx.needs_input_grad[0] and reduction != "none"
        plan, n_valid, items, count = _host_plan(labels, teacher_kind, cfg, N, V, precompute, want_ce, reads,
                                                 num_items, z.device)
        divisor = _divisor(reduction, items, n_valid)
        scale = _row_scale(labels, N, cfg.ignore_index, divisor, z.device)
        with torch.no_grad():
            student = LogitsSource(z, precompute)
            kd, ce = run(student, teacher_kind, teacher_source(teacher_kind, teacher, cfg), labels, N, V, cfg, scale,
                          precompute, z.device, want_ce, plan)
        ctx.zdtype, ctx.reduction = z.dtype, reduction
        if precompute:
            ctx.dz = student.dz
        elif ctx.needs_input_grad[0]:
            ctx.spec = spec
            ctx.save_for_backward(z)
        return _outputs(ctx, kd, ce, cfg, reduction, divisor, count)

    @staticmethod
    def backward(ctx, grad_out, *_parts):
        if ctx.reduction != "none":
            dz = ctx.dz
            ctx.dz = None
            g = grad_out.float()
            if dz.dtype == ctx.zdtype and g.is_cpu and bool(g == 1):
                # a CPU grad_output is host memory (reading it waits for no device), and the product
                # would be one more pass over the whole [N, V] gradient; on a device: multiply
                return dz, None
            return _times(dz, g, ctx.zdtype), None
        (z,) = ctx.saved_tensors
        labels, teacher_kind, teacher, cfg = ctx.spec[:4]
        N, V = z.shape
        scale = grad_out.float().reshape(-1)
        if labels is not None:
            scale = scale * (labels != cfg.ignore_index).float()
        with torch.no_grad():
            student = LogitsSource(z, True)
            run(student, teacher_kind, teacher_source(teacher_kind, teacher, cfg), labels, N, V, cfg, scale, True,
                 z.device)
        return student.dz.to(ctx.zdtype), None
