"""Every Triton launch runs with its tensors' device current (GPU-path defect: with ``device: cuda:3``
the launchers launched on cuda:0 with cuda:3 pointers).

No GPU here, so the tensors live on the ``meta`` device, whose guard is a recorder registered in
the one helper (``kernels/_launch.py``), and the launch itself is recorded instead of run: each
kernel launch must happen while the guard of its tensors' device is entered.
"""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import triton.runtime.jit

from minitron_fast.kernels import _launch, compact, importance, kd_loss

MODULES = (compact, importance, kd_loss)


@pytest.fixture
def recorded(monkeypatch):
    current: list[torch.device] = []
    launches: list[tuple[str, torch.device | None]] = []

    @contextlib.contextmanager
    def guard(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    def getitem(self, grid):
        def run(*args, **kwargs):
            launches.append((self.fn.__name__ if hasattr(self, "fn") else repr(self), current[-1] if current else None))
        return run

    monkeypatch.setitem(_launch.GUARDS, "meta", guard)
    monkeypatch.setattr(triton.runtime.jit.KernelInterface, "__getitem__", getitem)
    return launches


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _launch_everything():
    B, T, H, F, nh = 2, 5, 16, 24, 4
    importance.swiglu_stats(_meta(B, T, F), _meta(B, T, F), _meta(B, T), _meta(B, F), _meta(B, F))
    importance.rmsnorm_stats(_meta(B, T, H), _meta(H), 1e-6, None, _meta(B, H), None)
    importance.head_stats(_meta(B, T, H), nh, _meta(B, T), _meta(B, nh), _meta(B, nh))
    importance.block_cos(_meta(B, T, H), _meta(B, T, H), None, _meta(B))
    kd_loss.kd_softmax(_meta(3, 50), _meta(3, 50), _meta(3), _meta(3), div_code=0, beta=0.5, g_mult=1.0)
    compact._launch_rows(_meta(40), _meta(20), _meta(4, dtype=torch.int64), 5)
    compact.compact_triton_(_meta(8 * 6), 8, 6, _meta(3, dtype=torch.int64), dim=1)


def test_every_kernel_launches_under_its_tensors_device(recorded):
    _launch_everything()
    kernels = {name for m in MODULES for name, obj in vars(m).items() if isinstance(obj, triton.runtime.jit.KernelInterface)}
    launched = {name for name, _ in recorded}
    assert kernels and launched == kernels, f"not launched by this test: {kernels - launched}"
    wrong = [(name, dev) for name, dev in recorded if dev != torch.device("meta")]
    assert not wrong, f"launched without their tensors' device current: {wrong}"


def test_every_launcher_goes_through_the_one_helper():
    """Any function in kernels/ that launches a kernel (``kernel[grid](...)``) carries the guard."""
    unguarded = []
    for m in MODULES:
        for name, fn in vars(m).items():
            if inspect.isfunction(fn) and fn.__module__ == m.__name__:
                src = inspect.getsource(inspect.unwrap(fn))
                if "_kernel[" in src and not getattr(fn, "__launches_on_tensor_device__", False):
                    unguarded.append(f"{m.__name__}.{name}")
    assert not unguarded, f"launchers without @on_tensor_device: {unguarded}"


def test_the_cuda_guard_is_torch_cuda_device_and_cpu_tensors_take_none():
    assert _launch.GUARDS["cuda"] is torch.cuda.device
    calls = []
    f = _launch.on_tensor_device(lambda x, y=None: calls.append(x.device) or 7)
    assert f(torch.zeros(2)) == 7 and calls == [torch.device("cpu")]
