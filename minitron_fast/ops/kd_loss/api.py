"""The public KD / CE loss functions: argument checks, teacher preparation, padded vocabularies,
ZeRO-3 heads, dtype reconciliation, and the one row implementation of the call."""
from __future__ import annotations

from typing import NamedTuple

import torch

from minitron_fast.ops.zero3 import call_through, gathered, is_zero3_param
from minitron_fast.ops.kd_loss.autograd import FusedKD, LogitsKD
from minitron_fast.ops.kd_loss.divergences import REGISTRY, canonical
from minitron_fast.ops.kd_loss.options import (
    DeviceReads,
    KDInputError,
    _Cfg,
    _check_common,
    _check_float,
    _check_labels,
    check_softcap,
    resolve_rows_impl,
)
from minitron_fast.ops.kd_loss.params import resolve_options
from minitron_fast.ops.kd_loss.sources import compute_dtype


class KDLossParts(NamedTuple):
    """What ``return_parts=True`` returns, all from the one pass over the student's head.

    - ``loss``: the loss as without ``return_parts`` (scalar fp32, ``[...]`` for
      ``reduction="none"``); the only differentiable member.
    - ``kd``: the distillation term, reduced like the loss (times ``T**2`` when ``t2_scaling``).
    - ``ce``: the hard-label cross-entropy at temperature 1, reduced like the loss, **not** multiplied
      by ``hard_label_weight``; computed whenever labels are given (also with weight 0), NaN without
      labels. ``loss == kd + hard_label_weight * ce``.
    - ``num_tokens``: 0-dim int64 tensor, the number of valid (not ``ignore_index``) tokens.
    """

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    num_tokens: torch.Tensor


def _finish(outs, lead_shape, reduction, return_parts):
    loss, kd, ce, count = outs
    if reduction == "none":
        loss, kd, ce = (x.view(lead_shape) for x in (loss, kd, ce))
    return KDLossParts(loss, kd, ce, count) if return_parts else loss


def _empty(h, W, lead_shape, reduction, return_parts):
    z = (h.sum() + W.sum()).float() * 0.0
    if reduction == "none":
        z = h.new_zeros(lead_shape, dtype=torch.float32)
    if not return_parts:
        return z
    zd = z.detach()
    return KDLossParts(z, zd, zd.clone(), torch.tensor(0, dtype=torch.int64, device=h.device))


def _flatten_rows(name, t, H=None):
    if t.dim() < 2:
        raise KDInputError(f"{name} must be [..., H], got shape {tuple(t.shape)}")
    t2 = t.reshape(-1, t.shape[-1])
    if H is not None and t2.shape[1] != H:
        raise KDInputError(f"{name} has hidden size {t2.shape[1]}, expected {H}")
    return t2


