"""Fused linear KD loss, linear CE and kd_loss_from_logits (torch path) against a float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from minitron_fast.ops.kd_loss import (
    fused_linear_cross_entropy,
    fused_linear_kd_loss,
    kd_loss_from_logits,
    kd_loss_reference,
)
from minitron_fast.ops.kd_loss.divergences import DIVERGENCES  # the registry's (built-in) divergences
from tests.numerics import close

TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


_close = close


def _problem(N, V, Hs, Ht, dtype=torch.float32, bias=True, ignore_every=0):
    h = (torch.randn(N, Hs) * 1.5).to(dtype).requires_grad_()
    W = (torch.randn(V, Hs) / Hs ** 0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(V) * 0.3).to(dtype).requires_grad_() if bias else None
    th = torch.randn(N, Ht).to(dtype)
    tW = (torch.randn(V, Ht) / Ht ** 0.5 * 2).to(dtype)
    tb = (torch.randn(V) * 0.3).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,))
    if ignore_every:
        labels[::ignore_every] = -100
    return h, W, b, th, tW, tb, labels


def _reference(h, W, b, th, tW, tb, grad_out=None, **kw):
    params = [x.detach().double().requires_grad_() for x in (h, W) + ((b,) if b is not None else ())]
    zs = params[0] @ params[1].T + (params[2] if b is not None else 0)
    zt = th.double() @ tW.double().T + (tb.double() if tb is not None else 0)
    loss = kd_loss_reference(zs, zt, **kw)
    grads = torch.autograd.grad(loss, params, grad_out)
    return loss.detach(), grads


def _ours(h, W, b, th, tW, tb, grad_out=None, **kw):
    loss = fused_linear_kd_loss(h, W, th, tW, student_bias=b, teacher_bias=tb, impl="torch", **kw)
    inputs = [h, W] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, inputs, grad_out)
    return loss.detach(), grads


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2),
                                             ("jsd", 0.0), ("jsd", 1.0)],
                         ids=["fkl", "rkl", "jsd0.5", "jsd0.2", "jsd0=fkl", "jsd1=rkl"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0], ids=["T0.5", "T1", "T2"])
def test_divergences_temperatures_odd_shapes(divergence, beta, temperature):
    # N=63 tokens, V=123, chunks of 16 (the last one short), every 7th token ignored
    p = _problem(63, 123, 24, 20, ignore_every=7)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, labels=p[-1])
    loss, grads = _ours(*p[:-1], chunk_size=16, **kw)
    ref, rgrads = _reference(*p[:-1], **kw)
    _close(loss, ref, TOL[torch.float32], "loss")
    for g, r, n in zip(grads, rgrads, "hWb"):
        _close(g, r, TOL[torch.float32], f"grad {n}")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_hard_labels_t2_reductions(divergence, reduction):
    p = _problem(50, 77, 16, 12, ignore_every=5)
    grad_out = torch.randn(50).double() if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    kw = dict(divergence=divergence, beta=0.3, temperature=2.0, t2_scaling=True, hard_label_weight=0.6,
              labels=p[-1], reduction=reduction)
    loss, grads = _ours(*p[:-1], grad_out=grad_out.float(), chunk_size=8, **kw)
    ref, rgrads = _reference(*p[:-1], grad_out=grad_out, **kw)
    _close(loss, ref, TOL[torch.float32], "loss")
    for g, r, n in zip(grads, rgrads, "hWb"):
        _close(g, r, TOL[torch.float32], f"grad {n}")


def test_num_items_and_3d_inputs():
    B, T, Hs, Ht, V = 3, 11, 16, 8, 41
    h = torch.randn(B, T, Hs, requires_grad=True)
    W = torch.randn(V, Hs, requires_grad=True)
    th, tW = torch.randn(B, T, Ht), torch.randn(V, Ht)
    labels = torch.randint(0, V, (B, T))
    labels[:, :3] = -100
    loss = fused_linear_kd_loss(h, W, th, tW, labels=labels, num_items=100, hard_label_weight=1.0)
    loss.backward()
    ref, (gh, gW) = _reference(h.reshape(-1, Hs), W, None, th.reshape(-1, Ht), tW, None,
                               labels=labels.reshape(-1), num_items=100, hard_label_weight=1.0)
    _close(loss, ref, 5e-4, "loss")
    assert h.grad.shape == h.shape
    _close(h.grad.reshape(-1, Hs), gh, 5e-4, "grad h")
    _close(W.grad, gW, 5e-4, "grad W")
    per_token = fused_linear_kd_loss(h, W, th, tW, labels=labels, reduction="none")
    assert per_token.shape == (B, T) and bool((per_token[:, :3] == 0).all())


def test_ignored_chunk_and_ignored_batch_give_zero_without_nan(poison_empty):
    h, W, b, th, tW, tb, labels = _problem(40, 33, 8, 8)
    labels[:16] = -100  # the first two chunks of 8 entirely ignored
    loss, grads = _ours(h, W, b, th, tW, tb, labels=labels, chunk_size=8, hard_label_weight=0.5)
    ref, rgrads = _reference(h, W, b, th, tW, tb, labels=labels, hard_label_weight=0.5)
    _close(loss, ref, 5e-4, "loss")
    for g, r in zip(grads, rgrads):
        _close(g, r, 5e-4, "grad")
    assert bool((grads[0][:16] == 0).all())
    labels[:] = -100
    for reduction in ("mean", "sum"):
        loss, grads = _ours(h, W, b, th, tW, tb, labels=labels, chunk_size=8, hard_label_weight=0.5,
                            reduction=reduction)
        assert loss.item() == 0.0
        assert all(bool((g == 0).all()) for g in grads)


def test_teacher_logits_and_no_teacher_grad():
    h, W, b, th, tW, tb, labels = _problem(29, 57, 12, 10)
    th.requires_grad_()
    zt = th @ tW.T + tb
    loss = fused_linear_kd_loss(h, W, teacher_logits=zt, student_bias=b, labels=labels, divergence="jsd",
                                temperature=0.5, chunk_size=7)
    gh, gW, gb = torch.autograd.grad(loss, (h, W, b))
    ref, rgrads = _reference(h, W, b, th.detach(), tW, tb, labels=labels, divergence="jsd", temperature=0.5)
    _close(loss, ref, 5e-4, "loss")
    for g, r in zip((gh, gW, gb), rgrads):
        _close(g, r, 5e-4, "grad")
    loss2 = fused_linear_kd_loss(h, W, th, tW, teacher_bias=tb)
    assert not loss2.grad_fn.next_functions or th.grad is None
    loss2.backward()
    assert th.grad is None


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_topk_teacher(divergence):
    N, V, H, k = 45, 91, 16, 7
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    vals, idx = (torch.randn(N, V) * 3).topk(k, dim=1)
    labels = torch.randint(0, V, (N,))
    labels[3:20] = -100
    loss = fused_linear_kd_loss(h, W, teacher_topk=(vals, idx), labels=labels, divergence=divergence,
                                temperature=2.0, chunk_size=16, hard_label_weight=0.25)
    gh, gW = torch.autograd.grad(loss, (h, W))
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = kd_loss_reference(h64 @ W64.T, teacher_topk=(vals, idx), labels=labels, divergence=divergence,
                            temperature=2.0, hard_label_weight=0.25)
    rh, rW = torch.autograd.grad(ref, (h64, W64))
    _close(loss, ref, 5e-4, "loss")
    _close(gh, rh, 5e-4, "grad h")
    _close(gW, rW, 5e-4, "grad W")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs(dtype):
    p = _problem(37, 101, 32, 24, dtype=dtype, ignore_every=6)
    kw = dict(labels=p[-1], temperature=1.0, hard_label_weight=0.3)
    loss, grads = _ours(*p[:-1], chunk_size=16, **kw)
    ref, rgrads = _reference(*p[:-1], **kw)  # float64 math on the same half-precision values
    assert loss.dtype == torch.float32
    _close(loss, ref, 5e-4, "loss")  # fp32 math inside: only the output rounding differs
    for g, r, x, n in zip(grads, rgrads, p, "hWb"):
        assert g.dtype == dtype
        _close(g, r, TOL[dtype], f"grad {n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_heads_upcast_block_by_block_on_the_cpu(dtype, monkeypatch):
    """On the CPU a half head is upcast a block of vocabulary rows at a time (odd blocks here: 3
    rows of the 24-wide teacher head, 2 of the 32-wide student head), never whole: no fp32 tensor
    of the teacher head's V x Ht elements is ever made, and the result matches float64 as the
    whole-head path does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from minitron_fast.ops.kd_loss.sources import LinearSource

    class Fp32Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.numels.add(t.numel())
            return out

    N, V, Hs, Ht = 37, 101, 32, 24
    p = _problem(N, V, Hs, Ht, dtype=dtype, ignore_every=6)
    kw = dict(labels=p[-1], temperature=2.0, hard_label_weight=0.3, divergence="jsd", beta=0.3)
    monkeypatch.setattr(LinearSource, "BLOCK_ELEMS", 3 * Ht + 1)
    with Fp32Sizes() as seen:
        loss, grads = _ours(*p[:-1], chunk_size=16, **kw)
    assert V * Ht not in seen.numels, sorted(seen.numels)
    assert {3 * Ht, 2 * Ht, 2 * Hs, 1 * Hs} <= seen.numels  # 101 rows = 33 x 3 + 2 = 50 x 2 + 1
    ref, rgrads = _reference(*p[:-1], **kw)
    _close(loss, ref, 5e-4, "loss")
    for g, r, n in zip(grads, rgrads, "hWb"):
        _close(g, r, TOL[dtype], f"grad {n}")


