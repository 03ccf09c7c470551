"""The divergence registry: every divergence the KD loss knows, defined once.

Each entry carries
- ``code``: the integer the row kernels take (``csrc/kd_rows.cpp`` and ``kernels/kd_loss.py``
  branch on it); None for a divergence only the torch rows run;
- ``cpp``: the ``minitron_fast._C`` symbol of its C++ rows per teacher form (``kd_forward_kl_rows``
  is forward KL's three-pass dense kernel; ``kd_div_rows`` and ``kd_topk_rows`` branch on ``code``);
- ``inplace_dense``: the torch rows have a fused in-place path for a dense teacher (forward KL);
- ``rows``: the accurate fp32 torch rows (loss per row and its gradient w.r.t. the student's
  logits, from both sides' log-probabilities), used by the torch path for dense teachers and for
  the buckets of top-k teachers;
- ``reference``: the definitional formula, evaluated in float64 by ``kd_loss_reference``;
- ``impls``: which row implementations run it, per teacher form (``"dense"``: hidden states or
  logits; ``"topk"``: top-k values with or without a tail bucket).

Numerical method of ``rows`` (the issue-15 fix): with ``d = log p_s - log p_t`` taken per element,
every row sum is a sum of small per-element terms; no two ~log V row sums are subtracted. The
gradient rows are centred (``g = p_s (q - <p_s, q> / sum p_s)``), so each sums to zero up to
rounding, and ``dX = G @ W`` does not amplify a common offset of the lm_head rows.

Adding a divergence: one ``Divergence(...)`` passed to :func:`register`, in one file (a
torch-only one needs nothing else: its ``impls`` name ``"torch"`` only and its ``code`` is None;
``tests/ops/test_kd_registry.py`` adds one); to run it in the native rows too, a branch in the
kernels and its code there. Nothing outside this module names a divergence: configs, the KD step,
the integrations and the tests read the registry.

Torch-free to import (torch is imported inside the row functions), so reading a config that
names a divergence imports no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

# jsd's beta at 0 / 1 is forward / reverse KL (both limits of the formula vanish: special-cased,
# as Liger and TRL do)


def _kl64(p, lp, lq):
    """sum p (lp - lq) with 0 log 0 = 0."""
    import torch

    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def _fkl_reference(ls, lt, beta):
    return _kl64(lt.exp(), lt, ls)


def _rkl_reference(ls, lt, beta):
    return _kl64(ls.exp(), ls, lt)


def _jsd_reference(ls, lt, beta):
    import torch

    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    return beta * _kl64(lt.exp(), lt, lm) + (1 - beta) * _kl64(ls.exp(), ls, lm)


def _fkl_rows(ls, lt, beta):
    """KL(p_t || p_s): ``sum p_t (log p_t - log p_s)`` per element, gradient ``p_s - p_t``."""
    import torch

    pt = lt.exp()
    kd = torch.where(pt > 0, pt * (lt - ls), 0.0).sum(1)
    return kd, ls.exp().sub_(pt)


def _rkl_rows(ls, lt, beta):
    """KL(p_s || p_t): ``d = log p_s - log p_t`` per element, ``kd = sum p_s d``; gradient
    ``p_s (d - dbar)``, ``dbar = kd / sum p_s``."""
    import torch

    ps = ls.exp()
    d = torch.where(ps > 0, ls - lt, 0.0)  # p_s = 0: no contribution (also where both are -inf)
    pd = ps * d
    kd = pd.sum(1)
    dbar = (kd / ps.sum(1))[:, None]
    return kd, pd.sub_(ps * dbar)


def _jsd_rows(ls, lt, beta):
    """``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` per element from ``d = log p_s - log p_t``:
    ``log p_s - log m = -log((1 - beta) + beta e^-d)``, ``log p_t - log m = -log(beta + (1 - beta) e^d)``;
    gradient ``(1 - beta) p_s (r - rbar)``, ``r = log p_s - log m``, ``rbar = <p_s, r> / sum p_s``."""
    import torch

    lb, l1b = math.log(beta), math.log1p(-beta)
    ps, pt = ls.exp(), lt.exp()
    d = torch.where((ps > 0) | (pt > 0), ls - lt, 0.0)  # +-inf where exactly one side is 0
    rs = -torch.logaddexp(torch.full_like(d, l1b), lb - d)  # log p_s - log m
    rt = -torch.logaddexp(torch.full_like(d, lb), l1b + d)  # log p_t - log m
    prs = torch.where(ps > 0, ps * rs, 0.0)
    kd = (beta * torch.where(pt > 0, pt * rt, 0.0) + (1 - beta) * prs).sum(1)
    rbar = (prs.sum(1) / ps.sum(1))[:, None]
    return kd, prs.sub_(ps * rbar).mul_(1 - beta)


@dataclass(frozen=True)
class Divergence:
    name: str
    code: int | None  # the row kernels' DIV code (None: torch rows only)
    formula: str  # for docs and error messages
    rows: Callable  # (log p_s [c, K], log p_t [c, K], beta) -> (kd [c], dD/du_s [c, K]) in fp32
    reference: Callable  # (log p_s, log p_t, beta) -> kd, float64, differentiable
    impls: dict  # teacher form ("dense" / "topk") -> row implementations that run it
    needs_teacher_support: bool = False  # infinite where p_t = 0 < p_s (a top-k teacher needs a tail)
    cpp: dict = field(default_factory=dict)  # teacher form -> the _C symbol of its C++ rows
    inplace_dense: bool = False  # the torch rows' fused in-place dense-teacher path (forward KL's)


REGISTRY: dict[str, Divergence] = {}
_NATIVE = {"dense": ("torch", "cpp", "triton"), "topk": ("torch", "cpp")}


def register(d: Divergence) -> Divergence:
    """Adds ``d`` to the registry (every consumer reads it from there); a name or code already
    taken, or a native implementation without its code or C++ symbol, is refused."""
    if d.name in REGISTRY:
        raise ValueError(f"divergence {d.name!r} is registered already")
    if d.code is not None and any(o.code == d.code for o in REGISTRY.values()):
        raise ValueError(f"divergence {d.name!r}: kernel code {d.code} is taken")
    for form, impls in d.impls.items():
        if form not in ("dense", "topk"):
            raise ValueError(f"divergence {d.name!r}: teacher form {form!r} is not dense or topk")
        if ("cpp" in impls or "triton" in impls) and d.code is None:
            raise ValueError(f"divergence {d.name!r} names native rows ({impls}) but has no kernel code")
        if "cpp" in impls and form not in d.cpp:
            raise ValueError(f"divergence {d.name!r}: no C++ symbol for its {form} rows")
    REGISTRY[d.name] = d
    return d


register(Divergence("forward_kl", 0, "KL(p_t || p_s)", _fkl_rows, _fkl_reference, _NATIVE,
                    cpp={"dense": "kd_forward_kl_rows", "topk": "kd_topk_rows"}, inplace_dense=True))
register(Divergence("reverse_kl", 1, "KL(p_s || p_t)", _rkl_rows, _rkl_reference, _NATIVE,
                    needs_teacher_support=True, cpp={"dense": "kd_div_rows", "topk": "kd_topk_rows"}))
register(Divergence("jsd", 2, "beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s",
                    _jsd_rows, _jsd_reference, _NATIVE, cpp={"dense": "kd_div_rows", "topk": "kd_topk_rows"}))
DIVERGENCES = tuple(REGISTRY)  # the built-in ones; names() includes any registered later


def names() -> tuple[str, ...]:
    """Every registered divergence, in registration order."""
    return tuple(REGISTRY)


def canonical(divergence: str, beta: float) -> str:
    """``jsd`` at ``beta = 0`` / ``1`` is ``forward_kl`` / ``reverse_kl`` (both limits of the
    formula vanish; special-cased, as Liger and TRL do)."""
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def for_beta(beta: float) -> str:
    """TRL's / GKD's ``beta`` alone as a divergence: the generalized JSD at ``beta``, 0 and 1
    being forward and reverse KL."""
    return canonical("jsd", float(beta))


def get(divergence: str) -> Divergence:
    try:
        return REGISTRY[divergence]
    except KeyError:
        from minitron_fast.errors import KDInputError

        raise KDInputError(f"divergence must be one of {names()}, got {divergence!r}") from None