def _check_head(hname, hidden, wname, weight, bname, bias):
    """A linear head's inputs: returns (hidden as [N, H], its leading shape, the GEMM dtype)."""
    _check_float(wname, weight, 2)
    _check_float(hname, hidden, 0)
    V, H = weight.shape
    h = _flatten_rows(hname, hidden, H)
    if h.device != weight.device:
        raise KDInputError(f"{hname} is on {h.device}, {wname} on {weight.device}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise KDInputError(f"{bname} must be [{V}], got {tuple(bias.shape)}")
    return h, hidden.shape[:-1], compute_dtype(hname, h, wname, weight)


def _shared_vocab(vocab_size, *sizes):
    """The vocabulary both distributions are taken over: ``vocab_size`` or the smaller size."""
    sizes = [int(s) for s in sizes if s is not None]
    V = min(sizes)
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= V:
            raise KDInputError(f"vocab_size must be an int in [1, {V}] (the vocabularies are {sizes}), "
                               f"got {vocab_size!r}")
        V = vocab_size
    return V


def _check_bare_zero3(name, w, call):
    if is_zero3_param(w) and (w.dim() != 2 or w.numel() == 0):
        raise KDInputError(f"{name} is a DeepSpeed ZeRO-3 partitioned parameter (local shape {tuple(w.shape)}); "
                           f"pass the lm_head module instead: {call}")


def _prepare_teacher(N, V, device, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk,
                     divergence, reads, tail=None):
    """The teacher as ``(kind, tensors)``; the top-k index range check is queued on ``reads``."""
    given = [x is not None for x in (teacher_hidden, teacher_logits, teacher_topk)]
    if sum(given) != 1:
        raise KDInputError("give exactly one teacher: teacher_hidden (+ teacher_weight), teacher_logits, or "
                           "teacher_topk")
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise KDInputError("teacher_hidden needs teacher_weight ([V, Ht])")
        _check_float("teacher_weight", teacher_weight, 2)
        _check_float("teacher_hidden", teacher_hidden, 0)
        th = _flatten_rows("teacher_hidden", teacher_hidden, teacher_weight.shape[1])
        if th.shape[0] != N:
            raise KDInputError(f"teacher_hidden has {th.shape[0]} tokens, the student {N}")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (teacher_weight.shape[0],):
            raise KDInputError(f"teacher_bias must be [{teacher_weight.shape[0]}], got {tuple(teacher_bias.shape)}")
        for n, t in (("teacher_hidden", th), ("teacher_weight", teacher_weight)):
            if t.device != device:
                raise KDInputError(f"{n} is on {t.device}, the student on {device}")
        tw, tb = teacher_weight.detach()[:V], None if teacher_bias is None else teacher_bias.detach()[:V]
        compute_dtype("teacher_hidden", th, "teacher_weight", tw)  # irreconcilable dtypes fail here
        return "hidden", (th.detach(), tw, tb)
    if tail is not None and teacher_topk is None:
        raise KDInputError("teacher_topk_tail_lse is only used with teacher_topk")
    if teacher_weight is not None or teacher_bias is not None:
        raise KDInputError("teacher_weight/teacher_bias are only used with teacher_hidden")
    if teacher_logits is not None:
        _check_float("teacher_logits", teacher_logits, 0)
        tl = _flatten_rows("teacher_logits", teacher_logits)
        if tl.shape[0] != N:
            raise KDInputError(f"teacher_logits has {tl.shape[0]} tokens, the student {N}")
        if tl.device != device:
            raise KDInputError(f"teacher_logits is on {tl.device}, the student on {device}")
        return "logits", tl.detach()[:, :V]
    if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2):
        raise KDInputError("teacher_topk must be a tuple (values [N, k], indices [N, k])")
    vals, idx = teacher_topk
    _check_float("teacher_topk values", vals, 0)
    vals = _flatten_rows("teacher_topk values", vals)
    idx = idx.reshape(vals.shape) if idx.numel() == vals.numel() else None
    if idx is None or vals.shape[0] != N:
        raise KDInputError(f"teacher_topk must be (values [N, k], indices [N, k]) with N={N} matching shapes")
    if idx.dtype not in (torch.int64, torch.int32):
        raise KDInputError(f"teacher_topk indices must be int64 or int32, got {idx.dtype}")
    if idx.numel():
        lo, hi = torch.aminmax(idx)
        reads.check((lo < 0) | (hi >= V), lambda: (
            f"teacher_topk indices must lie in [0, {V})" if int(lo) < 0 else
            f"teacher_topk index {int(hi)} lies outside the shared vocabulary [0, {V}) "
            "(a padded vocabulary's top-k must come from its real, shared prefix)"))
    if tail is not None:
        _check_float("teacher_topk_tail_lse", tail, 0)
        if tail.numel() != N or tail.dim() > 1 and tuple(tail.shape) != tuple(teacher_topk[0].shape[:-1]):
            raise KDInputError(f"teacher_topk_tail_lse must hold one value per token ([N]={N}), "
                               f"got shape {tuple(tail.shape)}")
        if tail.device != device:
            raise KDInputError(f"teacher_topk_tail_lse is on {tail.device}, the student on {device}")
        tail = tail.detach().reshape(N)
    elif REGISTRY[divergence].needs_teacher_support:
        raise KDInputError(f"divergence={divergence!r} with teacher_topk needs teacher_topk_tail_lse (without a "
                           "tail the teacher has zero probability outside the top-k: the KL is infinite); "
                           "pass the tail or use forward_kl or jsd")
    return "topk", (vals.detach(), idx.long(), tail)