def test_vocab_128256_cheap():
    N, V, Hs, Ht = 9, 128_256, 8, 6
    p = _problem(N, V, Hs, Ht, bias=False, ignore_every=4)
    kw = dict(labels=p[-1], hard_label_weight=0.5)
    loss, grads = _ours(*p[:-1], chunk_size=4, **kw)
    ref, rgrads = _reference(*p[:-1], **kw)
    _close(loss, ref, 5e-4, "loss")
    for g, r in zip(grads, rgrads):
        _close(g, r, 5e-4, "grad")


def test_kd_loss_from_logits():
    N, V = 33, 70
    zs = (torch.randn(N, V) * 3).requires_grad_()
    zt = torch.randn(N, V) * 3
    labels = torch.randint(0, V, (N,))
    labels[-9:] = -100
    for div in DIVERGENCES:
        loss = kd_loss_from_logits(zs, zt, labels=labels, divergence=div, temperature=2.0, chunk_size=8,
                                   hard_label_weight=0.4)
        (g,) = torch.autograd.grad(loss, zs)
        z64 = zs.detach().double().requires_grad_()
        ref = kd_loss_reference(z64, zt, labels=labels, divergence=div, temperature=2.0, hard_label_weight=0.4)
        (rg,) = torch.autograd.grad(ref, z64)
        _close(loss, ref, 5e-4, f"{div} loss")
        _close(g, rg, 5e-4, f"{div} grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_cross_entropy(reduction):
    N, V, H = 57, 123, 20
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    labels[::4] = -100
    loss = fused_linear_cross_entropy(h, W, labels, bias=b, reduction=reduction, chunk_size=16)
    go = torch.randn(N) if reduction == "none" else None
    grads = torch.autograd.grad(loss, (h, W, b), go)
    p64 = [x.detach().double().requires_grad_() for x in (h, W, b)]
    ref = torch.nn.functional.cross_entropy(p64[0] @ p64[1].T + p64[2], labels, reduction=reduction)
    rgrads = torch.autograd.grad(ref, p64, None if go is None else go.double())
    _close(loss, ref, 5e-4, "loss")
    for g, r in zip(grads, rgrads):
        _close(g, r, 5e-4, "grad")


def test_module_matches_function():
    from minitron_fast import FusedLinearKDLoss

    p = _problem(20, 30, 8, 8)
    m = FusedLinearKDLoss(divergence="jsd", beta=0.4, temperature=1.5, hard_label_weight=0.2)
    a = m(p[0], p[1], p[3], p[4], student_bias=p[2], teacher_bias=p[5], labels=p[6])
    b = fused_linear_kd_loss(p[0], p[1], p[3], p[4], student_bias=p[2], teacher_bias=p[5], labels=p[6],
                             divergence="jsd", beta=0.4, temperature=1.5, hard_label_weight=0.2)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearKDLoss(temperature=0)


def _bad(**over):
    h, W, th, tW = torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 6), torch.randn(10, 6)
    kw = dict(student_hidden=h, student_weight=W, teacher_hidden=th, teacher_weight=tW)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,match", [
    (dict(student_hidden=torch.randn(4, 7)), "student_hidden has hidden size 7"),
    (dict(student_hidden=torch.randn(4, 8, dtype=torch.float64)), "student_hidden must be float32"),
    (dict(student_hidden=torch.randn(4, 8).half(), student_weight=torch.randn(10, 8).bfloat16()),
     "student_hidden is torch.float16 but student_weight is torch.bfloat16: cast one"),
    (dict(vocab_size=11), "vocab_size must be an int in \\[1, 10\\]"),
    (dict(softcap=0.0), "softcap must be a positive number"),
    (dict(softcap=-3.0), "softcap must be a positive number"),
    (dict(teacher_hidden=torch.randn(5, 6)), "teacher_hidden has 5 tokens"),
    (dict(teacher_hidden=torch.randn(4, 5)), "teacher_hidden has hidden size 5"),
    (dict(labels=torch.tensor([0, 1, 10, -100])), "labels must lie in"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels has 3 entries"),
    (dict(temperature=0.0), "temperature must be a positive"),
    (dict(temperature=-1.0), "temperature must be a positive"),
    (dict(beta=1.5), "beta must lie in"),
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(num_items=0), "num_items must be positive"),
    (dict(hard_label_weight=0.5), "needs labels"),
    (dict(teacher_hidden=None, teacher_weight=None), "exactly one teacher"),
    (dict(teacher_logits=torch.randn(4, 10)), "exactly one teacher"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(4, 9),
          labels=torch.tensor([0, 1, 9, 2])),
     "labels must lie in \\[0, 9\\)"),
    (dict(teacher_hidden=None, teacher_weight=None, divergence="reverse_kl",
          teacher_topk=(torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.long))), "reverse_kl"),
    (dict(teacher_hidden=None, teacher_weight=None,
          teacher_topk=(torch.randn(4, 3), torch.full((4, 3), 10))), "index 10 lies outside the shared vocab"),
    (dict(student_bias=torch.randn(9)), "student_bias must be"),
    (dict(impl="cuda"), "impl="),
])
def test_bad_input_names_the_argument(over, match):
    kw = _bad(**over)
    h, W = kw.pop("student_hidden"), kw.pop("student_weight")
    th, tW = kw.pop("teacher_hidden"), kw.pop("teacher_weight")
    with pytest.raises(ValueError, match=match):
        fused_linear_kd_loss(h, W, th, tW, **kw)


def test_masked_teacher_logits():
    """-inf teacher logits (a masked vocabulary slot) mean p_t = 0 there: finite loss and grads."""
    N, V = 12, 40
    zs = torch.randn(N, V, requires_grad=True)
    zt = torch.randn(N, V)
    zt[:, 30:] = -math.inf
    for div in ("forward_kl", "jsd"):
        loss = kd_loss_from_logits(zs, zt, divergence=div, chunk_size=5)
        (g,) = torch.autograd.grad(loss, zs)
        z64 = zs.detach().double().requires_grad_()
        ref = kd_loss_reference(z64, zt, divergence=div)
        (rg,) = torch.autograd.grad(ref, z64)
        _close(loss, ref, 5e-4, f"{div} loss")
        _close(g, rg, 5e-4, f"{div} grad")
