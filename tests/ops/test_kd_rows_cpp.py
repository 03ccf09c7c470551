"""The C++ KD row kernel (``csrc/kd_rows.cpp``, ``impl="cpp"``, the CPU default when ``_C`` is
built): the raw kernel against float64 softmax/KL on odd row lengths (around its 8-lane vectors
and 1024-entry blocks), masked and peaked logits; and the fused losses with ``impl="cpp"``
against the float64 reference and the torch path."""
from __future__ import annotations

import math

import pytest
import torch

from minitron_fast._ext import HAS_C, _C
from minitron_fast.ops._dispatch import resolve_impl
from minitron_fast.ops.kd_loss import fused_linear_kd_loss, kd_loss_from_logits, kd_loss_reference
from minitron_fast.ops.kd_loss.divergences import DIVERGENCES  # the registry's (built-in) divergences
from tests.ops.test_kd_loss import TOL, _close, _problem, _reference


def test_the_extension_has_the_kernel():
    assert HAS_C, "minitron_fast._C is not built (./run.sh builds it)"
    assert _C.kd_rows_isa() in ("avx2+fma", "baseline")
    h = torch.randn(3, 4)
    assert resolve_impl("auto", h, op="fused_linear_kd_loss", choices=("triton", "cpp", "torch")) == "cpp"


def _f64(s, t, a):
    ls, lt = s.double().log_softmax(1), t.double().log_softmax(1)
    pt = lt.exp()
    kd = torch.where(pt > 0, pt * (lt - ls), torch.zeros((), dtype=torch.float64)).sum(1)
    return kd, a.double()[:, None] * (ls.exp() - pt)


def _run(s, t, a, need_grad, threads=2):
    S, T, kd = s.clone(), t.clone(), torch.full((s.shape[0],), float("nan"))
    _C.kd_forward_kl_rows(S.data_ptr(), S.stride(0), T.data_ptr(), T.stride(0), a.data_ptr(), kd.data_ptr(),
                          s.shape[0], s.shape[1], need_grad, threads)
    return kd, S, T


@pytest.mark.parametrize("V", [1, 7, 8, 9, 1023, 1024, 1025, 2049, 49152])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_float64(V, threads):
    g = torch.Generator().manual_seed(V)
    rows = 5
    s = torch.randn(rows, V, generator=g) * 4
    t = torch.randn(rows, V, generator=g) * 4
    a = torch.rand(rows, generator=g) + 0.1
    kd, S, _ = _run(s, t, a, True, threads)
    rkd, rg = _f64(s, t, a)
    assert torch.allclose(kd.double(), rkd, rtol=2e-5, atol=1e-6), (kd, rkd)
    _close(S, rg, 2e-5, "grad")
    if V == 1:
        assert torch.all(kd.abs() < 1e-6) and torch.all(S.abs() < 1e-6)  # one class: no divergence