def _teacher_vocab(teacher_weight, teacher_logits):
    if teacher_weight is not None and isinstance(teacher_weight, torch.Tensor) and teacher_weight.dim() == 2:
        return teacher_weight.shape[0]
    if teacher_logits is not None and isinstance(teacher_logits, torch.Tensor) and teacher_logits.dim() >= 1:
        return teacher_logits.shape[-1]
    return None


@torch.compiler.disable  # chunk loops with data-dependent skips: run eagerly inside compiled code
def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                         teacher_logits=None, teacher_topk=None, student_bias=None, teacher_bias=None, labels=None,
                         divergence="forward_kl", beta=0.5, temperature=1.0, ignore_index=-100,
                         hard_label_weight=0.0, reduction="mean", num_items=None, chunk_size=None, impl="auto",
                         t2_scaling=False, teacher_topk_tail_lse=None, return_parts=False, softcap=None,
                         vocab_size=None, options=None):
    """Distillation loss of a student's lm_head against a teacher without materializing ``[N, V]``.

    The loss options (``divergence`` ... ``vocab_size``, below) are the fields of
    ``params.KDLossOptions``, with its defaults: pass them as keywords or as one ``options=``.

    Args:
        student_hidden: ``[N, Hs]`` (or ``[..., Hs]``) student final hidden states (after the norm).
        student_weight: ``[V, Hs]`` student lm_head weight, or the lm_head module itself (an
            ``nn.Linear``-like module with ``weight`` and optional ``bias``): pass the module when its
            weight is DeepSpeed ZeRO-3 partitioned, and the call runs through the module's hooks
            (gathered for forward and backward, the gradient reduced into the partitioned
            parameter). A bare partitioned weight is refused with an error naming this call.
            bf16/fp16 hidden states with an fp32 weight (autocast style) run the GEMMs in the
            activations' dtype with fp32 accumulation; each gradient comes back in its input's dtype.
            ``student_bias``: ``[V]`` or None.
        teacher_hidden, teacher_weight, teacher_bias: ``[N, Ht]``, ``[V, Ht]``, ``[V]``: the teacher
            as hidden states and its head (it gets no gradients; ``teacher_weight`` may be the head
            module, and a ZeRO-3 partitioned one is gathered for the call). Or instead:
        teacher_logits: ``[N, V]`` teacher logits. Or:
        teacher_topk: ``(values [N, k], indices [N, k])`` top-k teacher logits (raw, before the
            temperature). Without ``teacher_topk_tail_lse`` the teacher distribution is the
            renormalized top-k, ``softmax(values / T)`` on those indices and 0 elsewhere
            (``reverse_kl`` is refused: it is infinite there).
        teacher_topk_tail_lse: ``[N]`` fp32, the log-sum-exp of the teacher's raw logits outside its
            top-k. Then both distributions are taken over k + 1 buckets: the k entries and one tail
            bucket. The teacher's tail logit is ``tail_lse / T`` (exact at ``T = 1``; at other
            temperatures an approximation, since ``logsumexp(z / T) != logsumexp(z) / T``); the
            student's tail is the exact log-sum-exp of its scaled logits outside the teacher's
            indices. Forward KL, JSD and reverse KL (finite now: the teacher's tail has mass) are
            all taken over the buckets.
        labels: ``[N]`` next-token ids aligned with the rows (already shifted); ``ignore_index``
            rows are masked out of every term. Needed when ``hard_label_weight > 0``.
        divergence: ``"forward_kl"`` = KL(p_t || p_s), ``"reverse_kl"`` = KL(p_s || p_t), or
            ``"jsd"`` = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
            (beta 0 / 1 give forward / reverse KL).
        temperature: ``T > 0``; ``p = softmax(z / T)`` for both models.
        t2_scaling: multiply the divergence by ``T**2`` (off by default).
        hard_label_weight: ``w``; the loss adds ``w * CE(z_s, label)`` at temperature 1.
        reduction: ``"mean"`` over valid tokens (or ``/ num_items`` when given), ``"sum"``, or
            ``"none"`` (``[N]`` per-token losses, 0 on ignored rows).
        num_items: divisor for ``"mean"`` (a token count across micro-batches for gradient accumulation):
            a number, or a one-element tensor on any device (read with the call's other host numbers:
            a call reads the device once, in its forward; see ``options.DeviceReads``).
        softcap: ``c > 0`` or None: ``c * tanh(z / c)`` on both models' logits before the
            temperature (Gemma-2/3's ``final_logit_softcapping``), inside the fused path, with its
            gradient. Applies to logits computed here (hidden states x head) and to given teacher
            logits / top-k values alike, so pass logits from **before** a model's own cap; a
            ``teacher_topk_tail_lse`` is used as given (it should be the log-sum-exp of the capped
            logits: a cap cannot be applied to a sum).
        vocab_size: the number of real tokens ``V``; both distributions are taken over the first
            ``V`` entries. Default: the smaller of the two heads' (or logits') vocabularies, so a
            teacher whose vocabulary is the student's plus padding (or the reverse) works. The rule
            assumes one tokenizer, whose ids are a prefix of both heads; padded rows get zero
            gradients. Labels and top-k indices must lie below ``V``.
        chunk_size: tokens per chunk (default: about 576 MB for all fp32 ``[chunk, V]`` buffers of
            the call: 384 rows at V=128,256 on the torch path, 576 with the C++ rows).
        impl: the row implementation: ``"auto"`` (Triton on CUDA, the C++ rows on CPU, each when it
            supports the options, else torch), ``"triton"``, ``"cpp"``, ``"torch"``. One is resolved
            per call; an explicit ``impl`` that cannot run the options raises an error naming the
            ones that can (``supported_impls`` in ``options.py``; docs/kd_loss.md has the table).
        return_parts: return a ``KDLossParts(loss, kd, ce, num_tokens)`` (see its docstring)
            instead of the loss alone, from the same single pass.

    Returns:
        A scalar fp32 loss (``[N]`` for ``reduction="none"``):
        ``sum_i valid_i (s * D(p_t,i || p_s,i) + w * CE_i) / divisor`` with ``s = T**2`` if
        ``t2_scaling`` else 1. Gradients flow to ``student_hidden``, ``student_weight``, ``student_bias``.
        With ``return_parts=True``: ``KDLossParts``.

    Example:
        >>> h, W = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        >>> th, tW = torch.randn(6, 5), torch.randn(11, 5)
        >>> loss = fused_linear_kd_loss(h, W, th, tW)
        >>> loss.backward()
    """
    if options is not None:  # one spelling per call: the dataclass, or the keywords
        o = resolve_options(options, dict(divergence=divergence, beta=beta, temperature=temperature,
                                          ignore_index=ignore_index, hard_label_weight=hard_label_weight,
                                          reduction=reduction, chunk_size=chunk_size, impl=impl,
                                          t2_scaling=t2_scaling, softcap=softcap, vocab_size=vocab_size))
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    teacher_logits=teacher_logits, teacher_topk=teacher_topk, student_bias=student_bias,
                                    teacher_bias=teacher_bias, labels=labels, num_items=num_items,
                                    teacher_topk_tail_lse=teacher_topk_tail_lse, return_parts=return_parts,
                                    **o.as_kwargs())
    kw = dict(teacher_logits=teacher_logits, teacher_topk=teacher_topk, labels=labels, divergence=divergence,
              beta=beta, temperature=temperature, ignore_index=ignore_index, hard_label_weight=hard_label_weight,
              reduction=reduction, num_items=num_items, chunk_size=chunk_size, impl=impl, t2_scaling=t2_scaling,
              teacher_topk_tail_lse=teacher_topk_tail_lse, return_parts=return_parts, softcap=softcap,
              vocab_size=vocab_size)
    if isinstance(teacher_weight, torch.nn.Module):  # a teacher head (possibly ZeRO-3): read-only, gathered
        tmod = teacher_weight
        if teacher_bias is not None:
            raise KDInputError("teacher_bias is taken from the teacher_weight module; pass teacher_bias=None")
        with gathered(tmod.weight, getattr(tmod, "bias", None)):
            tw, tb = tmod.weight, getattr(tmod, "bias", None)
            if is_zero3_param(tmod.weight):  # keep a private copy: the gathered storage is released after
                tw, tb = tw.detach().clone(), None if tb is None else tb.detach().clone()
            return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, tw, student_bias=student_bias,
                                        teacher_bias=tb, **kw)
    if is_zero3_param(teacher_weight) and teacher_weight.numel() == 0:  # a bare partitioned teacher head
        with gathered(teacher_weight, teacher_bias):
            tw = teacher_weight.detach().clone()
            tb = None if teacher_bias is None else teacher_bias.detach().clone()
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, tw, student_bias=student_bias,
                                    teacher_bias=tb, **kw)
    if isinstance(student_weight, torch.nn.Module):  # the student's head: through its (ZeRO-3) hooks
        head = student_weight
        if student_bias is not None:
            raise KDInputError("student_bias is taken from the student_weight module; pass student_bias=None")

        def as_forward(hidden):
            out = fused_linear_kd_loss(hidden, head.weight, teacher_hidden, teacher_weight,
                                       student_bias=getattr(head, "bias", None), teacher_bias=teacher_bias, **kw)
            return tuple(out) if return_parts else out  # DeepSpeed's output hooks rebuild plain tuples

        out = call_through(head, as_forward, student_hidden)
        return KDLossParts(*out) if return_parts else out
    _check_bare_zero3("student_weight", student_weight,
                      "fused_linear_kd_loss(hidden, model.lm_head, ...) (or call it inside "
                      "minitron_fast.ops.zero3.call_through(model.lm_head, fn, hidden))")
    _check_common(divergence, beta, temperature, reduction, num_items, hard_label_weight, chunk_size)
    cap = check_softcap(softcap)
    h, lead_shape, dtype = _check_head("student_hidden", student_hidden, "student_weight", student_weight,
                                       "student_bias", student_bias)
    Vs = student_weight.shape[0]
    V = _shared_vocab(vocab_size, Vs, _teacher_vocab(teacher_weight, teacher_logits))
    W, b = student_weight, student_bias
    if V < Vs:  # padded rows: autograd's slice gives them zero gradients
        W, b = W[:V], None if b is None else b[:V]
    N = h.shape[0]
    div = canonical(divergence, float(beta))
    reads = DeviceReads()  # the checks that need device values: read once, in the forward
    kind, teacher = _prepare_teacher(N, V, h.device, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                                     teacher_topk, div, reads, teacher_topk_tail_lse)
    labels = _check_labels(labels, N, V, ignore_index, h.device, reads)
    if hard_label_weight > 0 and labels is None:
        raise KDInputError("hard_label_weight > 0 needs labels")
    rows_impl = resolve_rows_impl(impl, h, op="fused_linear_kd_loss", divergence=div, teacher_kind=kind)
    tdtype = compute_dtype("teacher_hidden", teacher[0], "teacher_weight", teacher[1]) if kind == "hidden" else None
    cfg = _Cfg(div, float(beta), float(temperature), bool(t2_scaling), float(hard_label_weight), int(ignore_index),
               chunk_size or 0, rows_impl, cap, dtype, tdtype)
    if N == 0:
        reads.read(num_items=num_items)
        return _empty(h, student_weight, lead_shape, reduction, return_parts)
    outs = FusedKD.apply(h, W, b, (labels, kind, teacher, cfg, reduction, num_items, return_parts, reads))
    return _finish(outs, lead_shape, reduction, return_parts)


