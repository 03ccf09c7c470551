"""``return_parts`` (KD and CE terms and the token count from one pass) and top-k teachers with a
tail bucket (``teacher_topk_tail_lse``), against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from minitron_fast.ops.kd_loss import (
    REGISTRY,
    KDLossParts,
    fused_linear_kd_loss,
    kd_loss_from_logits,
    kd_loss_reference,
)
from minitron_fast.ops.kd_loss.divergences import DIVERGENCES, canonical
from tests.numerics import close

pytestmark = pytest.mark.usefixtures("one_thread")


_close = close


def _topk_problem(N=41, V=97, H=16, k=9):
    h = torch.randn(N, H, requires_grad=True)
    W = (torch.randn(V, H) / H ** 0.5 * 2).requires_grad_()
    zt = torch.randn(N, V) * 3
    vals, idx = zt.topk(k, dim=1)
    out = torch.ones_like(zt, dtype=torch.bool).scatter(1, idx, False)
    tail = torch.logsumexp(torch.where(out, zt, -math.inf), 1)  # raw logits: no temperature
    labels = torch.randint(0, V, (N,))
    labels[5:12] = -100
    return h, W, zt, vals, idx, tail, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_parts_are_the_terms_of_the_one_pass(reduction, impl):
    h, W, zt, vals, idx, tail, labels = _topk_problem()
    th, tW = torch.randn(41, 12), torch.randn(97, 12)
    kw = dict(labels=labels, temperature=2.0, t2_scaling=True, hard_label_weight=0.3, reduction=reduction,
              chunk_size=16, impl=impl)
    parts = fused_linear_kd_loss(h, W, th, tW, return_parts=True, **kw)
    assert isinstance(parts, KDLossParts)
    plain = fused_linear_kd_loss(h, W, th, tW, **kw)
    torch.testing.assert_close(parts.loss, plain, rtol=0, atol=0)
    torch.testing.assert_close(parts.loss.detach(), parts.kd + 0.3 * parts.ce, rtol=1e-6, atol=1e-6)
    assert int(parts.num_tokens) == int((labels != -100).sum())
    assert not parts.kd.requires_grad and not parts.ce.requires_grad and parts.loss.requires_grad
    zs = (h.detach().double() @ W.detach().double().T)
    zt64 = th.double() @ tW.double().T
    ref_kd = kd_loss_reference(zs, zt64, labels=labels, temperature=2.0, t2_scaling=True, reduction=reduction)
    ref_ce = kd_loss_reference(zs, zt64, labels=labels, temperature=2.0, kd_weight=0.0, hard_label_weight=1.0,
                               reduction=reduction)
    _close(parts.kd, ref_kd, 5e-5, "kd part")
    _close(parts.ce, ref_ce, 5e-5, "ce part")
    # the gradient is that of the loss alone
    g_parts = torch.autograd.grad(parts.loss.sum(), (h, W))
    g_plain = torch.autograd.grad(plain.sum(), (h, W))
    for a, b in zip(g_parts, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parts_ce_with_zero_weight_and_without_labels():
    N, V, H = 20, 31, 8
    zs = torch.randn(N, V, requires_grad=True)
    zt = torch.randn(N, V)
    labels = torch.randint(0, V, (N,))
    p = kd_loss_from_logits(zs, zt, labels=labels, return_parts=True)  # weight 0: CE still reported
    ref_ce = torch.nn.functional.cross_entropy(zs.detach().double(), labels)
    _close(p.ce, ref_ce, 1e-6, "ce with weight 0")
    torch.testing.assert_close(p.loss.detach(), p.kd)
    q = kd_loss_from_logits(zs, zt, return_parts=True)
    assert math.isnan(float(q.ce)) and int(q.num_tokens) == N


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.3), ("reverse_kl", 0.5), ("jsd", 1.0)],
                         ids=["fkl", "jsd0.3", "rkl", "jsd1=rkl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=["T1", "T2"])
def test_topk_tail_bucket_matches_float64(divergence, beta, temperature):
    h, W, zt, vals, idx, tail, labels = _topk_problem()
    kw = dict(labels=labels, divergence=divergence, beta=beta, temperature=temperature, hard_label_weight=0.2)
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = kd_loss_reference(h64 @ W64.T, teacher_topk=(vals, idx), teacher_topk_tail_lse=tail, **kw)
    rh, rW = torch.autograd.grad(ref, (h64, W64))
    for impl in REGISTRY[canonical(divergence, beta)].impls["topk"]:
        loss = fused_linear_kd_loss(h, W, teacher_topk=(vals, idx), teacher_topk_tail_lse=tail, chunk_size=16,
                                    impl=impl, **kw)
        gh, gW = torch.autograd.grad(loss, (h, W))
        _close(loss, ref, 2e-5, f"{impl} loss")
        _close(gh, rh, 2e-5, f"{impl} grad h")
        _close(gW, rW, 2e-5, f"{impl} grad W")


def test_topk_tail_bucket_is_the_coarse_grained_teacher_at_T1():
    """At T = 1 the bucketed teacher is exactly the dense teacher's distribution coarse-grained onto
    {top-k entries, the rest}; so for a student whose logits outside the top-k are all equal to
    the teacher's up to one constant, the bucketed forward KL equals the dense one."""
    N, V, k = 13, 50, 6
    zt = torch.randn(N, V, dtype=torch.float64) * 2
    vals, idx = zt.topk(k, dim=1)
    out = torch.ones_like(zt, dtype=torch.bool).scatter(1, idx, False)
    tail = torch.logsumexp(torch.where(out, zt, -math.inf), 1)
    zs = zt + torch.where(out, 0.7, 0.0)  # the tail shifted by one constant
    zs = zs.scatter(1, idx, torch.randn(N, k, dtype=torch.float64))  # and change the top-k entries
    dense = kd_loss_reference(zs, zt, reduction="none")
    bucket = kd_loss_reference(zs, teacher_topk=(vals, idx), teacher_topk_tail_lse=tail, reduction="none")
    torch.testing.assert_close(bucket, dense, rtol=1e-10, atol=1e-12)
    ours = kd_loss_from_logits(zs.float(), teacher_topk=(vals.float(), idx), teacher_topk_tail_lse=tail.float(),
                               reduction="none", impl="torch")
    _close(ours, dense, 2e-5, "fused bucketed forward KL")


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_topk_without_tail_is_the_renormalized_topk(divergence, impl):
    h, W, zt, vals, idx, tail, labels = _topk_problem()
    no_tail = fused_linear_kd_loss(h, W, teacher_topk=(vals, idx), divergence=divergence, temperature=1.5,
                                   labels=labels, impl=impl)
    minus_inf = fused_linear_kd_loss(h, W, teacher_topk=(vals, idx), divergence=divergence, temperature=1.5,
                                     teacher_topk_tail_lse=torch.full((41,), -math.inf), labels=labels, impl="torch")
    torch.testing.assert_close(no_tail, minus_inf, rtol=1e-6, atol=1e-7)
    h64 = h.detach().double()
    ref = kd_loss_reference(h64 @ W.detach().double().T, teacher_topk=(vals, idx), divergence=divergence,
                            temperature=1.5, labels=labels)
    _close(no_tail, ref, 2e-5, "renormalized top-k")


