"""Fused linear knowledge-distillation loss (and fused linear cross-entropy) over large vocabularies.

The student's logits ``z_s = h_s @ W_s^T + b_s`` (``[N, V]``) and the teacher's ``z_t`` are never
materialized whole: tokens are processed in chunks of ``chunk_size`` rows, each chunk's logits live
in a few preallocated fp32 ``[chunk, V]`` buffers that are reused for every chunk, the softmax math
runs in fp32 in place, and the gradients for the student hidden states, weight and bias are produced
during the forward pass (accumulated in fp32) and returned, scaled by ``grad_output``, by backward
(as Liger's chunked losses do). Extra memory is O(chunk x V) whatever N is.

Math (per token ``i``; ``T`` is the temperature, ``u = z / T``, ``p = softmax(u)``, ``log`` natural):

- ``forward_kl``: ``KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)`` (the Minitron papers' choice).
- ``reverse_kl``: ``KL(p_s || p_t)``.
- ``jsd`` (generalized, as TRL's GKD and Liger define it): with ``m = beta p_t + (1 - beta) p_s``,
  ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``; ``beta = 0`` is ``forward_kl`` and
  ``beta = 1`` is ``reverse_kl`` (both limits of the formula vanish, so they are special-cased as
  Liger and TRL do).
- The divergence is multiplied by ``T**2`` only when ``t2_scaling=True`` (Hinton et al.'s scaling,
  which keeps gradient magnitudes comparable across temperatures); the default is no scaling.
- ``hard_label_weight = w > 0`` adds ``w * CE(z_s, label)`` computed on the **unscaled** logits
  (temperature 1).
- Tokens whose label is ``ignore_index`` contribute nothing. ``reduction="mean"`` divides the sum
  over valid tokens by their number (0 valid tokens give a loss of 0 and zero gradients, no NaN),
  ``"sum"`` returns the sum, ``"none"`` the per-token losses ``[N]``; ``num_items`` (gradient
  accumulation across micro-batches) replaces the divisor of ``"mean"``.

Gradient w.r.t. the scaled student logits ``u_s`` (divided by ``T`` once more for ``z_s``):
``forward_kl``: ``p_s - p_t``; ``reverse_kl``: ``p_s (log p_s - log p_t - KL)``; ``jsd``:
``(1 - beta) p_s (log p_s - log m - KL(p_s || m))``; CE: ``softmax(z_s) - onehot``.

Implementations: ``torch`` (CPU and CUDA: chunked GEMMs plus in-place fp32 softmax math) and
``triton`` (CUDA, or the CPU interpreter: the GEMMs stay cuBLAS/torch and the per-chunk softmax,
loss and dlogits run in one Triton kernel with an online log-sum-exp over vocabulary blocks, see
``kernels/kd_loss.py``). ``kd_loss_reference`` is the float64 ground truth the tests use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from minitron_fast.ops._dispatch import resolve_impl

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Default chunk: about 576 MB for all fp32 [chunk, V] buffers of a call (the torch forward-KL
# path uses 3 of them: 384 rows at V=128,256; the C++ row kernel 2: 576 rows), a multiple of 64
# rows in [64, 1024]. Fewer, larger chunks make the chunk GEMMs more efficient.
_WORKSPACE_BYTES = 576 * 2**20


# "cpp" needs a _C built with the KD row kernel (a stale build from before it falls back to torch)
KD_IMPLS = ("triton", "cpp", "torch")


def default_chunk_size(V: int, N: int, n_buffers: int = 3) -> int:
    """Rows per chunk: ``_WORKSPACE_BYTES / (n_buffers 4 V)`` rounded down to a multiple of 64, in
    [64, 1024], at most N."""
    c = max(64, min(1024, (_WORKSPACE_BYTES // (n_buffers * 4 * max(V, 1))) // 64 * 64))
    return max(1, min(c, N))


def _n_buffers(cfg, teacher_kind, need_ce) -> int:
    """How many ``[chunk, V]`` fp32 buffers ``_run`` fills per chunk: the C++ rows need only the
    student's and the teacher's logits for forward KL (and CE alone works in place)."""
    if cfg.impl == "cpp":
        if cfg.divergence is None:
            return 1
        if cfg.divergence == "forward_kl" and teacher_kind in ("hidden", "logits") and not need_ce:
            return 2
    return 3


# ------------------------------------------------------------------------------------------------
# configuration and validation
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Cfg:
    divergence: Optional[str]  # None: cross-entropy only
    beta: float
    temperature: float
    t2_scaling: bool
    hard_label_weight: float
    ignore_index: int
    chunk_size: int
    impl: str

    @property
    def kd_scale(self) -> float:
        return self.temperature ** 2 if self.t2_scaling else 1.0


def _canonical_divergence(divergence: str, beta: float) -> str:
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def _check_float(name: str, t: torch.Tensor, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if dim and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_common(divergence, beta, temperature, reduction, num_items, hard_label_weight, chunk_size):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not (isinstance(beta, (int, float)) and 0.0 <= float(beta) <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    if not (isinstance(temperature, (int, float)) and float(temperature) > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if float(hard_label_weight) < 0:
        raise ValueError(f"hard_label_weight must be >= 0, got {hard_label_weight!r}")
    _check_num_items(num_items)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_num_items(num_items):
    if num_items is None:
        return
    v = float(num_items.item() if isinstance(num_items, torch.Tensor) else num_items)
    if not v > 0:
        raise ValueError(f"num_items must be positive, got {v}")


def _check_labels(labels, N, V, ignore_index, device):
    if labels is None:
        return None
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    labels = labels.reshape(-1)
    if labels.numel() != N:
        raise ValueError(f"labels has {labels.numel()} entries, expected one per token ({N})")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device}, the hidden states on {device}")
    labels = labels.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        v = int(labels[bad][0])
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; found {v}")
    return labels


def _divisor(reduction, num_items, n_valid):
    if reduction == "sum" or reduction == "none":
        return 1.0
    if num_items is not None:
        return float(num_items.item() if isinstance(num_items, torch.Tensor) else num_items)
    return float(max(n_valid, 1))  # 0 valid tokens: the sum is 0, so is the mean


# ------------------------------------------------------------------------------------------------
# sources of logits: a linear head (hidden states x weight) or given logits
# ------------------------------------------------------------------------------------------------

class _LinearSource:
    """``z = h @ W^T + b`` chunk by chunk into an fp32 buffer; optionally backpropagates ``dz``."""

    def __init__(self, h, W, b, need_dh=False, need_dw=False, need_db=False):
        self.h, self.b = h, b
        # fp32 GEMMs: on the CPU a bf16/fp16 head is upcast once (V x H x 4 bytes, independent of N)
        # so logits and gradients are computed and accumulated in fp32; on CUDA the chunk GEMMs run
        # in the input dtype with fp32 accumulation and an fp32 output (no bf16 logits).
        self.W32 = W if (W.dtype == torch.float32 or W.is_cuda) else W.float()
        self.b32 = None if b is None else b.float()
        self.need_dh, self.need_dw, self.need_db = need_dh, need_dw, need_db
        N, H = h.shape
        V = W.shape[0]
        dev = h.device
        self.dh = torch.zeros(N, H, dtype=torch.float32, device=dev) if need_dh else None
        self.dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_dw else None
        self.db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None

    def _h32(self, c0, c1):
        hc = self.h[c0:c1]
        if self.W32.dtype == torch.float32 and hc.dtype != torch.float32:
            hc = hc.float()
        return hc

    def fill(self, out, c0, c1, scale):
        hc = self._h32(c0, c1)
        if hc.dtype == torch.float32:
            torch.mm(hc, self.W32.t(), out=out)
        else:  # CUDA, half precision: fp32 output of the half GEMM (never bf16 logits)
            try:
                torch.mm(hc, self.W32.t(), out_dtype=torch.float32, out=out)
            except (RuntimeError, TypeError):  # older torch: upcast this chunk's operands
                torch.mm(hc.float(), self.W32.t().float(), out=out)
        if self.b32 is not None:
            out.add_(self.b32)
        if scale != 1.0:
            out.mul_(scale)

    def backprop(self, g, c0, c1):
        """``g``: ``[c, V]`` fp32 dL/dz for rows c0:c1 (already scaled)."""
        W = self.W32
        if self.need_dh:
            if W.dtype == torch.float32:
                torch.mm(g, W, out=self.dh[c0:c1])
            else:
                self.dh[c0:c1] = torch.mm(g.to(W.dtype), W).float()
        if self.need_dw:
            hc = self._h32(c0, c1)
            self.dw.addmm_(g.t(), hc if hc.dtype == torch.float32 else hc.float())
        if self.need_db:
            self.db.add_(g.sum(0))


class _LogitsSource:
    """Given logits ``[N, V]`` (any float dtype), copied chunk by chunk into fp32; grads into ``dz``."""

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


# ------------------------------------------------------------------------------------------------
# per-chunk math (torch, fp32, in place on preallocated buffers)
# ------------------------------------------------------------------------------------------------

def _rowdot(a, b):
    """sum_v a[i, v] * b[i, v] without a [c, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _Buffers:
    """Preallocated fp32 [chunk, V] buffers, reused for every chunk (fresh ones page-fault)."""

    def __init__(self, chunk, V, device):
        self.chunk, self.V, self.device = chunk, V, device
        self._bufs = {}

    def get(self, name, rows):
        b = self._bufs.get(name)
        if b is None:
            b = self._bufs[name] = torch.empty(self.chunk, self.V, dtype=torch.float32, device=self.device)
        return b[:rows]


def _chunk_torch(S, teacher, a, cfg, bufs, need_grad):
    """KD math on one chunk of rows, fp32, in place.

    S: ``[c, V]`` the student's scaled logits ``u_s = z_s / T`` (overwritten).
    teacher: ``("dense", Tt)`` with ``Tt`` ``[c, V]`` the teacher's ``u_t`` (overwritten), or
        ``("topk", vals, idx)`` with ``vals`` ``[c, k]`` already divided by T.
    a: ``[c]`` fp32 per-row gradient scale (0 on ignored rows).
    Returns (kd_rows ``[c]``, G) where G is a ``[c, V]`` buffer holding dL/dz_s when ``need_grad``.
    """
    T = cfg.temperature
    c = S.shape[0]
    div = cfg.divergence
    ms = S.amax(1, keepdim=True)
    S.sub_(ms)  # S = u_s - max
    g_scale = (a * (cfg.kd_scale / T))[:, None]  # d/du -> d/dz, the T^2 option, the row scale

    if div == "forward_kl" and teacher[0] == "dense":
        # fast path, 3 buffers, ~21 passes over [c, V]:
        # kd = sum p_t (log p_t - log p_s) = <Et, Tt - S> / St - log St + log Ss.
        # The difference is taken per element before the row sum: <Et, Tt> - <Et, S> as two sums
        # cancels badly for peaked distributions (measured 5e-5 relative error at loss ~18 vs
        # 7e-6 for materialized fp32 logits).
        Tt = teacher[1]
        Tt.sub_(Tt.amax(1, keepdim=True))
        Et = bufs.get("e", c)
        torch.exp(Tt, out=Et)
        St = Et.sum(1)
        Tt.sub_(S)
        A = _rowdot(Et, Tt)
        Es = Tt  # the teacher's logits are consumed: reuse their buffer
        torch.exp(S, out=Es)
        Ss = Es.sum(1)
        kd_rows = A / St - St.log() + Ss.log()
        G = Es
        if need_grad:
            G.mul_(g_scale / Ss[:, None])
            G.addcmul_(Et, -g_scale / St[:, None].expand(c, 1))
        return kd_rows, G

    if teacher[0] == "topk":
        _, vals, idx, tail = teacher
        return _topk_rows(S, vals, idx, tail, cfg, bufs, need_grad, g_scale)
    # dense reverse KL / JSD: log-probabilities in place, then the accurate per-element rows
    Es = bufs.get("e", c)
    torch.exp(S, out=Es)
    S.sub_(Es.sum(1, keepdim=True).log())  # S = log p_s
    lt = teacher[1]
    lt.sub_(torch.logsumexp(lt, 1, keepdim=True))  # log p_t
    kd_rows, G = _ROWS[div](S, lt, cfg.beta)
    if need_grad:
        G.mul_(g_scale)
    return kd_rows, G


def _fkl_rows(ls, lt, beta):
    """KL(p_t || p_s) per row and its gradient w.r.t. the student's logits, from log-probabilities
    ``ls``, ``lt`` ``[c, K]``: ``sum_v p_t (log p_t - log p_s)`` summed per element, gradient ``p_s - p_t``."""
    pt = lt.exp()
    kd = torch.where(pt > 0, pt * (lt - ls), 0.0).sum(1)
    return kd, ls.exp().sub_(pt)


def _rkl_rows(ls, lt, beta):
    """KL(p_s || p_t): ``d = log p_s - log p_t`` per element first, ``kd = sum p_s d``; gradient
    ``p_s (d - dbar)`` with ``dbar = kd / sum p_s`` so each gradient row sums to zero up to rounding
    (no difference of two ~log V row sums, which was the source of the old 1e-3 errors)."""
    ps = ls.exp()
    d = torch.where(ps > 0, ls - lt, 0.0)  # p_s = 0: no contribution (also where both are -inf)
    pd = ps * d
    kd = pd.sum(1)
    dbar = (kd / ps.sum(1))[:, None]
    return kd, pd.sub_(ps * dbar)


def _jsd_rows(ls, lt, beta):
    """Generalized JSD ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = beta p_t + (1 - beta) p_s``,
    per element from ``d = log p_s - log p_t``: ``log p_s - log m = -log((1 - beta) + beta e^-d)`` and
    ``log p_t - log m = -log(beta + (1 - beta) e^d)`` (no cancellation of ~log V terms); gradient
    ``(1 - beta) p_s (r - rbar)``, ``r = log p_s - log m``, ``rbar = <p_s, r> / sum p_s``."""
    lb, l1b = math.log(beta), math.log1p(-beta)
    ps, pt = ls.exp(), lt.exp()
    both = (ps > 0) | (pt > 0)
    d = torch.where(both, ls - lt, 0.0)  # +-inf where exactly one side is 0
    rs = -torch.logaddexp(torch.full_like(d, l1b), lb - d)  # log p_s - log m
    rt = -torch.logaddexp(torch.full_like(d, lb), l1b + d)  # log p_t - log m
    f = beta * torch.where(pt > 0, pt * rt, 0.0) + (1 - beta) * torch.where(ps > 0, ps * rs, 0.0)
    kd = f.sum(1)
    prs = torch.where(ps > 0, ps * rs, 0.0)
    rbar = (prs.sum(1) / ps.sum(1))[:, None]
    return kd, prs.sub_(ps * rbar).mul_(1 - beta)


_ROWS = {"forward_kl": _fkl_rows, "reverse_kl": _rkl_rows, "jsd": _jsd_rows}


def _topk_rows(S, vals, idx, tail, cfg, bufs, need_grad, g_scale):
    """A top-k teacher as k + 1 buckets: its k entries and one tail bucket (teacher logit ``tail``,
    or ``-inf`` = probability 0 when no tail is given: the renormalized top-k). The student's
    buckets are its k entries and the log-sum-exp of all its other logits, exact (the top-k
    entries are zeroed in the exp buffer before the sum, no subtraction). The divergence and its
    gradient w.r.t. the bucket logits ``y_b`` come from the same per-element rows as dense
    teachers; a tail entry ``j`` gets ``dD/dy_tail * p_s,j / P_s,tail``.

    S: ``[c, V]`` the student's scaled logits (overwritten); vals ``[c, k]`` and tail ``[c]`` (or None)
    the teacher's scaled logits. Returns (kd_rows ``[c]``, G ``[c, V]`` = dL/dz_s when need_grad)."""
    c, k = vals.shape
    S.sub_(S.amax(1, keepdim=True))
    E = bufs.get("e", c)
    torch.exp(S, out=E)
    log_ss = E.sum(1, keepdim=True).log()
    xk = S.gather(1, idx)  # [c, k]
    E.scatter_(1, idx, 0.0)
    s_tail = E.sum(1, keepdim=True)  # the student's mass outside the teacher's top-k (unnormalized)
    ls = torch.cat([xk, s_tail.log()], 1) - log_ss  # [c, k + 1] the student's bucket log-probabilities
    tt = tail[:, None] if tail is not None else vals.new_full((c, 1), -math.inf)
    lt = torch.log_softmax(torch.cat([vals, tt], 1), 1)
    kd, gb = _ROWS[cfg.divergence](ls, lt, cfg.beta)  # gb: [c, k + 1] dD/dy_b
    G = E
    if need_grad:
        coef = torch.where(s_tail > 0, gb[:, k:] / s_tail, 0.0)
        G.mul_(coef * g_scale)
        G.scatter_(1, idx, gb[:, :k] * g_scale)
    return kd, G


def _chunk_cpp(S, Tt, a, cfg, need_grad):
    """``_chunk_torch``'s dense forward-KL math in the C++ row kernel (``csrc/kd_rows.cpp``): three
    passes over each row instead of ~20, fp64 row sums across blocks. Returns (kd_rows, G = S)."""
    from minitron_fast._ext import _C

    c, V = S.shape
    g = (a * (cfg.kd_scale / cfg.temperature)).contiguous()
    kd_rows = torch.empty(c, dtype=torch.float32)
    _C.kd_forward_kl_rows(S.data_ptr(), S.stride(0), Tt.data_ptr(), Tt.stride(0), g.data_ptr(), kd_rows.data_ptr(),
                          c, V, bool(need_grad), torch.get_num_threads())
    return kd_rows, S


def _cpp_fn(name):
    """``minitron_fast._C.<name>``, or None when the extension is missing or predates it."""
    from minitron_fast._ext import _C

    return getattr(_C, name, None) if _C is not None else None


def _cpu_rows(*bufs) -> bool:
    """fp32 CPU buffers with unit column stride: what the C++ row kernels take."""
    return all(not b.is_cuda and b.dtype == torch.float32 and b.stride(1) == 1 for b in bufs)


def _cpp_rows_ok(S, Tt, cfg) -> bool:
    """Whether ``_chunk_cpp`` takes this chunk: forward KL, a dense teacher, fp32 CPU row buffers."""
    return cfg.divergence == "forward_kl" and _cpu_rows(S, Tt) and _cpp_fn("kd_forward_kl_rows") is not None


def _chunk_triton(S, Tt, a, cfg, need_grad):
    """``_chunk_torch``'s dense-teacher math in one Triton kernel (``kernels/kd_loss.py``)."""
    from minitron_fast.kernels import kd_loss as kd_kernels

    kd_rows = torch.empty(S.shape[0], dtype=torch.float32, device=S.device)
    kd_kernels.kd_softmax(S, Tt, a.contiguous(), kd_rows, divergence=cfg.divergence, beta=cfg.beta,
                          g_mult=cfg.kd_scale / cfg.temperature, write_grad=need_grad)
    return kd_rows, S


def _run(student, teacher_kind, teacher_src, labels, N, V, cfg, row_scale, need_grad, device, want_ce=False):
    """Loops over chunks. Returns the per-token terms ``(kd [N], ce [N] or None)`` fp32 (``kd`` already
    times ``kd_scale``; both 0 on ignored rows; the loss row is ``kd + w * ce``); ``student``
    accumulates ``row_scale``-weighted gradients when ``need_grad``. ``want_ce``: compute the CE
    term (for ``return_parts``) even when its weight is 0.

    teacher_kind: "hidden"/"logits" (``teacher_src`` a source), "topk" (``(vals, idx)``), None (CE).
    row_scale: ``[N]`` fp32 per-token dL/dloss_i (already 0 on ignored rows)."""
    T = cfg.temperature
    w = cfg.hard_label_weight
    div = cfg.divergence
    kd_out = torch.zeros(N, dtype=torch.float32, device=device)
    valid = None if labels is None else labels != cfg.ignore_index
    need_ce = labels is not None and (w > 0 or div is None or want_ce)
    ce_out = torch.zeros(N, dtype=torch.float32, device=device) if need_ce else None
    chunk = max(1, min(cfg.chunk_size or default_chunk_size(V, N, _n_buffers(cfg, teacher_kind, need_ce)), N))
    bufs = _Buffers(chunk, V, device)
    if div is None:
        w = 1.0
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        c = c1 - c0
        if valid is not None:
            vc = valid[c0:c1]
            if not bool(vc.any()):
                continue  # every token ignored: no loss, zero gradients, no GEMMs
        else:
            vc = None
        a = row_scale[c0:c1]
        S = bufs.get("s", c)
        student.fill(S, c0, c1, 1.0 if need_ce else 1.0 / T)
        kd = None
        Gce = None
        ce_cpp = _cpp_fn("ce_rows") if need_ce and cfg.impl == "cpp" and _cpu_rows(S) else None
        if ce_cpp is not None:  # hard-label CE in the C++ row kernel: in place without KD, else in its own buffer
            lab = torch.where(vc, labels[c0:c1], 0).contiguous()
            P = S if div is None else bufs.get("p1", c)
            ce = torch.empty(c, dtype=torch.float32)
            b = (a * w).contiguous()
            ce_cpp(S.data_ptr(), S.stride(0), P.data_ptr(), P.stride(0), lab.data_ptr(), b.data_ptr(), ce.data_ptr(),
                   c, V, bool(need_grad and w > 0), torch.get_num_threads())
            ce_c = ce
            if need_grad and w > 0:
                Gce = P
            if div is not None and T != 1.0:
                S.mul_(1.0 / T)
        elif need_ce:  # hard-label CE on the unscaled z_s, its softmax in its own buffer
            lab = torch.where(vc, labels[c0:c1], 0)
            zl = S.gather(1, lab[:, None]).view(-1)
            m1 = S.amax(1, keepdim=True)
            P = bufs.get("p1", c)
            torch.sub(S, m1, out=P)
            P.exp_()
            s1 = P.sum(1, keepdim=True)
            ce_c = (m1 + s1.log()).view(-1) - zl
            if need_grad and w > 0:
                b = (a * w)[:, None]
                P.mul_(b / s1)
                P.scatter_add_(1, lab[:, None], -b)
                Gce = P
            if div is not None and T != 1.0:
                S.mul_(1.0 / T)
        G = Gce
        if div is not None:
            if teacher_kind == "topk":
                vals, idx, tail = teacher_src
                tch = ("topk", vals[c0:c1].float() / T, idx[c0:c1].long(),
                       None if tail is None else tail[c0:c1].float() / T)
            else:
                Tt = bufs.get("t", c)
                teacher_src.fill(Tt, c0, c1, 1.0 / T)
                if teacher_kind == "logits":
                    Tt.clamp_(min=-1e30)  # masked (-inf) teacher logits: p_t = 0 there, and 0 * -inf = nan
                tch = ("dense", Tt)
            if cfg.impl == "triton" and tch[0] == "dense":
                kd, G = _chunk_triton(S, tch[1], a, cfg, need_grad)
            elif cfg.impl == "cpp" and tch[0] == "dense" and _cpp_rows_ok(S, tch[1], cfg):
                kd, G = _chunk_cpp(S, tch[1], a, cfg, need_grad)
            else:  # top-k teachers use the torch math (k entries per row: a scatter, no vocabulary scan)
                kd, G = _chunk_torch(S, tch, a, cfg, bufs, need_grad)
            kd = kd * cfg.kd_scale
            if Gce is not None and need_grad:
                G.add_(Gce)
        if need_grad and G is not None:
            student.backprop(G, c0, c1)
        if kd is not None:
            kd_out[c0:c1] = kd if vc is None else torch.where(vc, kd, 0.0)
        if need_ce:
            ce_out[c0:c1] = torch.where(vc, ce_c, 0.0)
    return kd_out, ce_out


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------

def _row_scale(labels, N, ignore_index, divisor, device):
    if labels is None:
        return torch.full((N,), 1.0 / divisor, dtype=torch.float32, device=device), N
    valid = labels != ignore_index
    return valid.float() / divisor, int(valid.sum())


def _reduce(rows, reduction, divisor):
    if reduction == "none":
        return rows
    return rows.sum() / divisor


def _outputs(ctx, kd, ce, cfg, reduction, divisor, n_valid, device):
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
    count = torch.tensor(n_valid, dtype=torch.int64, device=device)
    ctx.mark_non_differentiable(kd_p, ce_p, count)
    return _reduce(rows, reduction, divisor), kd_p, ce_p, count


class _FusedKD(torch.autograd.Function):
    """Inputs: student hidden ``[N, Hs]``, weight ``[V, Hs]``, bias ``[V]`` or None; the teacher
    (kind + tensors) and the labels ride in ``spec``. Gradients are computed in forward for
    ``"mean"``/``"sum"``; ``"none"`` recomputes them in backward with the per-token grad_output."""

    @staticmethod
    def forward(ctx, h, W, b, spec):
        labels, teacher_kind, teacher, cfg, reduction, num_items, want_ce = spec
        N, V = h.shape[0], W.shape[0]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        n_valid = N if labels is None else int((labels != cfg.ignore_index).sum())
        divisor = _divisor(reduction, num_items, n_valid)
        scale, _ = _row_scale(labels, N, cfg.ignore_index, divisor, h.device)
        precompute = any(need) and reduction != "none"
        with torch.no_grad():
            student = _LinearSource(h, W, b, *(need if precompute else (False,) * 3))
            tsrc = _teacher_source(teacher_kind, teacher)
            kd, ce = _run(student, teacher_kind, tsrc, labels, N, V, cfg, scale, precompute, h.device, want_ce)
        ctx.meta = (h.dtype, W.dtype, None if b is None else b.dtype, reduction, need)
        if precompute:
            ctx.grads = (student.dh, student.dw, student.db)
        elif any(need):  # reduction="none": keep inputs, recompute in backward
            ctx.spec = spec
            ctx.save_for_backward(h, W, b)
        return _outputs(ctx, kd, ce, cfg, reduction, divisor, n_valid, h.device)

    @staticmethod
    def backward(ctx, grad_out, *_parts):
        hd, wd, bd, reduction, need = ctx.meta
        if reduction != "none":
            dh, dw, db = ctx.grads
            ctx.grads = None
            g = grad_out.float()
            if not bool(g == 1):
                dh = None if dh is None else dh * g
                dw = None if dw is None else dw * g
                db = None if db is None else db * g
        else:
            h, W, b = ctx.saved_tensors
            labels, teacher_kind, teacher, cfg = ctx.spec[:4]
            N, V = h.shape[0], W.shape[0]
            scale = grad_out.float().reshape(-1)
            if labels is not None:
                scale = scale * (labels != cfg.ignore_index).float()
            with torch.no_grad():
                student = _LinearSource(h, W, b, *need)
                _run(student, teacher_kind, _teacher_source(teacher_kind, teacher), labels, N, V, cfg, scale, True,
                     h.device)
            dh, dw, db = student.dh, student.dw, student.db
        return (None if dh is None else dh.to(hd), None if dw is None else dw.to(wd),
                None if db is None else db.to(bd), None)


class _LogitsKD(torch.autograd.Function):
    """``kd_loss_from_logits``: the student given as logits ``[N, V]`` (grads ``[N, V]`` in forward)."""

    @staticmethod
    def forward(ctx, z, spec):
        labels, teacher_kind, teacher, cfg, reduction, num_items, want_ce = spec
        N, V = z.shape
        n_valid = N if labels is None else int((labels != cfg.ignore_index).sum())
        divisor = _divisor(reduction, num_items, n_valid)
        scale, _ = _row_scale(labels, N, cfg.ignore_index, divisor, z.device)
        precompute = ctx.needs_input_grad[0] and reduction != "none"
        with torch.no_grad():
            student = _LogitsSource(z, precompute)
            kd, ce = _run(student, teacher_kind, _teacher_source(teacher_kind, teacher), labels, N, V, cfg, scale,
                          precompute, z.device, want_ce)
        ctx.zdtype, ctx.reduction = z.dtype, reduction
        if precompute:
            ctx.dz = student.dz
        elif ctx.needs_input_grad[0]:
            ctx.spec = spec
            ctx.save_for_backward(z)
        return _outputs(ctx, kd, ce, cfg, reduction, divisor, n_valid, z.device)

    @staticmethod
    def backward(ctx, grad_out, *_parts):
        if ctx.reduction != "none":
            dz = ctx.dz
            ctx.dz = None
            if not bool(grad_out == 1):
                dz = dz * grad_out.float()
            return dz.to(ctx.zdtype), None
        (z,) = ctx.saved_tensors
        labels, teacher_kind, teacher, cfg = ctx.spec[:4]
        N, V = z.shape
        scale = grad_out.float().reshape(-1)
        if labels is not None:
            scale = scale * (labels != cfg.ignore_index).float()
        with torch.no_grad():
            student = _LogitsSource(z, True)
            _run(student, teacher_kind, _teacher_source(teacher_kind, teacher), labels, N, V, cfg, scale, True,
                 z.device)
        return student.dz.to(ctx.zdtype), None


def _teacher_source(kind, teacher):
    if kind == "hidden":
        th, tw, tb = teacher
        return _LinearSource(th, tw, tb)
    if kind == "logits":
        return _LogitsSource(teacher)
    return teacher  # "topk": (vals, idx), or None


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------

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
        raise ValueError(f"{name} must be [..., H], got shape {tuple(t.shape)}")
    t2 = t.reshape(-1, t.shape[-1])
    if H is not None and t2.shape[1] != H:
        raise ValueError(f"{name} has hidden size {t2.shape[1]}, expected {H}")
    return t2


def _prepare_teacher(N, V, Hs_device, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk,
                     divergence, tail=None):
    given = [x is not None for x in (teacher_hidden, teacher_logits, teacher_topk)]
    if sum(given) != 1:
        raise ValueError("give exactly one teacher: teacher_hidden (+ teacher_weight), teacher_logits, or teacher_topk")
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight ([V, Ht])")
        _check_float("teacher_weight", teacher_weight, 2)
        _check_float("teacher_hidden", teacher_hidden, 0)
        th = _flatten_rows("teacher_hidden", teacher_hidden, teacher_weight.shape[1])
        if th.shape[0] != N:
            raise ValueError(f"teacher_hidden has {th.shape[0]} tokens, the student {N}")
        if teacher_weight.shape[0] != V:
            raise ValueError(f"teacher_weight has vocabulary {teacher_weight.shape[0]}, the student's is {V} "
                             "(map the vocabularies first; a different teacher vocabulary is not supported)")
        if th.dtype != teacher_weight.dtype:
            raise ValueError(f"teacher_hidden is {th.dtype} but teacher_weight is {teacher_weight.dtype}")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (V,):
            raise ValueError(f"teacher_bias must be [{V}], got {tuple(teacher_bias.shape)}")
        for n, t in (("teacher_hidden", th), ("teacher_weight", teacher_weight)):
            if t.device != Hs_device:
                raise ValueError(f"{n} is on {t.device}, the student on {Hs_device}")
        return "hidden", (th.detach(), teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    if tail is not None and teacher_topk is None:
        raise ValueError("teacher_topk_tail_lse is only used with teacher_topk")
    if teacher_weight is not None or teacher_bias is not None:
        raise ValueError("teacher_weight/teacher_bias are only used with teacher_hidden")
    if teacher_logits is not None:
        _check_float("teacher_logits", teacher_logits, 0)
        tl = _flatten_rows("teacher_logits", teacher_logits)
        if tl.shape[1] != V:
            raise ValueError(f"teacher_logits has vocabulary {tl.shape[1]}, the student's is {V}")
        if tl.shape[0] != N:
            raise ValueError(f"teacher_logits has {tl.shape[0]} tokens, the student {N}")
        return "logits", tl.detach()
    if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2):
        raise ValueError("teacher_topk must be a tuple (values [N, k], indices [N, k])")
    vals, idx = teacher_topk
    _check_float("teacher_topk values", vals, 0)
    vals = _flatten_rows("teacher_topk values", vals)
    idx = idx.reshape(vals.shape) if idx.numel() == vals.numel() else None
    if idx is None or vals.shape[0] != N:
        raise ValueError(f"teacher_topk must be (values [N, k], indices [N, k]) with N={N} matching shapes")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_topk indices must be int64 or int32, got {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
        raise ValueError(f"teacher_topk indices must lie in [0, {V})")
    if tail is not None:
        _check_float("teacher_topk_tail_lse", tail, 0)
        if tail.numel() != N or tail.dim() > 1 and tuple(tail.shape) != tuple(teacher_topk[0].shape[:-1]):
            raise ValueError(f"teacher_topk_tail_lse must hold one value per token ([N]={N}), "
                             f"got shape {tuple(tail.shape)}")
        if tail.device != Hs_device:
            raise ValueError(f"teacher_topk_tail_lse is on {tail.device}, the student on {Hs_device}")
        tail = tail.detach().reshape(N)
    elif divergence == "reverse_kl":
        raise ValueError("divergence='reverse_kl' with teacher_topk needs teacher_topk_tail_lse (without a tail "
                         "the teacher has zero probability outside the top-k: the KL is infinite); "
                         "pass the tail or use forward_kl or jsd")
    return "topk", (vals.detach(), idx.long(), tail)


@torch.compiler.disable  # chunk loops with data-dependent skips: run eagerly inside compiled code
def fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                         teacher_logits=None, teacher_topk=None, student_bias=None, teacher_bias=None, labels=None,
                         divergence="forward_kl", beta=0.5, temperature=1.0, ignore_index=-100,
                         hard_label_weight=0.0, reduction="mean", num_items=None, chunk_size=None, impl="auto",
                         t2_scaling=False, teacher_topk_tail_lse=None, return_parts=False):
    """Distillation loss of a student's lm_head against a teacher without materializing ``[N, V]``.

    Args:
        student_hidden: ``[N, Hs]`` (or ``[..., Hs]``) student final hidden states (after the norm).
        student_weight: ``[V, Hs]`` student lm_head weight. ``student_bias``: ``[V]`` or None.
        teacher_hidden, teacher_weight, teacher_bias: ``[N, Ht]``, ``[V, Ht]``, ``[V]``: the teacher
            as hidden states and its head (it gets no gradients). Or instead:
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
        num_items: divisor for ``"mean"`` (a token count across micro-batches for gradient accumulation).
        chunk_size: tokens per chunk (default: about 576 MB for all fp32 ``[chunk, V]`` buffers of
            the call: 384 rows at V=128,256 on the torch path, 576 with the C++ rows).
        impl: ``"auto"`` (the Triton softmax kernel on CUDA; on CPU the C++ row kernel when
            ``minitron_fast._C`` is built, else torch), ``"triton"``, ``"cpp"``, ``"torch"``. The
            C++ kernels cover forward KL with a dense teacher and the hard-label CE term; other
            divergences and top-k teachers run the torch math under ``"cpp"``.
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
    _check_common(divergence, beta, temperature, reduction, num_items, hard_label_weight, chunk_size)
    _check_float("student_weight", student_weight, 2)
    _check_float("student_hidden", student_hidden, 0)
    V, Hs = student_weight.shape
    lead_shape = student_hidden.shape[:-1]
    h = _flatten_rows("student_hidden", student_hidden, Hs)
    if h.dtype != student_weight.dtype:
        raise ValueError(f"student_hidden is {h.dtype} but student_weight is {student_weight.dtype}")
    if h.device != student_weight.device:
        raise ValueError(f"student_hidden is on {h.device}, student_weight on {student_weight.device}")
    if student_bias is not None and tuple(student_bias.shape) != (V,):
        raise ValueError(f"student_bias must be [{V}], got {tuple(student_bias.shape)}")
    N = h.shape[0]
    kind, teacher = _prepare_teacher(N, V, h.device, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
                                     teacher_topk, _canonical_divergence(divergence, float(beta)),
                                     teacher_topk_tail_lse)
    labels = _check_labels(labels, N, V, ignore_index, h.device)
    if hard_label_weight > 0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels")
    impl = resolve_impl(impl, h, op="fused_linear_kd_loss", choices=KD_IMPLS)
    cfg = _Cfg(_canonical_divergence(divergence, float(beta)), float(beta), float(temperature), bool(t2_scaling),
               float(hard_label_weight), int(ignore_index), chunk_size or 0, impl)
    if N == 0:
        return _empty(h, student_weight, lead_shape, reduction, return_parts)
    outs = _FusedKD.apply(h, student_weight, student_bias,
                          (labels, kind, teacher, cfg, reduction, num_items, return_parts))
    return _finish(outs, lead_shape, reduction, return_parts)


@torch.compiler.disable  # chunk loops with data-dependent skips: run eagerly inside compiled code
def kd_loss_from_logits(student_logits, teacher_logits=None, *, teacher_topk=None, labels=None,
                        divergence="forward_kl", beta=0.5, temperature=1.0, ignore_index=-100, hard_label_weight=0.0,
                        reduction="mean", num_items=None, chunk_size=None, impl="auto", t2_scaling=False,
                        teacher_topk_tail_lse=None, return_parts=False):
    """The same loss for callers that already hold the student's logits ``[N, V]`` (or ``[..., V]``).

    Works chunk by chunk (fp32 softmax in place, extra memory O(chunk x V)); the gradient
    ``[N, V]`` w.r.t. the student logits is produced in the forward pass. The teacher is given
    as ``teacher_logits`` ``[N, V]`` or ``teacher_topk`` ``(values [N, k], indices [N, k])`` (with
    ``teacher_topk_tail_lse`` ``[N]`` optional). Arguments, math and ``return_parts`` as in
    ``fused_linear_kd_loss``.

    Example:
        >>> zs = torch.randn(4, 10, requires_grad=True)
        >>> kd_loss_from_logits(zs, torch.randn(4, 10), temperature=2.0).backward()
    """
    _check_common(divergence, beta, temperature, reduction, num_items, hard_label_weight, chunk_size)
    _check_float("student_logits", student_logits, 0)
    lead_shape = student_logits.shape[:-1]
    z = _flatten_rows("student_logits", student_logits)
    N, V = z.shape
    kind, teacher = _prepare_teacher(N, V, z.device, None, None, None, teacher_logits, teacher_topk,
                                     _canonical_divergence(divergence, float(beta)), teacher_topk_tail_lse)
    labels = _check_labels(labels, N, V, ignore_index, z.device)
    if hard_label_weight > 0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels")
    impl = resolve_impl(impl, z, op="kd_loss_from_logits", choices=KD_IMPLS)
    cfg = _Cfg(_canonical_divergence(divergence, float(beta)), float(beta), float(temperature), bool(t2_scaling),
               float(hard_label_weight), int(ignore_index), chunk_size or 0, impl)
    outs = _LogitsKD.apply(z, (labels, kind, teacher, cfg, reduction, num_items, return_parts))
    return _finish(outs, lead_shape, reduction, return_parts)


@torch.compiler.disable  # chunk loops with data-dependent skips: run eagerly inside compiled code
def fused_linear_cross_entropy(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                               num_items=None, chunk_size=None, impl="auto"):
    """Cross-entropy of ``hidden @ weight^T + bias`` against ``labels`` without materializing ``[N, V]``.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``); weight: ``[V, H]``; bias: ``[V]`` or None;
        labels: ``[N]`` (already shifted), ``ignore_index`` rows masked.
        reduction: ``"mean"`` over valid tokens (or ``/ num_items``), ``"sum"``, ``"none"``.
        impl: ``"auto"`` (on CPU the C++ row kernel when ``minitron_fast._C`` is built, else
            torch), ``"cpp"``, ``"torch"``, ``"triton"`` (the torch math on CUDA tensors).

    Same chunking and in-forward gradients as ``fused_linear_kd_loss`` (used for teacher correction).

    Example:
        >>> h, W = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8)
        >>> fused_linear_cross_entropy(h, W, torch.tensor([1, 2, 3, -100, 4, 5])).backward()
    """
    _check_common("forward_kl", 0.5, 1.0, reduction, num_items, 0.0, chunk_size)
    _check_float("weight", weight, 2)
    _check_float("hidden", hidden, 0)
    V, H = weight.shape
    lead_shape = hidden.shape[:-1]
    h = _flatten_rows("hidden", hidden, H)
    if h.dtype != weight.dtype:
        raise ValueError(f"hidden is {h.dtype} but weight is {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be [{V}], got {tuple(bias.shape)}")
    if labels is None:
        raise ValueError("labels are required")
    N = h.shape[0]
    labels = _check_labels(labels, N, V, ignore_index, h.device)
    impl = resolve_impl(impl, h, op="fused_linear_cross_entropy", choices=KD_IMPLS)
    cfg = _Cfg(None, 0.5, 1.0, False, 1.0, int(ignore_index), chunk_size or 0, impl)
    if N == 0:
        return _empty(h, weight, lead_shape, reduction, False)
    outs = _FusedKD.apply(h, weight, bias, (labels, None, None, cfg, reduction, num_items, False))
    return _finish(outs, lead_shape, reduction, False)


# ------------------------------------------------------------------------------------------------
# float64 reference (materializes [N, V]; tests only)
# ------------------------------------------------------------------------------------------------

def kd_loss_reference(student_logits, teacher_logits=None, *, teacher_topk=None, labels=None, divergence="forward_kl",
                      beta=0.5, temperature=1.0, ignore_index=-100, hard_label_weight=0.0, reduction="mean",
                      num_items=None, t2_scaling=False, kd_weight=1.0, teacher_topk_tail_lse=None):
    """Straightforward float64 math on full logits ``[N, V]`` (differentiable through autograd).
    With ``teacher_topk_tail_lse`` both distributions are taken over the k + 1 buckets (the
    teacher's top-k entries and the rest), as ``fused_linear_kd_loss`` defines them."""
    zs = student_logits.double()
    N, V = zs.shape
    T = float(temperature)
    ls = torch.log_softmax(zs / T, -1)
    if teacher_topk_tail_lse is not None:
        vals, idx = teacher_topk
        idx = idx.long()
        lt = torch.log_softmax(torch.cat([vals.double(), teacher_topk_tail_lse.double()[:, None]], 1) / T, -1)
        out_mask = torch.ones_like(ls, dtype=torch.bool).scatter(1, idx, False)
        tail_s = torch.logsumexp(torch.where(out_mask, ls, -math.inf), -1, keepdim=True)
        ls = torch.cat([ls.gather(1, idx), tail_s], 1)
        teacher_logits, teacher_topk = lt, None  # already log-probabilities over the buckets: T = 1 below
        T_t = 1.0
    else:
        T_t = T
    if teacher_topk is not None:
        vals, idx = teacher_topk
        zt = torch.full((N, V), -math.inf, dtype=torch.float64, device=zs.device)
        zt.scatter_(1, idx.long(), vals.double())
    else:
        zt = teacher_logits.double()
    lt = torch.log_softmax(zt / T_t, -1)
    pt, ps = lt.exp(), ls.exp()

    def kl(p, lp, lq):  # sum p (lp - lq), 0 log 0 = 0
        return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)

    div = _canonical_divergence(divergence, float(beta))
    if div == "forward_kl":
        kd = kl(pt, lt, ls)
    elif div == "reverse_kl":
        kd = kl(ps, ls, lt)
    else:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        kd = beta * kl(pt, lt, lm) + (1 - beta) * kl(ps, ls, lm)
    rows = kd_weight * kd * (T * T if t2_scaling else 1.0)
    valid = torch.ones(N, dtype=torch.bool, device=zs.device) if labels is None else labels != ignore_index
    if hard_label_weight > 0:
        lab = torch.where(valid, labels, 0)
        ce = torch.logsumexp(zs, -1) - zs.gather(1, lab[:, None]).squeeze(1)
        rows = rows + hard_label_weight * ce
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    div_ = float(num_items) if num_items is not None else max(int(valid.sum()), 1)
    return rows.sum() / div_
