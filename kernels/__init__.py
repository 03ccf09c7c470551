"""Triton device code, one file per op family, shipped as ``minitron_fast.kernels``.

Only ``@triton.jit`` kernels and thin launchers live here; the public functions, autograd and
torch references are in ``minitron_fast/ops/``. Nothing here runs at import beyond defining the
kernels.

Convention for the kernel report (``python -m bench kernel_report``): each ``kernels/<op>.py``
defines ``AOT_SPECS``, a list of dicts, one per kernel and config to compile ahead of time::

    AOT_SPECS = [
        {"name": "kd_fwd_bwd[bf16,BLOCK_V=128]", "fn": _kd_fwd_bwd_kernel,
         "signature": {"x_ptr": "*bf16", "n": "i32", ...},   # triton ASTSource signature
         "constexprs": {"BLOCK_V": 128, ...}, "num_warps": 4, "num_stages": 3,
         "flops": "2*N*V*H (...)", "min_bytes": "..."},
    ]
"""
