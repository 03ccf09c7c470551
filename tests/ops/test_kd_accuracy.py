"""fp32 accuracy of every divergence on every row implementation, against float64, held to the
error of a plain fp32 autograd of the same formula plus 1e-5 relative.

The cases are those of Liger-Kernel's distillation suites (test/chunked_loss/test_jsd_loss.py,
test/transformers/test_fused_linear_jsd.py), scaled to CPU sizes: their shapes (B, T, H, V), their
temperatures and betas, ``ignore_index`` 42, biases, hard-label weights, a ``grad_output != 1``,
and their inputs: ``torch.rand`` hidden states and weights (all positive, so the lm_head rows share
a mean and ``dX = G @ W`` amplifies any gradient row that does not sum to zero)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minitron_fast.ops.kd_loss import REGISTRY, fused_linear_kd_loss, kd_loss_from_logits, kd_loss_reference
from minitron_fast.ops.kd_loss.divergences import canonical

pytestmark = pytest.mark.usefixtures("one_thread")

SLACK = 1e-5  # relative, per the issue
SHAPES = [pytest.param(3, 47, 31, 123, id="B3T47H31V123"), pytest.param(9, 7, 41, 41, id="B9T7H41V41"),
          pytest.param(2, 2, 8, 8, id="B2T2H8V8"), pytest.param(2, 16, 64, 512, id="B2T16H64V512")]
DIVS = [pytest.param("forward_kl", 0.5, id="fkl"), pytest.param("reverse_kl", 0.5, id="rkl"),
        pytest.param("jsd", 0.2, id="jsd0.2"), pytest.param("jsd", 0.5, id="jsd0.5"),
        pytest.param("jsd", 0.8, id="jsd0.8")]
# Liger's (temperature, weight_hard_loss, ignore_index) combinations
SETTINGS = [(1.0, 0.5, -100), (2.0, 0.0, -100), (0.5, 1.0, 42), (2.0, 0.1, 42)]


def _impls(div, beta):
    return REGISTRY[canonical(div, beta)].impls["dense"]


def _case(B, T, H, V, bias, seed):
    g = torch.Generator().manual_seed(seed)
    N = B * T
    h, W = torch.rand(N, H // 2, generator=g), torch.rand(V, H // 2, generator=g)
    th, tW = torch.rand(N, H, generator=g), torch.rand(V, H, generator=g)
    b, tb = (torch.rand(V, generator=g), torch.rand(V, generator=g)) if bias else (None, None)
    labels = torch.randint(0, V, (N,), generator=g)
    return h, W, b, th, tW, tb, labels


def _materialized(dtype, h, W, b, th, tW, tb, labels, go, *, divergence, beta, temperature, w, ignore_index):
    """Plain autograd of the same formula in ``dtype`` (float64: the reference)."""
    params = [x.to(dtype).requires_grad_() for x in (h, W) + ((b,) if b is not None else ())]
    zs = F.linear(params[0], params[1], params[2] if b is not None else None)
    zt = F.linear(th.to(dtype), tW.to(dtype), None if tb is None else tb.to(dtype))
    kw = dict(labels=labels, divergence=divergence, beta=beta, temperature=temperature, hard_label_weight=w,
              ignore_index=ignore_index)
    loss = kd_loss_reference(zs, zt, **kw) if dtype == torch.float64 else _fp32_formula(zs, zt, **kw)
    return loss.detach(), torch.autograd.grad(loss, params, go.to(dtype))


def _fp32_formula(zs, zt, *, labels, divergence, beta, temperature, hard_label_weight, ignore_index):
    ls, lt = torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1)
    kd = REGISTRY[canonical(divergence, beta)].reference(ls, lt, beta)
    valid = labels != ignore_index
    ce = F.cross_entropy(zs, torch.where(valid, labels, 0), reduction="none")
    return torch.where(valid, kd + hard_label_weight * ce, 0.0).sum() / valid.sum().clamp(min=1)


@pytest.mark.parametrize("divergence,beta", DIVS)
@pytest.mark.parametrize("B,T,H,V", SHAPES)
def test_fp32_error_at_most_autograd_plus_slack(B, T, H, V, divergence, beta):
    go = torch.tensor(1.7)
    for i, (temperature, w, ignore_index) in enumerate(SETTINGS):
        bias = i % 2 == 0
        h, W, b, th, tW, tb, labels = _case(B, T, H, V, bias, seed=i)
        if ignore_index != -100:
            labels[::3] = ignore_index if ignore_index < V else labels[::3]
        kw = dict(divergence=divergence, beta=beta, temperature=temperature, w=w, ignore_index=ignore_index)
        ref, rgrads = _materialized(torch.float64, h, W, b, th, tW, tb, labels, go, **kw)
        auto, agrads = _materialized(torch.float32, h, W, b, th, tW, tb, labels, go, **kw)
        for impl in _impls(divergence, beta):
            params = [x.clone().requires_grad_() for x in (h, W) + ((b,) if bias else ())]
            loss = fused_linear_kd_loss(params[0], params[1], th, tW, student_bias=params[2] if bias else None,
                                        teacher_bias=tb, labels=labels, divergence=divergence, beta=beta,
                                        temperature=temperature, hard_label_weight=w, ignore_index=ignore_index,
                                        impl=impl, chunk_size=32)
            grads = torch.autograd.grad(loss, params, go)
            for name, ours, a, r in zip(("loss", "dX", "dW", "db"), (loss,) + grads, (auto,) + agrads,
                                        (ref,) + rgrads):
                scale = r.abs().max().item()
                e_ours = (ours.double() - r).abs().max().item()
                e_auto = (a.double() - r).abs().max().item()
                assert e_ours <= e_auto + SLACK * scale, (
                    f"{impl} T={temperature} {name}: error {e_ours:.3g} > autograd {e_auto:.3g} "
                    f"+ {SLACK} x {scale:.3g}")


@pytest.mark.parametrize("divergence,beta", DIVS)
def test_gradient_rows_sum_to_zero(divergence, beta):
    """Peaked, disagreeing rows at V = 4096: each row of dL/dz sums to 0 up to rounding, i.e. no
    further from 0 than the rows of a plain fp32 autograd of the formula (before the fix, reverse
    KL and JSD rows carried the rounding of two ~log V row sums)."""
    g = torch.Generator().manual_seed(5)
    zs = (torch.randn(16, 4096, generator=g) * 6).requires_grad_()
    zt = torch.randn(16, 4096, generator=g) * 6
    z = zs.detach().clone().requires_grad_()
    ls, lt = torch.log_softmax(z / 0.7, -1), torch.log_softmax(zt / 0.7, -1)
    (da,) = torch.autograd.grad(REGISTRY[canonical(divergence, beta)].reference(ls, lt, beta).sum(), z)
    auto = da.double().sum(1).abs().max().item()
    for impl in _impls(divergence, beta):
        loss = kd_loss_from_logits(zs, zt, divergence=divergence, beta=beta, reduction="sum", impl=impl,
                                   temperature=0.7)
        (dz,) = torch.autograd.grad(loss, zs)
        ours = dz.double().sum(1).abs().max().item()
        assert ours <= 1.5 * auto + 1e-7, (impl, ours, auto)


# --- The loss against float64 on Liger's cases: every CPU row implementation, every divergence --------
# issue 25, item 4: the C++ JSD row's faster log (one log_pos of m per element) left a loss error of
# 2.7e-5 (4.9e-5 measured in the issue) on Liger's functional case, 5x the torch rows'; each row
# implementation the op runs on the CPU now stays within LOSS_BOUND of float64 on every case.

LOSS_BOUND = 1e-5  # relative error of the loss, per the issue
# the row implementations fused_linear_kd_loss dispatches to on the CPU (triton runs there only in
# its interpreter, a test vehicle for the CUDA kernel)
CPU_IMPLS = tuple(i for i in REGISTRY["forward_kl"].impls["dense"] if i != "triton")
# jsd at Liger's betas and at both ends (beta = 0.1 is the case); the KLs take no beta
DIV_BETAS = [pytest.param(d, b, id=f"{d}{b}" if d == "jsd" else d) for d in REGISTRY
             for b in ((0.1, 0.2, 0.5, 0.8, 0.9) if d == "jsd" else (0.5,))]


def _liger_functional(bias):
    """Liger's test_correctness_functional inputs (test/chunked_loss/test_jsd_loss.py), in its draw
    order from seed 42: B2 T2 H8 V8, ``torch.rand`` everywhere."""
    g = torch.Generator().manual_seed(42)
    B, T, H, V = 2, 2, 8, 8
    W, tW = torch.rand(V, H // 2, generator=g), torch.rand(V, H, generator=g)
    b, tb = (torch.rand(V, generator=g), torch.rand(V, generator=g)) if bias else (None, None)
    h, th = torch.rand(B * T, H // 2, generator=g), torch.rand(B * T, H, generator=g)
    return h, W, b, th, tW, tb, torch.randint(0, V, (B * T,), generator=g)


def _accuracy_cases():
    """(id, inputs, temperature, hard_label_weight, ignore_index): Liger's functional case (T=2,
    ignore_index 42, its hard weight 0.1 and the divergence alone), then the shapes and settings
    of the test above, each also with the divergence alone (where the loss is smallest)."""
    for bias in (False, True):
        for w in (0.0, 0.1):
            yield f"liger_functional_bias{int(bias)}_w{w}", _liger_functional(bias), 2.0, w, 42
    for B, T, H, V in [p.values for p in SHAPES]:
        for i, (temperature, w, ignore_index) in enumerate(SETTINGS):
            inputs = _case(B, T, H, V, i % 2 == 0, seed=i)
            if ignore_index != -100 and ignore_index < V:
                inputs[-1][::3] = ignore_index
            for w_ in sorted({w, 0.0}):
                yield f"B{B}T{T}H{H}V{V}_T{temperature}_w{w_}_ii{ignore_index}", inputs, temperature, w_, ignore_index


@pytest.mark.parametrize("divergence,beta", DIV_BETAS)
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_fp32_loss_within_bound_of_float64(impl, divergence, beta):
    """The fp32 loss of each CPU row implementation within LOSS_BOUND (relative) of float64 on
    every case, the divergence alone included, and its gradients within LOSS_BOUND of float64's
    largest entry; float64 is the judge, not fp32 autograd."""
    if impl not in REGISTRY[canonical(divergence, beta)].impls["dense"]:
        pytest.skip(f"{impl} does not run {divergence}")
    worst = {}
    for name, (h, W, b, th, tW, tb, labels), temperature, w, ignore_index in _accuracy_cases():
        kw = dict(labels=labels, divergence=divergence, beta=beta, temperature=temperature, hard_label_weight=w,
                  ignore_index=ignore_index)
        leaves = (h, W) + ((b,) if b is not None else ())
        p64 = [x.double().requires_grad_() for x in leaves]
        zt = F.linear(th.double(), tW.double(), None if tb is None else tb.double())
        ref = kd_loss_reference(F.linear(p64[0], p64[1], p64[2] if b is not None else None), zt, **kw)
        rgrads = torch.autograd.grad(ref, p64)
        p32 = [x.clone().requires_grad_() for x in leaves]
        loss = fused_linear_kd_loss(p32[0], p32[1], th, tW, student_bias=p32[2] if b is not None else None,
                                    teacher_bias=tb, impl=impl, chunk_size=32, **kw)
        grads = torch.autograd.grad(loss, p32)
        errs = {"loss": abs(loss.item() - ref.item()) / abs(ref.item())}
        errs.update({n: ((g.double() - r).abs().max() / r.abs().max()).item()
                     for n, g, r in zip(("dX", "dW", "db"), grads, rgrads)})
        for n, e in errs.items():
            worst[n] = max(worst.get(n, (0.0, "")), (e, name))
    bad = {n: f"{e:.3g} on {case}" for n, (e, case) in worst.items() if not e <= LOSS_BOUND}
    assert not bad, f"{impl} {divergence} beta={beta}: relative errors above {LOSS_BOUND}: {bad}"
