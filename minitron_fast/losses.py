"""Drop-in fused losses as ``nn.Module``s (mirroring ``torch.nn`` losses) and functions.

- ``FusedLinearKDLoss``: logit distillation from the student's final hidden states and lm_head
  against a teacher given as hidden states + head, logits, or top-k logits.
- ``FusedLinearCrossEntropyLoss``: cross-entropy through the lm_head, chunked the same way.

The math, shapes and options are documented on ``minitron_fast.ops.kd_loss.fused_linear_kd_loss``.
"""
from __future__ import annotations

import torch
from torch import nn

from minitron_fast.ops.kd_loss.params import OPTION_NAMES, KDLossOptions, resolve_options
from minitron_fast.ops.kd_loss import (  # noqa: F401  (re-exported)
    KDLossParts,
    fused_linear_cross_entropy,
    fused_linear_kd_loss,
    kd_loss_from_logits,
)


class FusedLinearKDLoss(nn.Module):
    """``nn.Module`` over ``fused_linear_kd_loss`` with the loss options fixed at construction.

    Example:
        >>> loss_fn = FusedLinearKDLoss(divergence="forward_kl", temperature=1.0)
        >>> h, W = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        >>> loss = loss_fn(h, W, torch.randn(6, 5), torch.randn(11, 5))
        >>> loss.backward()
    """

    def __init__(self, divergence: str = "forward_kl", *, options: KDLossOptions | None = None,
                 return_parts: bool = False, **kwargs):
        """``divergence`` and ``kwargs``: the fields of ``KDLossOptions`` (``beta``, ``temperature``,
        ``ignore_index``, ``hard_label_weight``, ``reduction``, ``chunk_size``, ``impl``,
        ``t2_scaling``, ``softcap``, ``vocab_size``); or ``options``, one ``KDLossOptions``.
        Checked now, so a bad option fails at construction rather than at the first step."""
        super().__init__()
        unknown = sorted(set(kwargs) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"FusedLinearKDLoss got unknown options {unknown}; the options are {list(OPTION_NAMES)}")
        self.options = resolve_options(options, {"divergence": divergence, **kwargs}).validate()
        self.return_parts = return_parts  # forward returns KDLossParts(loss, kd, ce, num_tokens)

    def __getattr__(self, name: str):
        if name in OPTION_NAMES:  # loss_fn.temperature etc.: the options' (one definition)
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in OPTION_NAMES:
            raise AttributeError(f"FusedLinearKDLoss's options are fixed at construction; build a new loss, e.g. "
                                 f"FusedLinearKDLoss(options=loss_fn.options.replace({name}=...))")
        super().__setattr__(name, value)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None, *,
                teacher_logits=None, teacher_topk=None, student_bias=None, teacher_bias=None, labels=None,
                num_items=None, teacher_topk_tail_lse=None):
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits=teacher_logits,
            teacher_topk=teacher_topk, student_bias=student_bias, teacher_bias=teacher_bias, labels=labels,
            num_items=num_items, teacher_topk_tail_lse=teacher_topk_tail_lse, return_parts=self.return_parts,
            options=self.options)

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
                f"hard_label_weight={self.hard_label_weight}, reduction={self.reduction!r}")


class FusedLinearCrossEntropyLoss(nn.Module):
    """``nn.Module`` over ``fused_linear_cross_entropy``: ``loss_fn(hidden [N, H], weight [V, H], labels [N])``."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None,
                 impl: str = "auto", softcap: float | None = None):
        super().__init__()
        from minitron_fast.ops.kd_loss import validate_options

        validate_options(reduction=reduction, chunk_size=chunk_size, softcap=softcap)
        self.ignore_index, self.reduction, self.chunk_size, self.impl = ignore_index, reduction, chunk_size, impl
        self.softcap = softcap

    def forward(self, hidden, weight, labels, bias=None, num_items=None):
        return fused_linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                          reduction=self.reduction, num_items=num_items,
                                          chunk_size=self.chunk_size, impl=self.impl, softcap=self.softcap)