@torch.compiler.disable  # chunk loops with data-dependent skips: run eagerly inside compiled code
def kd_loss_from_logits(student_logits, teacher_logits=None, *, teacher_topk=None, labels=None,
                        divergence="forward_kl", beta=0.5, temperature=1.0, ignore_index=-100, hard_label_weight=0.0,
                        reduction="mean", num_items=None, chunk_size=None, impl="auto", t2_scaling=False,
                        teacher_topk_tail_lse=None, return_parts=False, softcap=None, vocab_size=None):
    """The same loss for callers that already hold the student's logits ``[N, V]`` (or ``[..., V]``).

    Works chunk by chunk (fp32 softmax in place, extra memory O(chunk x V)); the gradient
    ``[N, V]`` w.r.t. the student logits is produced in the forward pass. The teacher is given
    as ``teacher_logits`` ``[N, V]`` or ``teacher_topk`` ``(values [N, k], indices [N, k])`` (with
    ``teacher_topk_tail_lse`` ``[N]`` optional). Arguments, math and ``return_parts`` as in
    ``fused_linear_kd_loss`` (``softcap`` caps both sides, ``vocab_size`` truncates both).

    Example:
        >>> zs = torch.randn(4, 10, requires_grad=True)
        >>> kd_loss_from_logits(zs, torch.randn(4, 10), temperature=2.0).backward()
    """
    _check_common(divergence, beta, temperature, reduction, num_items, hard_label_weight, chunk_size)
    cap = check_softcap(softcap)
    _check_float("student_logits", student_logits, 0)
    lead_shape = student_logits.shape[:-1]
    z = _flatten_rows("student_logits", student_logits)
    N, Vs = z.shape
    V = _shared_vocab(vocab_size, Vs, _teacher_vocab(None, teacher_logits))
    if V < Vs:
        z = z[:, :V]
    div = canonical(divergence, float(beta))
    reads = DeviceReads()
    kind, teacher = _prepare_teacher(N, V, z.device, None, None, None, teacher_logits, teacher_topk, div, reads,
                                     teacher_topk_tail_lse)
    labels = _check_labels(labels, N, V, ignore_index, z.device, reads)
    if hard_label_weight > 0 and labels is None:
        raise KDInputError("hard_label_weight > 0 needs labels")
    rows_impl = resolve_rows_impl(impl, z, op="kd_loss_from_logits", divergence=div, teacher_kind=kind)
    cfg = _Cfg(div, float(beta), float(temperature), bool(t2_scaling), float(hard_label_weight), int(ignore_index),
               chunk_size or 0, rows_impl, cap)
    outs = LogitsKD.apply(z, (labels, kind, teacher, cfg, reduction, num_items, return_parts, reads))
    return _finish(outs, lead_shape, reduction, return_parts)


