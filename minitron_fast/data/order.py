"""The order in which training reads its blocks: one seeded permutation of ``range(n)`` per
epoch, evaluated only at the positions a rank asks for.

``BlockOrder(n, seed)(positions)`` maps sample positions ``p = 0, 1, 2, ...`` (running on across
epochs) to block ``perm_e(p % n)`` of epoch ``e = p // n``. The permutation of an epoch depends on
``(n, seed, e)`` alone, so every rank and every process (a resumed run included) computes the same
one, each for its own positions. Two constructions, chosen by ``n``:

- ``n <= DENSE_MAX`` (2**20 blocks; 8 MiB of int64 per epoch, ~50 ms to draw):
  ``torch.randperm(n)`` from a generator seeded with ``seed + e``, the order every run used before
  ``FeistelPermutation`` existed. It costs nothing at that size and keeps the recorded results of
  every run of that size (the demo's report, the benchmarks, the tests' expected batches) as they
  were.
- above: ``FeistelPermutation``, O(1) memory, each index evaluated on its own. At 12 M blocks (100 B
  tokens at 8,192) a ``randperm`` is 92 MiB per epoch on every rank and takes ~0.8 s on a CPU
  core; at 500 M blocks (1 T tokens at 2,048) 3.7 GiB.
"""
from __future__ import annotations

import functools
import hashlib
import math
from typing import Callable, Sequence

import numpy as np
import torch

DENSE_MAX = 1 << 20     # the largest n that keeps the materialized randperm order
ROUNDS = 6              # Feistel rounds (each one updates one half of the index)

