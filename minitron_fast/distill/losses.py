"""The trainer's one door to the losses: logit KD and LM cross-entropy from hidden states.

``impl="fused"`` calls the package's fused linear losses (``minitron_fast.ops.kd_loss``): the
``[N, V]`` logits of either model are never materialized. ``impl="materialized"`` computes the
full logits with plain torch (``log_softmax`` + KL / CE); it is the baseline of
``bench/distill_step`` and the reference of the "fused and materialized give the same
trajectory" test.

Every loss here returns ``sum over valid tokens / num_items``: with ``num_items`` the valid-token
count of the whole optimizer step (all micro-batches, all ranks), summing the micro-batch losses
gives exactly the per-token mean over the step, which is how gradient accumulation must
normalize.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _fused_ops():
    """The fused ops of ``minitron_fast.ops.kd_loss``, or None when that module is absent."""
    try:
        from minitron_fast.ops import kd_loss as mod
    except ImportError:
        return None
    return mod


def fused_available() -> bool:
    mod = _fused_ops()
    return mod is not None and hasattr(mod, "fused_linear_kd_loss")


# -- materialized references --------------------------------------------------------------------

def _logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """fp32 logits (fp64 when the inputs are fp64, for references)."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    return F.linear(h.to(dt), w.to(dt), None if b is None else b.to(dt))


def divergence_per_token(s_logits: Tensor, t_logits: Tensor, *, divergence: str, beta: float,
                         temperature: float) -> Tensor:
    """``[N]`` divergence between teacher and student distributions from ``[N, V]`` logits
    (fp32): forward_kl = KL(p_t || p_s), reverse_kl = KL(p_s || p_t), jsd = beta KL(p_t || m) +
    (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s."""
    if divergence == "jsd" and beta in (0.0, 1.0):  # the limits, as minitron_fast.ops.kd_loss defines them
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    ls = torch.log_softmax(s_logits / temperature, dim=-1)
    lt = torch.log_softmax(t_logits / temperature, dim=-1)
    if divergence == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if divergence == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1)
    if divergence == "jsd":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def materialized_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                         labels: Tensor, *, num_items: float, student_bias: Tensor | None = None,
                         teacher_bias: Tensor | None = None, divergence: str = "forward_kl", beta: float = 0.5,
                         temperature: float = 1.0) -> Tensor:
    """Plain-torch KD loss with full ``[N, V]`` logits (fp32): ``sum_valid div / num_items``."""
    s = _logits(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = _logits(teacher_hidden, teacher_weight, teacher_bias)
    per = divergence_per_token(s, t, divergence=divergence, beta=beta, temperature=temperature)
    valid = labels != IGNORE_INDEX
    return (per * valid).sum() / num_items


def materialized_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, num_items: float,
                               bias: Tensor | None = None) -> Tensor:
    logits = _logits(hidden, weight, bias)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / num_items


# -- the adapter ------------------------------------------------------------------------------

def kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
            labels: Tensor, *, num_items: float, impl: str = "fused", student_bias: Tensor | None = None,
            teacher_bias: Tensor | None = None, divergence: str = "forward_kl", beta: float = 0.5,
            temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """KD loss of student hidden states ``[N, Hs]`` against teacher hidden states ``[N, Ht]``
    through their lm_heads ``[V, Hs]`` / ``[V, Ht]``; ``labels [N]`` masks positions equal to
    -100. Returns ``sum over valid tokens / num_items`` (a 0-dim fp32 tensor)."""
    if impl == "materialized":
        return materialized_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                    num_items=num_items, student_bias=student_bias, teacher_bias=teacher_bias,
                                    divergence=divergence, beta=beta, temperature=temperature)
    if impl != "fused":
        raise ValueError(f"impl must be 'fused' or 'materialized', got {impl!r}")
    mod = _fused_ops()
    if mod is None or not hasattr(mod, "fused_linear_kd_loss"):
        return _chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                num_items=num_items, student_bias=student_bias, teacher_bias=teacher_bias,
                                divergence=divergence, beta=beta, temperature=temperature, chunk_size=chunk_size)
    return mod.fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    student_bias=student_bias, teacher_bias=teacher_bias, labels=labels,
                                    divergence=divergence, beta=beta, temperature=temperature,
                                    ignore_index=IGNORE_INDEX, reduction="mean", num_items=num_items,
                                    chunk_size=chunk_size)


