"""Fused importance-statistics ops: Triton (interpreted) and torch against float64 references."""
import pytest
import torch
import torch.nn.functional as F

from minitron_fast.ops import importance as ops

SHAPES = [pytest.param(2, 8, 16, id="B2-T8-C16"), pytest.param(3, 13, 37, id="B3-T13-C37-odd")]
IMPLS = ["torch", "triton"]


pytestmark = pytest.mark.usefixtures("one_thread")



def _mask(B, T, padded):
    if not padded:
        return None
    m = torch.ones(B, T)
    m[0, : T // 3] = 0  # left padding on sample 0
    m[-1, T - 2:] = 0  # right padding on the last sample
    return m


def _sums(a, m):  # a [B, T, U] float64 nonneg; m [B, T] or None
    w = torch.ones(a.shape[:2], dtype=a.dtype) if m is None else m.double()
    return (a * w[..., None]).sum(1), (a * a * w[..., None]).sum(1)


GATE_REFS = {"silu": F.silu,  # float64 references of the kernel's activations
             "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))}


@pytest.mark.parametrize("act", sorted(GATE_REFS))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_swiglu_with_stats(B, T, C, padded, impl, act, poison_empty):
    g, u = torch.randn(B, T, C) * 3, torch.randn(B, T, C)
    m = _mask(B, T, padded)
    s1, s2 = torch.full((B, C), 0.5), torch.zeros(B, C)  # accumulates onto what is there
    h = ops.swiglu_with_stats(g, u, m, s1, s2, act=act, impl=impl)
    ref = GATE_REFS[act](g.double()) * u.double()
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-6)
    r1, r2 = _sums(ref.abs(), m)
    torch.testing.assert_close(s1.double(), r1 + 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.double(), r2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["w", "1+w"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_rmsnorm_with_stats(B, T, C, padded, impl, offset, poison_empty):
    x, w = torch.randn(B, T, C) * 3, torch.randn(C)
    m = _mask(B, T, padded)
    s1, s2 = torch.zeros(B, C), torch.zeros(B, C)
    y = ops.rmsnorm_with_stats(x, w, 1e-6, m, s1, s2, offset=offset, impl=impl)
    xd = x.double()
    ref = (offset + w.double()) * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    r1, r2 = _sums(ref.abs(), m)
    torch.testing.assert_close(s1.double(), r1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s2.double(), r2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("impl", IMPLS)
def test_rmsnorm_bf16_matches_hf_rounding(impl, offset):
    x, w = torch.randn(2, 5, 24).bfloat16(), torch.randn(24).bfloat16()
    s1 = torch.zeros(2, 24)
    y = ops.rmsnorm_with_stats(x, w, 1e-5, None, s1, None, offset=offset, impl=impl)
    ref = ops.rmsnorm_reference(x, w, 1e-5, offset)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
    # stats describe the rounded output down_proj/attention see (the interpreter's fp32->bf16 cast
    # truncates, so compare with the kernel's own output tightly and with torch's at bf16 slack)
    torch.testing.assert_close(s1, y.float().abs().sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s1, ref.float().abs().sum(1), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("nh,hd", [pytest.param(4, 16, id="nh4-hd16"), pytest.param(3, 24, id="nh3-hd24-odd")])
def test_head_stats(nh, hd, padded, impl):
    B, T = 3, 11
    x = torch.randn(B, T, nh * hd)
    m = _mask(B, T, padded)
    s1, s2 = torch.zeros(B, nh), torch.zeros(B, nh)
    ops.head_stats(x, nh, m, s1, s2, impl=impl)
    n = x.double().view(B, T, nh, hd).norm(dim=-1)
    r1, r2 = _sums(n, m)
    torch.testing.assert_close(s1.double(), r1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2.double(), r2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("B,T,C", SHAPES)
def test_block_cosine(B, T, C, padded, impl):
    x = torch.randn(B, T, C)
    y = x + 0.7 * torch.randn(B, T, C)
    m = _mask(B, T, padded)
    out = torch.zeros(B)
    ops.block_cosine(x, y, m, out, impl=impl)
    cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
    ref = (cos * (1 if m is None else m.double())).sum(1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_abs_stats_ignores_padding_values():
    x = torch.randn(2, 6, 5)
    m = torch.ones(2, 6)
    m[1, :2] = 0
    s1 = torch.zeros(2, 5)
    ops.abs_stats(x, m, s1, None)
    x2 = x.clone()
    x2[1, :2] = 1e6  # garbage (even NaN) at padded positions must not matter
    x2[1, 0, 0] = float("nan")
    s1b = torch.zeros(2, 5)
    ops.abs_stats(x2, m, s1b, None)
    torch.testing.assert_close(s1, s1b)


def test_bad_impl():
    with pytest.raises(ValueError, match="swiglu_with_stats"):
        ops.swiglu_with_stats(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), None, None, None, impl="cpp")
