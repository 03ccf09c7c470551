"""Triton device code, one file per op family, shipped as ``minitron_fast.kernels``.

Only ``@triton.jit`` kernels and thin launchers live here; the public functions, autograd and
torch references are in ``minitron_fast/ops/``. Nothing here runs at import beyond defining the
kernels.
"""
