"""KD loss options: one row implementation per call (counted), softcap, padded vocabularies,
autocast-style mixed dtypes, the lm_head module (ZeRO-3 entry point) and their bad input."""
from __future__ import annotations

import math

import pytest
import torch

from minitron_fast.errors import MinitronError
from minitron_fast.ops.kd_loss import (
    REGISTRY,
    KDInputError,
    fused_linear_cross_entropy,
    fused_linear_kd_loss,
    kd_loss_from_logits,
    kd_loss_reference,
)
from minitron_fast.ops.kd_loss import chunks
from minitron_fast.ops.kd_loss.divergences import DIVERGENCES  # the registry's (built-in) divergences
from tests.numerics import close

pytestmark = pytest.mark.usefixtures("one_thread")


_close = close


def _head(N=37, V=61, H=12, Ht=10, Vt=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 1.5).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).requires_grad_()
    th = torch.randn(N, Ht, generator=g)
    tW = torch.randn(Vt or V, Ht, generator=g) / Ht ** 0.5 * 3
    labels = torch.randint(0, min(V, Vt or V), (N,), generator=g)
    labels[::5] = -100
    return h, W, th, tW, labels


# ------------------------------------------------------------------------------------------------
# one row implementation per call
# ------------------------------------------------------------------------------------------------

