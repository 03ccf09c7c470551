"""Assertion helpers shared by the numeric tests (``from tests.numerics import close``)."""
from __future__ import annotations

import math


def close(a, b, tol, what):
    """``max |a - b| <= tol * max(max |b|, 1e-3)`` in float64, finite, with a message naming ``what``."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-3)
    assert math.isfinite(err) and err <= tol * scale, f"{what}: max err {err:.3g} > {tol:.1g} x {scale:.3g}"
