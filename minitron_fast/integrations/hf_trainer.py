"""Distillation with the stock Hugging Face ``Trainer``, the student and teacher heads fused into the loss.

``KDTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` runs the student's and the
teacher's **decoders only** (final hidden states, no ``[B, T, V]`` logits) and feeds them with
both lm_head weights to ``fused_linear_kd_loss``. ``causal_lm_kd_loss`` is the same computation as
a function, for plain PyTorch loops.

Example:
    >>> trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
    ...                     train_dataset=ds, temperature=1.0)          # doctest: +SKIP
    >>> trainer.train()                                                  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import torch

from minitron_fast.integrations.zero3 import call_through, gathered
from minitron_fast.losses import FusedLinearKDLoss


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / DeepSpeed engine
        model = model.module
    return model


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The base decoder (returning final, normalized hidden states) and the lm_head of an HF causal LM."""
    model = _unwrap(model)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to fuse into the loss")
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        base = model.get_decoder()
    return base, head


def causal_lm_kd_loss(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, *, loss_fn: FusedLinearKDLoss | None = None,
                      num_items=None) -> torch.Tensor:
    """Next-token distillation loss of ``student`` from ``teacher`` (HF causal LMs, same vocabulary).

    Args:
        input_ids: ``[B, T]``; attention_mask: ``[B, T]`` or None.
        labels: ``[B, T]`` (unshifted, HF convention; ``-100`` ignored). Default: ``input_ids``
            with padding (``attention_mask == 0``) ignored.
        loss_fn: the ``FusedLinearKDLoss`` (default: forward KL, T=1).
        num_items: divisor instead of the number of valid tokens (gradient accumulation).

    Position ``t``'s hidden state predicts token ``t + 1``: hidden states ``[:, :-1]`` pair with
    labels ``[:, 1:]``. Neither model materializes logits; the teacher runs under ``no_grad``.
    """
    loss_fn = loss_fn or FusedLinearKDLoss()
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    s_base, s_head = decoder_and_head(student)
    t_base, t_head = decoder_and_head(teacher)
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    hs = s_base(**kwargs, use_cache=False).last_hidden_state
    with torch.no_grad():
        ht = t_base(**kwargs, use_cache=False).last_hidden_state
    shift_labels = labels[:, 1:].reshape(-1)
    hs = hs[:, :-1].reshape(-1, hs.shape[-1])
    ht = ht[:, :-1].reshape(-1, ht.shape[-1]).to(t_head.weight.dtype)

    def head_loss(hs, ht):
        # runs as the student lm_head's forward (ZeRO-3: its weight is gathered here and re-gathered
        # for backward by DeepSpeed's hooks); the frozen teacher head is gathered read-only
        with gathered(t_head.weight, getattr(t_head, "bias", None)):
            return loss_fn(hs.to(s_head.weight.dtype), s_head.weight, ht, t_head.weight,
                           student_bias=getattr(s_head, "bias", None), teacher_bias=getattr(t_head, "bias", None),
                           labels=shift_labels, num_items=num_items)

    return call_through(s_head, head_loss, hs, ht)


def _trainer_base():
    from transformers import Trainer

    return Trainer


class KDTrainer(_trainer_base()):
    """``transformers.Trainer`` that distills ``model`` (the student) from ``teacher_model``.

    Extra keyword arguments: ``teacher_model`` (frozen, moved to the student's device),
    ``divergence``, ``beta``, ``temperature``, ``t2_scaling``, ``hard_label_weight``,
    ``chunk_size`` (see ``fused_linear_kd_loss``). Gradient accumulation: when the Trainer counts
    the batch's label tokens (``num_items_in_batch``), the loss is divided by that count and the
    Trainer is told it is already scaled.
    """

    def __init__(self, *args, teacher_model, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, t2_scaling: bool = False, hard_label_weight: float = 0.0,
                 chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_loss_fn = FusedLinearKDLoss(divergence, beta=beta, temperature=temperature, t2_scaling=t2_scaling,
                                            hard_label_weight=hard_label_weight, chunk_size=chunk_size)
        teacher_model.eval().requires_grad_(False)
        if not any(hasattr(p, "ds_id") for p in teacher_model.parameters()):
            teacher_model.to(self.args.device)
        self.teacher_model = teacher_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        # bf16/fp16=True: accelerate autocasts only model.forward, which the fused path bypasses
        with self.accelerator.autocast():
            loss = causal_lm_kd_loss(model, self.teacher_model, inputs["input_ids"], inputs.get("attention_mask"),
                                     labels, loss_fn=self.kd_loss_fn, num_items=num_items_in_batch)
        # divided by the accumulated batch's token count: the Trainer must not divide again
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the count is global; DDP averages gradients
        return (loss, None) if return_outputs else loss
