"""The chunk loop: fill a chunk's logits, apply the softcap, the hard-label CE term, the teacher, and
the one row implementation resolved for the call; backpropagate the chunk's dL/dz into the student."""
from __future__ import annotations

import torch

from minitron_fast.ops.kd_loss.divergences import REGISTRY
from minitron_fast.ops.kd_loss.options import _cpp_fn, _n_buffers, default_chunk_size
from minitron_fast.ops.kd_loss.rows_native import chunk_cpp, chunk_cpp_div, chunk_triton
from minitron_fast.ops.kd_loss.rows_torch import Buffers, chunk_torch


def _cap_(X, c, post, deriv=None):
    """``X = post * c * tanh(X / c)`` in place, for ``X`` holding ``z / c`` already (the fill's scale);
    ``deriv`` (a buffer or None) receives ``1 - tanh^2``, the factor dL/dz picks up (as autograd's
    tanh backward computes it). Four passes over the chunk with the derivative, two without."""
    X.tanh_()
    if deriv is not None:
        torch.addcmul(X.new_ones(()), X, X, value=-1.0, out=deriv)
    X.mul_(c * post)


def _cap_cpp(X, c, post, deriv=None):
    """``_cap_`` in the C++ rows (one pass), for ``X`` holding raw ``z``."""
    _cpp_fn("softcap_rows")(X.data_ptr(), X.stride(0), 0 if deriv is None else deriv.data_ptr(),
                            0 if deriv is None else deriv.stride(0), float(c), float(post), X.shape[0], X.shape[1],
                            torch.get_num_threads())


def _ce_rows(S, vc, labels, c0, c1, a, w, need_grad, cfg, bufs, in_place):
    """Hard-label CE of the chunk's (capped, unscaled) logits S: (ce [c], dL/dz or None)."""
    c, V = S.shape
    lab = torch.where(vc, labels[c0:c1], 0).contiguous()
    if cfg.impl == "cpp":  # the C++ CE rows: in place without KD, else in their own buffer
        P = S if in_place else bufs.get("p1", c)
        ce = torch.empty(c, dtype=torch.float32)
        b = (a * w).contiguous()
        _cpp_fn("ce_rows")(S.data_ptr(), S.stride(0), P.data_ptr(), P.stride(0), lab.data_ptr(), b.data_ptr(),
                           ce.data_ptr(), c, V, bool(need_grad and w > 0), torch.get_num_threads())
        return ce, (P if need_grad and w > 0 else None)
    zl = S.gather(1, lab[:, None]).view(-1)
    m1 = S.amax(1, keepdim=True)
    P = bufs.get("p1", c)
    torch.sub(S, m1, out=P)
    P.exp_()
    s1 = P.sum(1, keepdim=True)
    ce = (m1 + s1.log()).view(-1) - zl
    if not (need_grad and w > 0):
        return ce, None
    b = (a * w)[:, None]
    P.mul_(b / s1)
    P.scatter_add_(1, lab[:, None], -b)
    return ce, P


def _needs_ce(cfg, labels, want_ce):
    return labels is not None and (cfg.hard_label_weight > 0 or cfg.divergence is None or want_ce)


