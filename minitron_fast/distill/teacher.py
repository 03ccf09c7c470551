"""Where the trainer's teacher comes from: a live model, or stored top-k logits.

Both sources answer ``for_batch(ids, blocks)`` for one micro-batch (token ids ``[B, L]`` and their
train-block indices ``[B]``) with the teacher argument of the one KD step
(``minitron_fast.ops.kd_step``):

- ``LiveTeacher``: the model itself; or, with ``topk``, a ``TopKTeacher`` holding exactly the rows
  the offline writer would store (``artifacts.teacher_logits.model_rows``, then the stored bf16
  rounding), so a live run and a run from stored logits see identical teacher rows;
- ``StoredTeacher``: a ``TopKTeacher`` read from a teacher-logits directory for the micro-batch's
  blocks (memory-mapped slices), each block's tokens checked against its stored hash. No teacher
  model is ever loaded.

``semantics`` ``"tail"`` hands the fused loss the tail log-mass (top-k plus one bucket);
``"renorm"`` leaves it out (the top-k renormalized).
"""
from __future__ import annotations

import torch
from torch import nn

from minitron_fast.artifacts import teacher_logits as tl
from minitron_fast.ops.kd_step import TopKTeacher
from minitron_fast.ops.zero3 import gathered

def _teacher(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, semantics: str) -> TopKTeacher:
    k = values.shape[-1]
    return TopKTeacher(values.reshape(-1, k), indices.reshape(-1, k), tail.reshape(-1) if semantics == "tail" else None)


class LiveTeacher:
    def __init__(self, model: nn.Module, *, topk: int | None = None, semantics: str = "tail"):
        self.model = model
        self.topk = topk
        self.semantics = semantics
        self.vocab_size = int(model.config.vocab_size)

    def for_batch(self, ids: torch.Tensor, blocks: torch.Tensor) -> nn.Module | TopKTeacher:
        if self.topk is None:
            return self.model
        rows = tl.model_rows(self.model, ids, self.topk, gather=gathered)
        v, i, t = tl.decode(tl.encode(*rows, self.vocab_size), self.topk)  # the stored rounding
        return _teacher(v.to(ids.device), i.to(ids.device), t.to(ids.device), self.semantics)


class StoredTeacher:
    def __init__(self, reader: tl.TeacherLogits, *, topk: int | None = None, semantics: str = "tail"):
        if topk is not None and topk > reader.k:
            raise tl.TeacherLogitsError(f"loss.topk={topk} but teacher logits {reader.dir} store the top {reader.k}; "
                                        f"use loss.topk <= {reader.k} or rewrite them with --top-k {topk}")
        self.reader = reader
        self.topk = topk
        self.semantics = semantics

    def for_batch(self, ids: torch.Tensor, blocks: torch.Tensor) -> TopKTeacher:
        stored = self.reader.block_hashes()
        mine = tl.block_hashes(ids.cpu())
        for j, b in enumerate(blocks.tolist()):
            self.reader.check_blocks(b + 1)
            if int(stored[b]) != int(mine[j]):
                raise tl.TeacherLogitsError(f"teacher logits {self.reader.dir}: train block {b} holds other tokens "
                                            "than this run's; the logits were written on other data")
        v, i, t = self.reader.rows(blocks.tolist(), k=self.topk)
        return _teacher(v.to(ids.device), i.to(ids.device), t.to(ids.device), self.semantics)