def test_kernel_masked_and_peaked_rows():
    g = torch.Generator().manual_seed(1)
    V = 3000
    s = torch.randn(4, V, generator=g) * 3
    t = torch.randn(4, V, generator=g) * 3
    t[0, : V // 2] = -1e30                      # masked teacher entries (the loss clamps -inf to -1e30)
    t[1] = -1e30
    t[1, 17] = 5.0                              # a one-hot teacher
    t[2] *= 40                                  # peaked teacher, loss ~ tens of nats
    s[3] *= 40                                  # peaked student
    a = torch.ones(4)
    kd, S, _ = _run(s, t, a, True)
    rkd, rg = _f64(s, t, a)
    assert torch.isfinite(kd).all() and torch.isfinite(S).all()
    assert torch.allclose(kd.double(), rkd, rtol=2e-6, atol=2e-5), (kd, rkd)
    _close(S, rg, 1e-5, "grad")
    assert torch.all(S[0, : V // 2] >= 0)       # where p_t = 0 the gradient is p_s alone


def test_kernel_without_grad_leaves_buffers_and_honours_strides():
    g = torch.Generator().manual_seed(2)
    base_s = torch.randn(6, 130, generator=g)
    base_t = torch.randn(6, 140, generator=g)
    s, t = base_s[:, :100], base_t[:, 5:105]  # row strides 130 and 140, unit column stride
    a = torch.rand(6, generator=g)
    before_s, before_t = base_s.clone(), base_t.clone()
    kd = torch.empty(6)
    _C.kd_forward_kl_rows(s.data_ptr(), s.stride(0), t.data_ptr(), t.stride(0), a.data_ptr(), kd.data_ptr(),
                          6, 100, False, 2)
    assert torch.equal(base_s, before_s) and torch.equal(base_t, before_t)
    assert torch.allclose(kd.double(), _f64(s, t, a)[0], rtol=2e-5, atol=1e-6)
    kd2 = torch.empty(6)
    _C.kd_forward_kl_rows(s.data_ptr(), s.stride(0), t.data_ptr(), t.stride(0), a.data_ptr(), kd2.data_ptr(),
                          6, 100, True, 2)
    assert torch.equal(kd, kd2)  # the same sums with and without the gradient pass
    assert torch.equal(base_s[:, 100:], before_s[:, 100:])  # nothing written past each row


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0], ids=["T0.5", "T1", "T2"])
@pytest.mark.parametrize("w", [0.0, 0.5], ids=["kd", "kd+ce"])
def test_fused_loss_cpp_matches_float64_and_torch(temperature, w):
    # N=63 tokens, V=1030 (past one 1024-entry block), chunks of 16, every 7th token ignored
    p = _problem(63, 1030, 24, 20, ignore_every=7)
    kw = dict(temperature=temperature, labels=p[-1], hard_label_weight=w, t2_scaling=True)
    h, W, b, th, tW, tb = p[:-1]
    loss = fused_linear_kd_loss(h, W, th, tW, student_bias=b, teacher_bias=tb, impl="cpp", chunk_size=16, **kw)
    grads = torch.autograd.grad(loss, [h, W, b])
    ref, rgrads = _reference(*p[:-1], **kw)
    _close(loss, ref, TOL[torch.float32], "loss")
    for gr, r, n in zip(grads, rgrads, "hWb"):
        _close(gr, r, TOL[torch.float32], f"grad {n}")
    loss_t = fused_linear_kd_loss(h, W, th, tW, student_bias=b, teacher_bias=tb, impl="torch", chunk_size=16, **kw)
    grads_t = torch.autograd.grad(loss_t, [h, W, b])
    _close(loss, loss_t, 1e-5, "cpp vs torch loss")
    for gr, r, n in zip(grads, grads_t, "hWb"):
        _close(gr, r, 1e-5, f"cpp vs torch grad {n}")


def test_logits_loss_cpp_masked_teacher_and_other_divergences():
    """-inf teacher logits (a masked vocabulary) through kd_loss_from_logits under impl="cpp":
    forward KL in kd_forward_kl_rows, reverse KL and JSD in kd_div_rows."""
    g = torch.Generator().manual_seed(3)
    zs = (torch.randn(20, 777, generator=g) * 3).requires_grad_()
    zt = torch.randn(20, 777, generator=g) * 3
    zt[:, 500:] = -math.inf
    for div in DIVERGENCES:
        if div == "reverse_kl":
            zt_ = torch.randn(20, 777, generator=g) * 3  # reverse KL is infinite where p_t = 0
        else:
            zt_ = zt
        loss = kd_loss_from_logits(zs, zt_, divergence=div, impl="cpp", chunk_size=8, reduction="sum")
        (gz,) = torch.autograd.grad(loss, zs)
        z64 = zs.detach().double().requires_grad_()
        ref = kd_loss_reference(z64, zt_.double(), divergence=div, reduction="sum")
        (rg,) = torch.autograd.grad(ref, z64)
        tol = 1e-5 if div == "forward_kl" else TOL[torch.float32]  # the others: the torch math's tolerance
        _close(loss, ref, tol, f"{div} loss")
        _close(gz, rg, tol, f"{div} grad")


def test_peaked_logits_precision_is_fp32_class():
    """At a peaked teacher (loss ~18 nats) the C++ rows are as close to float64 as materialized
    fp32 logits (the torch fused path was ~3x further off, docs/kd_loss.md)."""
    g = torch.Generator().manual_seed(4)
    N, V, H = 64, 49152, 96
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) / H ** 0.5 * 4
    th = torch.randn(N, H, generator=g)
    tW = torch.randn(V, H, generator=g) / H ** 0.5 * 12
    ref = kd_loss_reference(h.double() @ W.double().T, th.double() @ tW.double().T).item()
    ours = fused_linear_kd_loss(h, W, th, tW, impl="cpp").item()
    fp32 = kd_loss_reference(h @ W.T, th @ tW.T).item()
    assert ref > 5
    assert abs(ours - ref) / ref <= max(2 * abs(fp32 - ref) / ref, 2e-6)


