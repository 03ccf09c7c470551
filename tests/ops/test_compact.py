"""In-place compaction (the pruning primitive): C++ and torch paths against index_select."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from minitron_fast._ext import HAS_C
from minitron_fast.ops.compact import compact_, compact_reference

IMPLS = ["cpp", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


def _rand(shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100, 100, shape, dtype=dtype)


def test_extension_is_built():
    # The package is installed with its extension in every supported set-up (run.sh, CI).
    assert HAS_C


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,dim,keep", [
    pytest.param((7, 5), 0, [0, 3, 6], id="rows-7x5"),
    pytest.param((507, 63), 0, "half", id="rows-507x63"),
    pytest.param((63, 507), 1, "half", id="cols-63x507"),
    pytest.param((123, 1), 0, [5], id="rows-single"),
    pytest.param((9, 11), 1, list(range(11)), id="cols-keep-all"),
    pytest.param((300, 4000), 1, "half", id="cols-300x4000-threaded"),
    pytest.param((101,), 0, "half", id="vector"),
])
def test_matches_index_select(impl, dtype, shape, dim, keep):
    t = _rand(shape, dtype)
    n = shape[dim]
    kept = torch.randperm(n)[: max(1, n // 2)].sort().values if keep == "half" else torch.tensor(keep)
    expected = compact_reference(t, kept, dim).clone()
    storage_ptr = t.untyped_storage().data_ptr()
    out = compact_(t, kept, dim, impl=impl)
    assert out is t
    assert torch.equal(t, expected)
    assert t.is_contiguous()
    assert t.untyped_storage().data_ptr() == storage_ptr  # same buffer: no second copy of the tensor


@pytest.mark.parametrize("impl", IMPLS)
def test_parameter_stays_same_object(impl):
    lin = torch.nn.Linear(8, 6)
    w = lin.weight
    ref = w.detach()[:, [1, 2, 7]].clone()
    compact_(lin.weight, torch.tensor([1, 2, 7]), 1, impl=impl)
    assert lin.weight is w and isinstance(lin.weight, torch.nn.Parameter) and w.requires_grad
    assert torch.equal(lin.weight.detach(), ref)
    lin.weight.sum().backward()  # still a working leaf
    assert lin.weight.grad.shape == (6, 3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kept,match", [([2, 1], "strictly increasing"), ([0, 0], "strictly increasing"),
                                        ([0, 9], r"\[0, 5\)"), ([-1], r"\[0, 5\)")])
def test_bad_indices(impl, kept, match):
    t = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=match):
        compact_(t, torch.tensor(kept), 0, impl=impl)


def test_cpp_rejects_bad_indices_directly():
    from minitron_fast._ext import _C

    t = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        _C.compact_rows(t.data_ptr(), 4, 16, [3, 1])


def test_release_tail_returns_pages():
    from minitron_fast._ext import _C

    t = torch.ones(1024, 4096)  # 16 MiB
    compact_(t, torch.arange(0, 1024, 4), 0, impl="cpp", release=False)
    released = _C.release_tail(t.data_ptr(), t.numel() * 4, 1024 * 4096 * 4)
    assert released >= 11 * 2**20  # most of the freed 12 MiB, in whole pages
    assert torch.all(t == 1)  # the kept part is untouched


def test_import_without_extension_warns_once():
    code = (
        "import sys, warnings\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'minitron_fast._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import minitron_fast, torch\n"
        "from minitron_fast.ops.compact import compact_\n"
        "assert not minitron_fast.HAS_C\n"
        "t = torch.arange(12.).view(3, 4)\n"
        "compact_(t, torch.tensor([0, 2]), 0)\n"
        "assert t.tolist() == [[0., 1., 2., 3.], [8., 9., 10., 11.]]\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"
    warn_lines = [ln for ln in out.stderr.splitlines() if "minitron_fast._C is not built" in ln]
    assert len(warn_lines) == 1 and "pure-torch" in warn_lines[0]
