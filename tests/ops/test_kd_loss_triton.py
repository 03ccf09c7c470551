"""The Triton KD softmax kernel (kernels/kd_loss.py) under TRITON_INTERPRET=1 against the torch math
and the float64 reference. Tiny shapes: the interpreter's cost grows with programs x blocks."""
from __future__ import annotations

import math

import pytest
import torch

from minitron_fast.ops._dispatch import triton_available, triton_runnable
from minitron_fast.ops.kd_loss import REGISTRY, fused_linear_kd_loss, kd_loss_reference

pytestmark = [
    pytest.mark.skipif(not (triton_available() and triton_runnable(torch.empty(0))),
                       reason="needs triton (a GPU or TRITON_INTERPRET=1)"),
    # the interpreter evaluates both sides of tl.where: -inf - -inf on masked tail lanes warns (numpy)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)],
                         ids=["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 2.0], ids=["T0.5", "T2"])
def test_kernel_multi_block_matches_reference(divergence, beta, temperature):
    """V=300 in blocks of 64 (4 full + a ragged tail): the online log-sum-exp across blocks."""
    from minitron_fast.kernels.kd_loss import kd_softmax

    c, V = 5, 300
    zs = torch.randn(c, V, dtype=torch.float64) * 3
    zt = torch.randn(c, V, dtype=torch.float64) * 3
    zt[1, 250:] = -1e30  # clamped masked teacher entries
    a = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    S = (zs / temperature).float().contiguous()
    Tt = (zt / temperature).float().contiguous()
    kd_rows = torch.full((c,), float("nan"))
    kd_softmax(S, Tt, a.float(), kd_rows, div_code=REGISTRY[divergence].code, beta=beta, g_mult=1.0 / temperature,
               block_v=64, num_warps=4)
    z64 = zs.clone().requires_grad_()
    ref_rows = kd_loss_reference(z64, zt, divergence=divergence, beta=beta, temperature=temperature,
                                 reduction="none")
    (ref_g,) = torch.autograd.grad(ref_rows, z64, a)
    assert torch.allclose(kd_rows.double(), ref_rows.detach(), atol=5e-5, rtol=5e-4)
    assert torch.allclose(S.double(), ref_g, atol=5e-6, rtol=5e-4)
    assert bool((S[2] == 0).all())  # a zero row scale writes exact zeros


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_impl_triton_end_to_end(divergence):
    N, V, Hs, Ht = 19, 123, 16, 12
    h = torch.randn(N, Hs, requires_grad=True)
    W = (torch.randn(V, Hs) / 2).requires_grad_()
    th, tW = torch.randn(N, Ht), torch.randn(V, Ht) / 2
    labels = torch.randint(0, V, (N,))
    labels[:8] = -100  # the first chunk entirely ignored
    kw = dict(labels=labels, divergence=divergence, temperature=2.0, t2_scaling=True, hard_label_weight=0.5)
    loss = fused_linear_kd_loss(h, W, th, tW, impl="triton", chunk_size=8, **kw)
    gh, gW = torch.autograd.grad(loss, (h, W))
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = kd_loss_reference(h64 @ W64.T, th.double() @ tW.double().T, **kw)
    rh, rW = torch.autograd.grad(ref, (h64, W64))
    assert math.isclose(loss.item(), ref.item(), rel_tol=5e-4, abs_tol=1e-6)
    assert torch.allclose(gh.double(), rh, atol=1e-5, rtol=5e-4)
    assert torch.allclose(gW.double(), rW, atol=1e-5, rtol=5e-4)