def layout(cfg, teacher_kind, labels, N, V, need_grad, want_ce=False):
    """The chunk rows ``run`` uses for these arguments, and, with labels, the valid-token count of
    each chunk: ``[n_chunks]`` int64 on the labels' device, read on the host once per call with the
    call's other host numbers (``options.DeviceReads``): ``run`` skips the chunks with none, and
    their sum is the divisor of ``"mean"``. Without labels: ``(chunk, None)``."""
    n_buf = _n_buffers(cfg, teacher_kind, _needs_ce(cfg, labels, want_ce)) + (1 if cfg.softcap and need_grad else 0)
    chunk = max(1, min(cfg.chunk_size or default_chunk_size(V, N, n_buf), N))
    if labels is None:
        return chunk, None
    n_chunks = -(-N // chunk)
    valid = labels.new_zeros(n_chunks * chunk, dtype=torch.bool)  # [n_chunks * chunk], the tail padded
    valid[:N] = labels != cfg.ignore_index
    return chunk, valid.view(n_chunks, chunk).sum(1)


def run(student, teacher_kind, teacher_src, labels, N, V, cfg, row_scale, need_grad, device, want_ce=False,
        plan=None):
    """Loops over chunks. Returns the per-token terms ``(kd [N], ce [N] or None)`` fp32 (``kd`` already
    times ``kd_scale``; both 0 on ignored rows; the loss row is ``kd + w * ce``); ``student``
    accumulates ``row_scale``-weighted gradients when ``need_grad``. ``want_ce``: compute the CE
    term (for ``return_parts``) even when its weight is 0.

    teacher_kind: "hidden"/"logits" (``teacher_src`` a source), "topk" (``(vals, idx, tail)``), None (CE).
    row_scale: ``[N]`` fp32 per-token dL/dloss_i (already 0 on ignored rows).
    plan: ``(chunk, per-chunk valid counts as host ints or None)`` from ``layout`` for the same
    arguments and the call's one host read; None: computed here (one host read with labels)."""
    T = cfg.temperature
    w = cfg.hard_label_weight
    div = cfg.divergence
    cap = cfg.softcap
    kd_out = torch.zeros(N, dtype=torch.float32, device=device)
    valid = None if labels is None else labels != cfg.ignore_index
    need_ce = _needs_ce(cfg, labels, want_ce)
    ce_out = torch.zeros(N, dtype=torch.float32, device=device) if need_ce else None
    if plan is None:
        chunk, counts = layout(cfg, teacher_kind, labels, N, V, need_grad, want_ce)
        plan = chunk, None if counts is None else counts.tolist()
    chunk, chunk_valid = plan
    # the cap in the C++ rows (one pass, from raw z) under impl="cpp", else torch (from z / cap)
    cap_cpp = cap is not None and cfg.impl == "cpp" and _cpp_fn("softcap_rows") is not None
    cap_fill = 1.0 if cap_cpp else (None if cap is None else 1.0 / cap)
    bufs = Buffers(chunk, V, device)
    if div is None:
        w = 1.0
    for i, c0 in enumerate(range(0, N, chunk)):
        c1 = min(N, c0 + chunk)
        c = c1 - c0
        if chunk_valid is not None and chunk_valid[i] == 0:
            continue  # every token ignored: no loss, zero gradients, no GEMMs
        vc = None if valid is None else valid[c0:c1]
        a = row_scale[c0:c1]
        S = bufs.get("s", c)
        student.fill(S, c0, c1, cap_fill if cap is not None else (1.0 if need_ce else 1.0 / T))
        dcap = None
        if cap is not None:  # capped z at T = 1 for the CE term, else straight to u = cap(z) / T
            dcap = bufs.get("cap", c) if need_grad else None
            (_cap_cpp if cap_cpp else _cap_)(S, cap, 1.0 if need_ce else 1.0 / T, dcap)
        kd = None
        G = None
        if need_ce:
            ce_c, G = _ce_rows(S, vc, labels, c0, c1, a, w, need_grad, cfg, bufs, in_place=div is None)
        if div is not None:
            if need_ce and T != 1.0:
                S.mul_(1.0 / T)
            Gce = G
            if teacher_kind == "topk":
                vals, idx, tail = teacher_src
                v = vals[c0:c1].float()
                if cap is not None:
                    v = cap * torch.tanh(v / cap)
                tch = ("topk", v / T, idx[c0:c1].long(), None if tail is None else tail[c0:c1].float() / T)
            else:
                Tt = bufs.get("t", c)
                teacher_src.fill(Tt, c0, c1, cap_fill if cap is not None else 1.0 / T)
                if cap_cpp:  # masked (-inf) entries stay masked
                    _cap_cpp(Tt, cap, 1.0 / T)
                elif cap is not None:
                    masked = torch.isneginf(Tt) if teacher_kind == "logits" else None
                    _cap_(Tt, cap, 1.0 / T)
                    if masked is not None:
                        Tt.masked_fill_(masked, -1e30)
                if teacher_kind == "logits":
                    Tt.clamp_(min=-1e30)  # masked (-inf) teacher logits: p_t = 0 there, and 0 * -inf = nan
                tch = ("dense", Tt)
            if cfg.impl == "triton":
                kd, G = chunk_triton(S, tch[1], a, cfg, need_grad)
            elif cfg.impl == "cpp" and tch[0] == "dense" and REGISTRY[div].cpp["dense"] == "kd_forward_kl_rows":
                kd, G = chunk_cpp(S, tch[1], a, cfg, need_grad)
            elif cfg.impl == "cpp":
                kd, G = chunk_cpp_div(S, tch, a, cfg, need_grad)
            else:
                kd, G = chunk_torch(S, tch, a, cfg, bufs, need_grad)
            kd = kd * cfg.kd_scale
            if Gce is not None and need_grad:
                G.add_(Gce)
        if need_grad and G is not None:
            if dcap is not None:
                G.mul_(dcap)
            student.backprop(G, c0, c1)
        if kd is not None:
            kd_out[c0:c1] = kd if vc is None else torch.where(vc, kd, 0.0)
        if need_ce:
            ce_out[c0:c1] = ce_c if vc is None else torch.where(vc, ce_c, 0.0)
    return kd_out, ce_out
