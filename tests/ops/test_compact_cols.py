"""In-place compaction beyond the basics: the multi-threaded C++ schedule (direct and staged
rounds), the bounded-memory torch path, the Triton kernels (interpreted), page release, and
views sharing one storage."""
from __future__ import annotations

import pytest
import torch

import minitron_fast.ops.compact as oc
from minitron_fast._ext import HAS_C
from minitron_fast.ops.compact import compact_, compact_reference

needs_c = pytest.mark.skipif(not HAS_C, reason="minitron_fast._C not built")


def _rand(shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100, 100, shape, dtype=dtype)


def _kept(kind, n):
    if kind == "random75":
        return torch.randperm(n)[: 3 * n // 4].sort().values
    if kind == "drop_first":  # every round has gap 1: all staged
        return torch.arange(1, n)
    if kind == "drop_last":  # nothing moves
        return torch.arange(0, n - 1)
    if kind == "tail":
        return torch.arange(n // 3, n)
    if kind == "every_other":
        return torch.arange(1, n, 2)
    raise ValueError(kind)


KINDS = ["random75", "drop_first", "drop_last", "tail", "every_other"]


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim,shape", [(0, (3001, 257)), (1, (1031, 1201))], ids=["rows", "cols"])
def test_cpp_threaded_schedule(dim, shape, kind, dtype):
    # a few MB per tensor, so rounds pass the 1 MiB direct threshold and the 4 MiB staging block
    t = _rand(shape, dtype)
    kept = _kept(kind, shape[dim])
    expected = compact_reference(t, kept, dim).clone()
    compact_(t, kept, dim, impl="cpp", n_threads=3)
    assert torch.equal(t, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim,shape", [(0, (301, 67)), (1, (67, 301)), (0, (203,))], ids=["rows", "cols", "vector"])
def test_torch_schedule_small_rounds(monkeypatch, poison_empty, dim, shape, kind):
    monkeypatch.setattr(oc, "MIN_DIRECT_BYTES", 256)  # many direct rounds
    t = torch.randn(shape, dtype=torch.float64)
    kept = _kept(kind, shape[dim])
    expected = compact_reference(t, kept, dim).clone()
    flat = t.view(-1)
    n_cols = shape[1] if len(shape) == 2 else 1
    oc._compact_torch(flat, shape[0], n_cols, kept, dim, stage_bytes=1024)  # tiny staging block
    assert torch.equal(flat[: expected.numel()].view(expected.shape), expected)


@pytest.mark.parametrize("kind", ["random75", "drop_first", "tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("dim,shape", [(0, (45, 37)), (1, (29, 75))], ids=["rows", "cols"])
def test_triton_kernels_interpreted(dim, shape, kind, dtype):
    from minitron_fast.kernels.compact import compact_triton_

    t = _rand(shape, dtype)
    kept = _kept(kind, shape[dim])
    expected = compact_reference(t, kept, dim).clone()
    # small staging and direct thresholds: both round kinds run on these tiny shapes
    used = compact_triton_(t.view(-1), shape[0], shape[1], kept, dim, stage_bytes=400, min_direct_bytes=64)
    assert used == expected.numel()
    assert torch.equal(t.view(-1)[:used].view(expected.shape), expected)


def test_triton_through_compact_(poison_empty):
    lin = torch.nn.Linear(33, 21, dtype=torch.float64)
    w = lin.weight
    ref = w.detach()[[0, 4, 5, 20]][:, 3:30].clone()
    compact_(lin.weight, torch.tensor([0, 4, 5, 20]), 0, impl="triton")
    compact_(lin.weight, torch.arange(3, 30), 1, impl="triton")
    assert lin.weight is w and torch.equal(lin.weight.detach(), ref)


def test_aot_specs_are_well_formed():
    from minitron_fast.kernels import compact as kc

    names = [s["name"] for s in kc.AOT_SPECS]
    assert len(names) == len(set(names)) == 8
    for s in kc.AOT_SPECS:
        params = [p for p in s["fn"].arg_names]
        assert list(s["signature"]) == params and set(s["constexprs"]) <= set(params)


@needs_c
def test_release_returns_pages_and_spares_neighbours():
    page = 4096
    n = 64 * 2**20 // 4
    buf = torch.ones(n + 3 * page, dtype=torch.float32)
    a, b = buf[:n].view(n // 1024, 1024), buf[n:]  # two tensors in one storage
    b.copy_(torch.arange(b.numel(), dtype=torch.float32))
    b_ref = b.clone()

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before = rss()
    compact_(a, torch.arange(0, a.shape[0] // 4), 0, impl="cpp", release=True)
    freed = before - rss()
    assert freed > 0.5 * 48 * 2**20  # 3/4 of 64 MB returned (other allocations add noise)
    assert torch.equal(b, b_ref)  # the neighbour sharing the storage is intact
    tail = buf[n // 4 + page: n - page]  # released whole pages read as zeros
    assert int(tail.count_nonzero()) == 0
    assert bool((a == 1).all())


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rkind,ckind", [("random75", "random75"), ("drop_first", "every_other"),
                                         ("tail", "drop_last"), ("drop_last", "drop_first")])
def test_compact_2d_one_pass(impl, dtype, rkind, ckind):
    from minitron_fast.ops.compact import compact_2d_

    if impl == "cpp" and not HAS_C:
        pytest.skip("no _C")
    t = _rand((1503, 1207), dtype)  # ~7 MB of fp32: threaded direct and staged rounds
    rows, cols = _kept(rkind, 1503), _kept(ckind, 1207)
    expected = t[rows][:, cols].clone()
    p = torch.nn.Parameter(t, requires_grad=False) if dtype.is_floating_point else t
    out = compact_2d_(p, rows, cols, impl=impl, n_threads=2)
    assert out is p and torch.equal(p.data if isinstance(p, torch.nn.Parameter) else p, expected)