_U = np.uint64
_C1, _C2 = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB)  # splitmix64's finalizer constants
_S30, _S27, _S31 = _U(30), _U(27), _U(31)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele et al., 2014): a bijective 64-bit mixer in which every input
    bit flips about half of the output bits. uint64 arithmetic wraps modulo 2**64."""
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


class FeistelPermutation:
    """A seeded bijection of ``range(n)`` evaluated per index in O(1) memory.

    ``perm(i)`` for an integer array ``i`` (values in ``[0, n)``, any shape) returns the int64 array
    of the same shape, vectorized in numpy. ``key`` is any ``str`` (``BlockOrder`` uses
    ``"{seed}:{epoch}"``).

    Construction (a keyed Feistel network on a mixed-radix domain with cycle-walking: Luby and
    Rackoff, 1988; Black and Rogaway, "Ciphers with arbitrary finite domains", CT-RSA 2002; the
    modular-addition rounds of NIST SP 800-38G's FF1 and FFX):

    1. ``A = ceil(sqrt(n))`` and ``B = ceil(n / A)``, so ``n <= A * B < n + A``. An index
       ``x < A * B`` is the pair ``(x // B, x % B) = (H, L)``, ``H < A``, ``L < B``.
    2. ``ROUNDS`` rounds alternate ``H = (H + F(L ^ k_r)) mod A`` and ``L = (L + F(H ^ k_r)) mod B``.
       A round changes one part by a function of the other, which it leaves alone, so subtracting
       the same value undoes it: each round is a bijection of ``[0, A * B)`` whatever ``F`` is,
       and so is their composition ``P``. ``F`` is splitmix64's finalizer; the round keys ``k_r``
       are a blake2b digest of ``key``, not Python's ``hash``, so every process and platform
       computes the same permutation.
    3. Cycle-walking: ``perm(x)`` is the first of ``P(x), P(P(x)), ...`` that is below ``n``. The
       walk ends: it follows the cycle of ``P`` through ``x``, which comes back to ``x < n``. It is
       injective: walking backwards (``P``'s inverse) from ``perm(x)``, the first value below ``n``
       is ``x`` again, so two starts cannot end at one value. An injective map of ``[0, n)`` into
       itself is a bijection. A pass lands outside ``[0, n)`` with probability under
       ``A / (n + A)``, about ``1 / sqrt(n)``: at 12 M blocks one index in ~3,500 walks a step.

    Example:
        >>> perm = FeistelPermutation(10, key="0:0")
        >>> sorted(perm(np.arange(10)).tolist()) == list(range(10))
        True
    """

    def __init__(self, n: int, key: str):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        if n > 1 << 62:
            raise ValueError(f"n = {n} is too large for 64-bit Feistel rounds (at most 2**62)")
        self.n = int(n)
        a = math.isqrt(self.n - 1) + 1                # ceil(sqrt(n))
        self._A, self._B = _U(a), _U(-(-self.n // a))  # n <= A * B < n + A
        digest = hashlib.blake2b(key.encode(), digest_size=8 * ROUNDS, person=b"minitron-order").digest()
        self._keys = [_U(k) for k in np.frombuffer(digest, dtype="<u8")]

    def _network(self, x: np.ndarray) -> np.ndarray:
        """``P``: the Feistel network on ``[0, A * B)``; ``x`` is uint64 ``[m]``."""
        A, B = self._A, self._B
        hi, lo = x // B, x % B
        for r, k in enumerate(self._keys):
            if r % 2 == 0:
                hi = (hi + _mix64(lo ^ k) % A) % A
            else:
                lo = (lo + _mix64(hi ^ k) % B) % B
        return hi * B + lo

    def __call__(self, i) -> np.ndarray:
        i = np.asarray(i)
        if i.size and (i.min() < 0 or i.max() >= self.n):
            raise IndexError(f"indices must lie in [0, {self.n}), got [{i.min()}, {i.max()}]")
        n = _U(self.n)
        y = self._network(i.reshape(-1).astype(np.uint64))
        walk = np.flatnonzero(y >= n)                  # still outside [0, n): walk on
        while walk.size:
            y[walk] = self._network(y[walk])
            walk = walk[y[walk] >= n]
        return y.astype(np.int64).reshape(i.shape)


class BlockOrder:
    """The block each sample position reads: ``order(positions)`` (int64 positions, any number of
    epochs; a ``range``, list, array or tensor) is the ``[len(positions)]`` int64 tensor of block
    indices. Position ``p`` is block ``perm_e(p % n)`` with ``e = p // n``: every epoch reads every
    block exactly once. ``kind`` (``"randperm"`` or ``"feistel"``) says which construction serves
    this ``n`` (``dense_max`` moves the boundary, for tests).

    Example:
        >>> order = BlockOrder(37, seed=3)
        >>> order(range(35, 39))        # the last two blocks of epoch 0, the first two of epoch 1
        tensor([10, 29, 12, 31])
    """

    def __init__(self, n: int, seed: int = 0, *, dense_max: int = DENSE_MAX):
        if n < 1:
            raise ValueError(f"a block order needs n >= 1 blocks, got {n}")
        self.n, self.seed = int(n), int(seed)
        self.kind = "randperm" if self.n <= dense_max else "feistel"
        # the epochs in use: one call (a rank's step) spans at most two unless a step outruns an epoch
        self._epoch = functools.lru_cache(maxsize=2)(self._make_epoch)

    def _make_epoch(self, epoch: int) -> Callable[[np.ndarray], np.ndarray]:
        if self.kind == "randperm":
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
            return perm.__getitem__
        return FeistelPermutation(self.n, key=f"{self.seed}:{epoch}")

    def __call__(self, positions: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        p = np.asarray(positions, dtype=np.int64).reshape(-1)
        if not p.size:
            return torch.zeros(0, dtype=torch.long)
        if p.min() < 0:
            raise IndexError(f"sample positions must be >= 0, got {p.min()}")
        epoch, i = np.divmod(p, self.n)
        first, last = int(epoch.min()), int(epoch.max())
        if first == last:  # the usual case: one epoch
            return torch.from_numpy(self._epoch(first)(i))
        out = np.empty_like(p)
        for e in np.unique(epoch).tolist():
            m = epoch == e
            out[m] = self._epoch(e)(i[m])
        return torch.from_numpy(out)