@torch.compiler.disable  # chunk loops with data-dependent skips: run eagerly inside compiled code
def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                               num_items=None, chunk_size=None, impl="auto", softcap=None):
    """Cross-entropy of ``hidden @ weight^T + bias`` against ``labels`` without materializing ``[N, V]``.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``); weight: ``[V, H]``; bias: ``[V]`` or None;
        labels: ``[N]`` (already shifted), ``ignore_index`` rows masked.
        reduction: ``"mean"`` over valid tokens (or ``/ num_items``), ``"sum"``, ``"none"``.
        weight may be the lm_head module (ZeRO-3, as in ``fused_linear_kd_loss``); ``softcap`` and
        autocast-style dtypes as there.
        impl: ``"auto"`` (on CPU the C++ rows when ``minitron_fast._C`` is built, else torch),
            ``"cpp"``, ``"torch"``.

    Same chunking and in-forward gradients as ``fused_linear_kd_loss`` (used for teacher correction).

    Example:
        >>> h, W = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8)
        >>> fused_linear_cross_entropy(h, W, torch.tensor([1, 2, 3, -100, 4, 5])).backward()
    """
    if isinstance(weight, torch.nn.Module):
        head = weight
        if bias is not None:
            raise KDInputError("bias is taken from the weight module; pass bias=None")
        return call_through(head, lambda x: fused_linear_cross_entropy(
            x, head.weight, labels, bias=getattr(head, "bias", None), ignore_index=ignore_index, reduction=reduction,
            num_items=num_items, chunk_size=chunk_size, impl=impl, softcap=softcap), hidden)
    _check_bare_zero3("weight", weight, "fused_linear_cross_entropy(hidden, model.lm_head, labels)")
    _check_common("forward_kl", 0.5, 1.0, reduction, num_items, 0.0, chunk_size)
    cap = check_softcap(softcap)
    h, lead_shape, dtype = _check_head("hidden", hidden, "weight", weight, "bias", bias)
    V = weight.shape[0]
    if labels is None:
        raise KDInputError("labels are required")
    N = h.shape[0]
    reads = DeviceReads()
    labels = _check_labels(labels, N, V, ignore_index, h.device, reads)
    rows_impl = resolve_rows_impl(impl, h, op="fused_linear_cross_entropy", divergence=None, teacher_kind=None)
    cfg = _Cfg(None, 0.5, 1.0, False, 1.0, int(ignore_index), chunk_size or 0, rows_impl, cap, dtype)
    if N == 0:
        reads.read(num_items=num_items)
        return _empty(h, weight, lead_shape, reduction, False)
    outs = FusedKD.apply(h, weight, bias, (labels, None, None, cfg, reduction, num_items, False, reads))
    return _finish(outs, lead_shape, reduction, False)