def _count(monkeypatch, name):
    calls = []
    fn = getattr(chunks, name)
    monkeypatch.setattr(chunks, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("impl,runner", [("torch", "chunk_torch"), ("triton", "chunk_triton"), ("cpp", None)])
def test_the_requested_impl_runs_every_chunk(monkeypatch, divergence, impl, runner):
    if impl not in REGISTRY[divergence].impls["dense"]:
        pytest.skip(f"{impl} does not run {divergence}")  # the error is tested below
    if runner is None:
        runner = "chunk_cpp" if divergence == "forward_kl" else "chunk_cpp_div"
    names = ("chunk_torch", "chunk_triton", "chunk_cpp", "chunk_cpp_div")
    counts = {n: _count(monkeypatch, n) for n in names}
    h, W, th, tW, labels = _head()
    fused_linear_kd_loss(h, W, th, tW, labels=labels, divergence=divergence, impl=impl, chunk_size=10).backward()
    assert len(counts[runner]) == 4  # 37 rows in chunks of 10
    assert all(len(c) == 0 for n, c in counts.items() if n != runner)


def test_impl_that_cannot_run_the_options_names_the_ones_that_can():
    h, W, th, tW, labels = _head()
    vals, idx = torch.randn(37, 5), torch.randint(0, 61, (37, 5))
    with pytest.raises(KDInputError, match=r"impl='triton' cannot run divergence='forward_kl' with a top-k teacher; "
                                           r"the implementations that can: 'torch'"):
        fused_linear_kd_loss(h, W, teacher_topk=(vals, idx), impl="triton")
    with pytest.raises(KDInputError, match="impl='triton' cannot run cross-entropy"):
        fused_linear_cross_entropy(h, W, labels, impl="triton")
    assert issubclass(KDInputError, MinitronError) and issubclass(KDInputError, ValueError)


# ------------------------------------------------------------------------------------------------
# softcap
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softcap_matches_float64_on_every_impl(divergence):
    h, W, th, tW, labels = _head()
    kw = dict(labels=labels, divergence=divergence, temperature=1.7, hard_label_weight=0.3, softcap=2.5)
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = kd_loss_reference(h64 @ W64.T, th.double() @ tW.double().T, **kw)
    rh, rW = torch.autograd.grad(ref, (h64, W64))
    uncapped = kd_loss_reference(h64 @ W64.T, th.double() @ tW.double().T, **{**kw, "softcap": None})
    assert abs(ref.item() - uncapped.item()) > 1e-2 * abs(ref.item())  # the cap matters here
    for impl in REGISTRY[divergence].impls["dense"]:
        loss = fused_linear_kd_loss(h, W, th, tW, impl=impl, chunk_size=16, **kw)
        gh, gW = torch.autograd.grad(loss, (h, W))
        _close(loss, ref, 2e-5, f"{impl} loss")
        _close(gh, rh, 2e-5, f"{impl} grad h")
        _close(gW, rW, 2e-5, f"{impl} grad W")


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_softcap_with_logits_and_topk_teachers(impl):
    g = torch.Generator().manual_seed(1)
    zs = (torch.randn(23, 40, generator=g) * 4).requires_grad_()
    zs.data[0, :5] = torch.tensor([0.0, 1e-4, -3e-3, 0.05, -0.07])  # tanh's small-argument branch
    zt = torch.randn(23, 40, generator=g) * 4
    zt[:, -3:] = -math.inf  # masked teacher entries stay masked under the cap
    vals, idx = zt.topk(6, 1)
    for teacher in (dict(teacher_logits=zt), dict(teacher_topk=(vals, idx))):
        loss = kd_loss_from_logits(zs, softcap=3.0, divergence="jsd", impl=impl, hard_label_weight=0.5,
                                   labels=torch.arange(23), **teacher)
        (gz,) = torch.autograd.grad(loss, zs)
        z64 = zs.detach().double().requires_grad_()
        ref = kd_loss_reference(z64, softcap=3.0, divergence="jsd", hard_label_weight=0.5, labels=torch.arange(23),
                                **teacher)
        (rz,) = torch.autograd.grad(ref, z64)
        _close(loss, ref, 2e-5, "loss")
        _close(gz, rz, 2e-5, "grad")


def test_cpp_softcap_runs_in_the_cpp_rows(monkeypatch):
    calls = _count(monkeypatch, "_cap_cpp")
    torch_calls = _count(monkeypatch, "_cap_")
    h, W, th, tW, labels = _head()
    fused_linear_kd_loss(h, W, th, tW, labels=labels, softcap=4.0, impl="cpp", chunk_size=10).backward()
    assert len(calls) == 8 and not torch_calls  # student and teacher, 4 chunks
    fused_linear_kd_loss(h, W, th, tW, labels=labels, softcap=4.0, impl="torch", chunk_size=10)
    assert len(torch_calls) == 8 and len(calls) == 8


# ------------------------------------------------------------------------------------------------
# padded vocabularies
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Vs,Vt", [(50, 64), (64, 50)], ids=["teacher-padded", "student-padded"])
def test_padded_vocab_equals_truncated_logits(Vs, Vt):
    V = min(Vs, Vt)
    h, W, th, tW, labels = _head(V=Vs, Vt=Vt)
    kw = dict(labels=labels, divergence="jsd", beta=0.3, temperature=1.3, hard_label_weight=0.2)
    loss = fused_linear_kd_loss(h, W, th, tW, **kw)
    gh, gW = torch.autograd.grad(loss, (h, W))
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = kd_loss_reference((h64 @ W64.T)[:, :V], (th.double() @ tW.double().T)[:, :V], **kw)
    rh, rW = torch.autograd.grad(ref, (h64, W64))
    _close(loss, ref, 2e-5, "hidden teacher loss")
    _close(gh, rh, 2e-5, "grad h")
    _close(gW, rW, 2e-5, "grad W")
    assert bool((gW[V:] == 0).all())  # padded rows get no gradient
    # given teacher logits, and a top-k teacher (taken from the real prefix)
    zt = th @ tW.T
    from_logits = fused_linear_kd_loss(h, W, teacher_logits=zt, **kw)
    _close(from_logits, ref, 2e-5, "logits teacher")
    vals, idx = zt[:, :V].topk(7, 1)
    topk = fused_linear_kd_loss(h, W, teacher_topk=(vals, idx), vocab_size=V, **kw)
    ref_k = kd_loss_reference((h64 @ W64.T)[:, :V].detach(), teacher_topk=(vals, idx), **kw)
    _close(topk, ref_k, 2e-5, "top-k teacher")
    # kd_loss_from_logits truncates both sides the same way
    zs = (h @ W.T).detach()
    _close(kd_loss_from_logits(zs, zt, **kw), ref, 2e-5, "from logits")


def test_explicit_number_of_real_tokens():
    h, W, th, tW, labels = _head(V=64)
    labels = labels.clamp(max=44)
    loss = fused_linear_kd_loss(h, W, th, tW, labels=labels, vocab_size=45, hard_label_weight=0.5)
    ref = kd_loss_reference((h.detach().double() @ W.detach().double().T)[:, :45],
                            (th.double() @ tW.double().T)[:, :45], labels=labels, hard_label_weight=0.5)
    _close(loss, ref, 2e-5, "vocab_size=45")
    with pytest.raises(KDInputError, match="labels must lie in \\[0, 45\\)"):
        fused_linear_kd_loss(h, W, th, tW, labels=torch.full((37,), 50), vocab_size=45)


# ------------------------------------------------------------------------------------------------
# autocast-style mixed dtypes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_activations_with_fp32_weights(dtype):
    h, W, th, tW, labels = _head(dtype=dtype)
    kw = dict(labels=labels, divergence="reverse_kl", temperature=2.0, hard_label_weight=0.4)
    loss = fused_linear_kd_loss(h, W, th.to(dtype), tW, **kw)
    gh, gW = torch.autograd.grad(loss, (h, W))
    assert gh.dtype == dtype and gW.dtype == torch.float32 and loss.dtype == torch.float32
    # the GEMM runs in the activations' dtype: float64 math on the operands rounded to it
    h64 = h.detach().double().requires_grad_()
    W64 = W.detach().to(dtype).double().requires_grad_()
    zt = th.to(dtype).double() @ tW.to(dtype).double().T
    ref = kd_loss_reference(h64 @ W64.T, zt, **kw)
    rh, rW = torch.autograd.grad(ref, (h64, W64))
    _close(loss, ref, 2e-5, "loss")
    _close(gh, rh, {torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype], "grad h")
    _close(gW, rW, 2e-5, "grad W")
    # a materialized lm_head under torch.autocast: the same up to its half-precision logits
    with torch.autocast("cpu", dtype=dtype):
        zs_auto = torch.nn.functional.linear(h.detach(), W.detach())
    tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    _close(loss, kd_loss_reference(zs_auto.double(), zt, **kw), tol, "vs autocast logits")


def test_under_autocast_fp32_inputs_run_in_the_autocast_dtype():
    h, W, th, tW, labels = _head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_kd_loss(h, W, th, tW, labels=labels)
    gh, gW = torch.autograd.grad(loss, (h, W))
    assert gh.dtype == torch.float32 and gW.dtype == torch.float32
    bf = torch.bfloat16
    ref = kd_loss_reference(h.detach().to(bf).double() @ W.detach().to(bf).double().T,
                            th.to(bf).double() @ tW.to(bf).double().T, labels=labels)
    _close(loss, ref, 2e-5, "loss under autocast")


# ------------------------------------------------------------------------------------------------
# the lm_head module (the ZeRO-3 entry point; without DeepSpeed a plain call)
# ------------------------------------------------------------------------------------------------

def test_lm_head_modules_are_accepted():
    h, W, th, tW, labels = _head()
    head = torch.nn.Linear(12, 61, bias=True)
    thead = torch.nn.Linear(10, 61, bias=False)
    with torch.no_grad():
        head.weight.copy_(W)
        thead.weight.copy_(tW)
    parts = fused_linear_kd_loss(h, head, th, thead, labels=labels, hard_label_weight=0.5, return_parts=True)
    parts.loss.backward()
    ref = fused_linear_kd_loss(h.detach(), W.detach(), th, tW, student_bias=head.bias.detach(), labels=labels,
                               hard_label_weight=0.5)
    torch.testing.assert_close(parts.loss.detach(), ref)
    assert head.weight.grad is not None and head.bias.grad is not None and thead.weight.grad is None
    ce = fused_linear_cross_entropy(h, head, labels)
    torch.testing.assert_close(ce, fused_linear_cross_entropy(h, W.detach(), labels, bias=head.bias))


def test_bare_partitioned_weight_names_the_call():
    h = torch.randn(4, 8)
    W = torch.nn.Parameter(torch.empty(0))
    W.ds_id = 3  # what DeepSpeed ZeRO-3 leaves outside the owning module's forward
    with pytest.raises(KDInputError, match=r"ZeRO-3 partitioned parameter .* fused_linear_kd_loss\(hidden, "
                                           r"model.lm_head"):
        fused_linear_kd_loss(h, W, torch.randn(4, 6), torch.randn(10, 6))
    with pytest.raises(KDInputError, match=r"fused_linear_cross_entropy\(hidden, model.lm_head, labels\)"):
        fused_linear_cross_entropy(h, W, torch.zeros(4, dtype=torch.long))