@pytest.mark.parametrize("V", [1, 9, 1025, 49152])
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "own_buffer"])
def test_ce_kernel_matches_float64(V, in_place):
    g = torch.Generator().manual_seed(V + 7)
    rows = 6
    z = torch.randn(rows, V, generator=g) * 5
    label = torch.randint(0, V, (rows,), generator=g)
    a = torch.rand(rows, generator=g)
    a[2] = 0.0  # an ignored row: zero gradient, a finite loss the caller drops
    Z = z.clone()
    G = Z if in_place else torch.full_like(z, float("nan"))
    ce = torch.empty(rows)
    _C.ce_rows(Z.data_ptr(), V, G.data_ptr(), V, label.data_ptr(), a.data_ptr(), ce.data_ptr(), rows, V, True, 2)
    ls = z.double().log_softmax(1)
    ref = -ls.gather(1, label[:, None]).view(-1)
    rg = a.double()[:, None] * (ls.exp() - torch.nn.functional.one_hot(label, V).double())
    assert torch.allclose(ce.double(), ref, rtol=2e-6, atol=1e-6), (ce, ref)
    _close(G, rg, 2e-6, "ce grad")
    if not in_place:
        assert torch.equal(Z, z)  # the logits were only read
    Z2, ce2 = z.clone(), torch.empty(rows)
    _C.ce_rows(Z2.data_ptr(), V, Z2.data_ptr(), V, label.data_ptr(), a.data_ptr(), ce2.data_ptr(), rows, V, False, 2)
    assert torch.equal(Z2, z) and torch.equal(ce2, ce)


def test_fused_cross_entropy_cpp_matches_float64_and_torch():
    from minitron_fast.ops.kd_loss import fused_linear_cross_entropy

    p = _problem(50, 1100, 32, 32, ignore_every=5)
    h, W, b, labels = p[0], p[1], p[2], p[-1]
    loss = fused_linear_cross_entropy(h, W, labels, bias=b, chunk_size=16, impl="cpp")
    grads = torch.autograd.grad(loss, [h, W, b])
    params = [x.detach().double().requires_grad_() for x in (h, W, b)]
    ref = torch.nn.functional.cross_entropy(params[0] @ params[1].T + params[2], labels, ignore_index=-100)
    rgrads = torch.autograd.grad(ref, params)
    _close(loss, ref, 1e-6, "ce loss")
    for gr, r, n in zip(grads, rgrads, "hWb"):
        _close(gr, r, 1e-5, f"ce grad {n}")
    loss_t = fused_linear_cross_entropy(h, W, labels, bias=b, chunk_size=16, impl="torch")
    _close(loss, loss_t, 1e-6, "cpp vs torch ce")
