"""Loads the optional host extension ``minitron_fast._C``.

The extension is optional at run time: when it is missing (a source checkout that was never
built, or a platform without a compiler), ``HAS_C`` is False, callers use their pure-torch paths,
and one line says so.
"""
from __future__ import annotations

import warnings

try:
    from minitron_fast import _C  # type: ignore[attr-defined]

    HAS_C = True
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    _C = None
    HAS_C = False
    warnings.warn(
        f"minitron_fast._C is not built ({exc}); using the pure-torch paths "
        "(reinstall with `pip install -e .` to build it).",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = ["HAS_C", "_C"]
