"""Deterministic sharding of packed token blocks across ranks and micro-batches.

The training stream is an endless sequence of sample positions: position ``p`` is block
``perm_e(p % n)`` of epoch ``e = p // n``, where ``perm_e`` is the seeded permutation of epoch ``e``
(``minitron_fast.data.order.BlockOrder``: a ``randperm`` seeded with ``seed + e`` up to 2**20
blocks, above that a Feistel bijection evaluated per position, so no rank materializes an
epoch's order). Optimizer step ``s`` consumes positions
``[s * G, (s + 1) * G)`` with ``G = world * micro_batch * grad_accum``; micro-batch ``m`` of rank
``r`` takes the ``micro_batch`` positions starting at ``s * G + (m * world + r) * micro_batch``.

So the data position is the step number alone: a resumed run that restarts at step ``s`` reads
exactly what an uninterrupted run reads, and the global batch of a step does not depend on how
it is split (2 ranks x 1 micro-batch sees the same blocks as 1 rank x 2 micro-batches).

``blocks`` is anything indexable by a tensor of block indices with a ``shape`` of ``(n, T)``: a
``[n, T]`` tensor, or a memory-mapped ``minitron_fast.data.TokenBlocks``, of which each rank
reads only the blocks of its own micro-batches.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from minitron_fast.data.order import DENSE_MAX, BlockOrder


class ShardedBlocks:
    def __init__(self, blocks, *, world: int, rank: int, micro_batch: int, grad_accum: int, seed: int = 0,
                 dense_max: int = DENSE_MAX):
        if len(blocks.shape) != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be a non-empty [n, T] tensor or TokenBlocks, got {tuple(blocks.shape)}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.blocks = blocks
        self.world, self.rank = world, rank
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.seed = seed
        self.order = BlockOrder(blocks.shape[0], seed, dense_max=dense_max)

    @property
    def seq_len(self) -> int:
        return int(self.blocks.shape[1])

    @property
    def global_batch(self) -> int:
        return self.world * self.micro_batch * self.grad_accum

    def indices(self, positions: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """The block indices ``[len(positions)]`` of sample positions ``positions``."""
        return self.order(positions)

    def micro_batch_indices(self, step: int) -> list[torch.Tensor]:
        """The block indices ``[micro_batch]`` of this rank's ``grad_accum`` micro-batches of
        optimizer step ``step`` (what keyed per-block data, such as stored teacher logits, is read by)."""
        starts = step * self.global_batch + (np.arange(self.grad_accum) * self.world + self.rank) * self.micro_batch
        positions = starts[:, None] + np.arange(self.micro_batch)  # [grad_accum, micro_batch]
        return list(self.indices(positions.reshape(-1)).split(self.micro_batch))  # one evaluation for the step

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This rank's ``grad_accum`` micro-batches ``[micro_batch, T]`` of optimizer step ``step``."""
        return [self.blocks[i] for i in self.micro_batch_indices(step)]  # only these blocks are read

    def position(self, step: int) -> dict[str, int | str]:
        """The data position reached after ``step`` optimizer steps (stored in checkpoints)."""
        p = step * self.global_batch
        return {"step": step, "samples": p, "epoch": p // self.blocks.shape[0], "n_blocks": int(self.blocks.shape[0]),
                "order": self.order.kind}

    def changed_since(self, saved: dict | None, step: int) -> list[str]:
        """What differs between this data and the data position ``saved`` in the checkpoint of
        step ``step`` (``["n_blocks 40 -> 37"]``; empty when nothing does). A resume over changed
        data would read other blocks than the interrupted run. Keys a checkpoint lacks are not
        compared (checkpoints written before ``order`` was recorded)."""
        now, saved = self.position(step), saved or {}
        return [f"{k} {saved[k]} -> {now[k]}" for k in ("n_blocks", "order") if k in saved and saved[k] != now[k]]

def eval_shard(n: int, world: int, rank: int, batch: int) -> list[tuple[list[int], list[float]]]:
    """This rank's evaluation batches over ``n`` blocks: ``(indices, weights)`` pairs, the same
    count on every rank (ZeRO-3 forwards are collective), padded with weight-0 repeats."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine = mine + [0] * (per_rank - len(mine))
    return [(mine[i:i + batch], weights[i:i + batch]) for i in range(0, per_rank, batch)]