# -- a top-k teacher (stored teacher logits, or a live teacher truncated to its top-k) ----------

def _kl(p: Tensor, lp: Tensor, lq: Tensor) -> Tensor:
    """``sum p (lp - lq)`` over the last dim with ``0 log 0 = 0``."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def _divergence_logprobs(lt: Tensor, ls: Tensor, divergence: str, beta: float) -> Tensor:
    """``[n]`` divergence between normalized log-distributions ``lt`` (teacher) and ``ls``."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    pt, ps = lt.exp(), ls.exp()
    if divergence == "forward_kl":
        return _kl(pt, lt, ls)
    if divergence == "reverse_kl":
        return _kl(ps, ls, lt)
    if divergence == "jsd":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return beta * _kl(pt, lt, lm) + (1 - beta) * _kl(ps, ls, lm)
    raise ValueError(f"unknown divergence {divergence!r}")


def topk_divergence_per_token(s_logits: Tensor, values: Tensor, indices: Tensor, tail: Tensor | None, *,
                              divergence: str, beta: float, temperature: float) -> Tensor:
    """``[N]`` divergence of the student's full logits ``[N, V]`` from a top-k teacher.

    ``values [N, k]`` are the teacher's top-k logits up to a per-row shift (the stored form is
    log-probabilities) at ``indices [N, k]``. Semantics:

    - ``tail=None`` (renorm): the teacher is ``softmax(values / T)`` on the top-k, 0 elsewhere;
      the student keeps its full softmax (what the fused loss's ``teacher_topk`` computes).
    - ``tail [N]`` (tail): the log-mass outside the top-k, with the same shift; both models become
      distributions over k + 1 buckets (the top-k tokens and "the rest"), the teacher's
      ``softmax([values, tail] / T)``. Exact for the full teacher at T = 1 (the tail bucket's
      inner shape is unknown at other temperatures, so ``tail / T`` stands for it).
    """
    T = float(temperature)
    ls = torch.log_softmax(s_logits / T, -1)
    idx = indices.long()
    ls_k = ls.gather(1, idx)
    if tail is None:
        lt_k = torch.log_softmax(values.to(ls.dtype) / T, -1)
        if divergence == "forward_kl":  # needs no [N, V] teacher
            return _kl(lt_k.exp(), lt_k, ls_k)
        lt = torch.full_like(ls, -math.inf).scatter_(1, idx, lt_k)
        return _divergence_logprobs(lt, ls, divergence, beta)
    rest = ls.scatter(1, idx, -math.inf).logsumexp(-1, keepdim=True)
    lt_b = torch.log_softmax(torch.cat([values.to(ls.dtype), tail.to(ls.dtype)[:, None]], 1) / T, -1)
    return _divergence_logprobs(lt_b, torch.cat([ls_k, rest], 1), divergence, beta)


def materialized_topk_kd_loss(student_hidden: Tensor, student_weight: Tensor, values: Tensor, indices: Tensor,
                              tail: Tensor | None, labels: Tensor, *, num_items: float,
                              student_bias: Tensor | None = None, divergence: str = "forward_kl", beta: float = 0.5,
                              temperature: float = 1.0) -> Tensor:
    """Plain-torch KD loss against a top-k teacher with full ``[N, V]`` student logits (fp32)."""
    s = _logits(student_hidden, student_weight, student_bias)
    per = topk_divergence_per_token(s, values, indices, tail, divergence=divergence, beta=beta,
                                    temperature=temperature)
    return (per * (labels != IGNORE_INDEX)).sum() / num_items


def _fused_tail_supported(mod) -> bool:
    import inspect

    fn = getattr(mod, "fused_linear_kd_loss", None)
    return fn is not None and "teacher_topk_tail_lse" in inspect.signature(fn).parameters