def test_topk_gradient_rows_sum_to_zero():
    N, V, k = 24, 300, 16
    zs = (torch.randn(N, V) * 4).requires_grad_()
    zt = torch.randn(N, V) * 4
    vals, idx = zt.topk(k, 1)
    tail = torch.logsumexp(zt.scatter(1, idx, -math.inf), 1)
    for div in DIVERGENCES:
        for impl in ("torch", "cpp"):
            loss = kd_loss_from_logits(zs, teacher_topk=(vals, idx), teacher_topk_tail_lse=tail, divergence=div,
                                       reduction="sum", impl=impl)
            (g,) = torch.autograd.grad(loss, zs)
            assert g.sum(1).abs().max().item() <= 1e-6 * g.abs().sum(1).max().item() + 1e-9, (div, impl)


def test_topk_tail_bad_input():
    h, W, zt, vals, idx, tail, labels = _topk_problem()
    with pytest.raises(ValueError, match="teacher_topk_tail_lse"):
        fused_linear_kd_loss(h, W, teacher_topk=(vals, idx), teacher_topk_tail_lse=tail[:5])
    with pytest.raises(ValueError, match="only used with teacher_topk"):
        kd_loss_from_logits(torch.randn(41, 97), torch.randn(41, 97), teacher_topk_tail_lse=tail)
    with pytest.raises(ValueError, match="teacher_topk_tail_lse"):  # reverse KL without a tail is infinite
        fused_linear_kd_loss(h, W, teacher_topk=(vals, idx), divergence="reverse_kl")
