"""Where the trainer's teacher signal comes from: a live model, or stored top-k logits.

Both sources answer ``micro_batch(ids, blocks)`` for one micro-batch (token ids ``[B, L]`` and
their train-block indices ``[B]``) with the tensors the loss needs:

- ``LiveTeacher`` runs the teacher: ``th`` (final hidden states ``[B*(L-1), Ht]``) and
  ``t_inter`` (chosen layers' outputs), or, with ``topk``, the same top-k rows the offline
  writer would store (``topk_rows`` then the stored rounding), so a live run and an offline run
  see identical teacher rows;
- ``StoredTeacher`` reads the rows of the micro-batch's blocks from a teacher-logits directory
  (memory-mapped slices) and checks each block's tokens against the stored block hash. No
  teacher is ever loaded.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from minitron_fast.artifacts import teacher_logits as tl


class LiveTeacher:
    def __init__(self, model: nn.Module, *, layers: tuple[int, ...] = (), topk: int | None = None,
                 gather: Callable[[list[nn.Parameter]], Any] | None = None):
        self.model = model
        self.layers = layers
        self.topk = topk
        self.gather = gather
        self.vocab_size = int(model.config.vocab_size)

    def head(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        from minitron_fast.models import get_view

        h = get_view(self.model).lm_head
        return h.weight, h.bias

    @torch.no_grad()
    def micro_batch(self, ids: torch.Tensor, blocks: torch.Tensor) -> dict[str, Any]:
        out = self.model.base_model(input_ids=ids, use_cache=False, output_hidden_states=bool(self.layers))
        last = out.last_hidden_state
        th = last[:, :-1].reshape(-1, last.shape[-1])
        fw: dict[str, Any] = {"t_inter": [out.hidden_states[i + 1] for i in self.layers]}
        if self.topk is None:
            fw["th"] = th
            return fw
        w, b = self.head()
        with self.gather([w, b]) if self.gather else _null():
            rows = []
            chunk = max(1, (1 << 28) // (4 * w.shape[0]))
            for c0 in range(0, th.shape[0], chunk):
                z = torch.nn.functional.linear(th[c0:c0 + chunk], w, b).float()
                rows.append(tl.decode(tl.encode(*tl.topk_rows(z, self.topk), self.vocab_size), self.topk))
        fw["topk"] = tuple(torch.cat([r[j] for r in rows]) for j in range(3))
        return fw


class StoredTeacher:
    def __init__(self, reader: tl.TeacherLogits, *, topk: int | None = None, device: torch.device | str = "cpu"):
        if topk is not None and topk > reader.k:
            raise tl.TeacherLogitsError(f"loss.topk={topk} but teacher logits {reader.dir} store the top {reader.k}; "
                                        f"use loss.topk <= {reader.k} or rewrite them with --top-k {topk}")
        self.reader = reader
        self.topk = topk
        self.device = device
        self.layers: tuple[int, ...] = ()

    def micro_batch(self, ids: torch.Tensor, blocks: torch.Tensor) -> dict[str, Any]:
        stored = self.reader.block_hashes()
        mine = tl.block_hashes(ids.cpu())
        for j, b in enumerate(blocks.tolist()):
            if b >= stored.shape[0] or int(stored[b]) != int(mine[j]):
                self.reader.check_blocks(b + 1)
                raise tl.TeacherLogitsError(f"teacher logits {self.reader.dir}: train block {b} holds other tokens "
                                            "than this run's; the logits were written on other data")
        v, i, t = self.reader.rows(blocks.tolist(), k=self.topk)
        k = v.shape[-1]
        return {"topk": (v.reshape(-1, k).to(self.device), i.reshape(-1, k).to(self.device),
                         t.reshape(-1).to(self.device)), "t_inter": []}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