def kd_loss_topk(student_hidden: Tensor, student_weight: Tensor, values: Tensor, indices: Tensor, tail: Tensor | None,
                 labels: Tensor, *, num_items: float, semantics: str = "tail", impl: str = "fused",
                 student_bias: Tensor | None = None, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """KD loss of student hidden states ``[N, Hs]`` (lm_head ``[V, Hs]``) against a top-k teacher:
    ``values [N, k]``, ``indices [N, k]`` and, for ``semantics="tail"``, ``tail [N]`` (see
    :func:`topk_divergence_per_token`). Returns ``sum over valid tokens / num_items``.

    ``impl="fused"`` uses the fused loss's top-k path (never ``[N, V]`` in memory); the tail
    bucket needs its ``teacher_topk_tail_lse``, and where that is absent the loss runs chunked
    under activation checkpointing (one ``[chunk, V]`` block alive at a time)."""
    if semantics not in ("tail", "renorm"):
        raise ValueError(f"semantics must be 'tail' or 'renorm', got {semantics!r}")
    t = tail if semantics == "tail" else None
    if t is None and semantics == "tail":
        raise ValueError("semantics='tail' needs the teacher's tail log-mass")
    kw = dict(student_bias=student_bias, divergence=divergence, beta=beta, temperature=temperature)
    if impl == "materialized":
        return materialized_topk_kd_loss(student_hidden, student_weight, values, indices, t, labels,
                                         num_items=num_items, **kw)
    if impl != "fused":
        raise ValueError(f"impl must be 'fused' or 'materialized', got {impl!r}")
    mod = _fused_ops()
    fused = mod is not None and hasattr(mod, "fused_linear_kd_loss")
    if fused and (t is None or _fused_tail_supported(mod)):
        extra = {} if t is None else {"teacher_topk_tail_lse": t.float()}
        return mod.fused_linear_kd_loss(student_hidden, student_weight, teacher_topk=(values, indices), labels=labels,
                                        ignore_index=IGNORE_INDEX, reduction="mean", num_items=num_items,
                                        chunk_size=chunk_size, **kw, **extra)
    from torch.utils.checkpoint import checkpoint

    def part(h, v, i, tt, lab):
        return materialized_topk_kd_loss(h, student_weight, v, i, tt, lab, num_items=num_items, **kw)

    total = student_hidden.new_zeros((), dtype=torch.float32)
    for sl in _chunks(student_hidden.shape[0], chunk_size or 1024):
        total = total + checkpoint(part, student_hidden[sl], values[sl], indices[sl], None if t is None else t[sl],
                                   labels[sl], use_reentrant=False)
    return total


def cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, num_items: float, impl: str = "fused",
                  bias: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """Next-token CE from hidden states ``[N, H]`` and lm_head ``[V, H]``: ``sum / num_items``."""
    if impl == "materialized":
        return materialized_cross_entropy(hidden, weight, labels, num_items=num_items, bias=bias)
    if impl != "fused":
        raise ValueError(f"impl must be 'fused' or 'materialized', got {impl!r}")
    mod = _fused_ops()
    fn = getattr(mod, "fused_linear_cross_entropy", None) if mod is not None else None
    if fn is None:
        return _chunked_cross_entropy(hidden, weight, labels, num_items=num_items, bias=bias, chunk_size=chunk_size)
    return fn(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX, reduction="mean", num_items=num_items,
              chunk_size=chunk_size)


# -- a chunked fallback while the fused ops are absent ---------------------------------------------
# Each chunk of tokens is computed under activation checkpointing, so only one chunk's [C, V]
# logits are alive at a time (recomputed in backward). Slower than the fused kernel's
# single pass, but memory-lean and exact.

def _chunks(n: int, chunk: int):
    for i in range(0, n, chunk):
        yield slice(i, min(i + chunk, n))


def _chunked_kd_loss(sh, sw, th, tw, labels, *, num_items, student_bias, teacher_bias, divergence, beta,
                     temperature, chunk_size):
    from torch.utils.checkpoint import checkpoint

    chunk = chunk_size or 1024

    def part(h, t_h, lab):
        return materialized_kd_loss(h, sw, t_h, tw, lab, num_items=num_items, student_bias=student_bias,
                                    teacher_bias=teacher_bias, divergence=divergence, beta=beta, temperature=temperature)

    total = sh.new_zeros((), dtype=torch.float32)
    for sl in _chunks(sh.shape[0], chunk):
        total = total + checkpoint(part, sh[sl], th[sl], labels[sl], use_reentrant=False)
    return total


def _chunked_cross_entropy(h, w, labels, *, num_items, bias, chunk_size):
    from torch.utils.checkpoint import checkpoint

    chunk = chunk_size or 1024

    def part(x, lab):
        return materialized_cross_entropy(x, w, lab, num_items=num_items, bias=bias)

    total = h.new_zeros((), dtype=torch.float32)
    for sl in _chunks(h.shape[0], chunk):
        total = total + checkpoint(part, h[sl], labels[sl], use_reentrant=False)
    return total
