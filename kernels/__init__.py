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

Why this file hands ``import kernels`` over: Hugging Face's ``kernels`` distribution (which
transformers >= 5.25 imports when it loads weights) has the same top-level name as this folder,
and a script, ``python -m`` or pytest run from the repository root puts the root first on
``sys.path``. So when this file is executed under the name ``kernels`` (never under
``minitron_fast.kernels``, the only name the project uses), it finds the real distribution on the
rest of the import path and installs that in ``sys.modules`` instead of itself, or raises
``ModuleNotFoundError`` as a plain interpreter would where none is installed. Either way
``import kernels`` never yields this folder (tests/test_packaging.py checks all three launchers).
"""

from __future__ import annotations

if __name__ == "kernels":
    def _import_the_real_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
        root = os.path.dirname(here)

        def elsewhere(path: str | None) -> bool:  # not in this folder (a venv may sit inside the repo)
            return path is not None and not os.path.realpath(path).startswith(here + os.sep)

        rest = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            try:
                spec = find_spec("kernels", rest if finder is importlib.machinery.PathFinder else None)
            except (ImportError, AttributeError, TypeError, ValueError):
                continue
            # a regular package or module that is not this folder (a namespace portion is no module)
            if spec is not None and spec.loader is not None and elsewhere(spec.origin):
                module = importlib.util.module_from_spec(spec)
                sys.modules["kernels"] = module  # the importer returns what sys.modules holds
                spec.loader.exec_module(module)
                return
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")

    _import_the_real_kernels()
