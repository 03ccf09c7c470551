"""Distillation with the stock Hugging Face ``Trainer``, the student and teacher heads fused into the loss.

``KDTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` is the package's one KD step
(``minitron_fast.ops.kd_step``): the student's and the teacher's **decoders only** (final
hidden states, no ``[B, T, V]`` logits), both lm_heads into one fused-loss call (gathered under
ZeRO-3). ``causal_lm_kd_loss`` is the same step as a function, for plain PyTorch loops.

Example:
    >>> trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
    ...                     train_dataset=ds, temperature=1.0)          # doctest: +SKIP
    >>> trainer.train()                                                  # doctest: +SKIP
"""
from __future__ import annotations

import torch

from minitron_fast.ops.kd_loss.params import DEFAULTS, OPTION_NAMES, KDLossOptions
from minitron_fast.ops.kd_spec import MODEL_FACTS, STEP_SETS
from minitron_fast.ops.kd_step import KDSpec, decoder_and_head, head_options, kd_step  # noqa: F401
from minitron_fast.losses import FusedLinearKDLoss


def spec_of(loss_fn: FusedLinearKDLoss, student=None, teacher=None) -> KDSpec:
    """The ``KDSpec`` of a ``FusedLinearKDLoss`` (``total = kd + hard_label_weight * ce``): its
    options, with the fields the step sets (``STEP_SETS``) left to the step and the final-logit
    softcap and shared vocabulary read from the models' configs when given (what the loss module
    says wins over the configs)."""
    o = loss_fn.options
    if o.reduction not in ("mean", "sum"):
        raise ValueError(f"causal_lm_kd_loss needs reduction 'mean' or 'sum', got {o.reduction!r}")
    facts = head_options(student, teacher) if student is not None else {}
    facts.update({k: getattr(o, k) for k in MODEL_FACTS if getattr(o, k) is not None})
    return KDSpec(kd_weight=1.0, lm_weight=o.hard_label_weight,
                  loss=o.replace(**{k: getattr(DEFAULTS, k) for k in STEP_SETS}, **facts))


def causal_lm_kd_loss(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, *, loss_fn: FusedLinearKDLoss | None = None,
                      num_items=None, spec: KDSpec | None = None) -> torch.Tensor:
    """Next-token distillation loss of ``student`` from ``teacher`` (HF causal LMs, same vocabulary).

    Args:
        input_ids: ``[B, T]``; attention_mask: ``[B, T]`` or None.
        labels: ``[B, T]`` (unshifted, HF convention; ``loss_fn.ignore_index`` ignored). Default:
            ``input_ids`` with padding (``attention_mask == 0``) ignored.
        loss_fn: the ``FusedLinearKDLoss`` (default: forward KL, T=1); or ``spec``, a ``KDSpec``.
        num_items: divisor instead of the number of valid tokens (gradient accumulation).

    This is ``minitron_fast.ops.kd_step.kd_step``: position ``t``'s hidden state predicts
    token ``t + 1``; neither model materializes logits; the teacher runs under ``no_grad``; under
    ZeRO-3 the lm_heads are gathered. The final-logit softcap and padded vocabularies come from
    the models' configs.
    """
    if spec is None:
        spec = spec_of(loss_fn or FusedLinearKDLoss(), student, teacher)
    ignore = loss_fn.ignore_index if loss_fn is not None else -100
    if labels is not None and ignore != -100:
        labels = labels.masked_fill(labels == ignore, -100)
    if num_items is None and loss_fn is not None and loss_fn.reduction == "sum":
        num_items = 1.0
    return kd_step(student, teacher, input_ids, attention_mask, labels, spec=spec, num_items=num_items)["loss"]


def _trainer_base():
    from transformers import Trainer

    return Trainer


class KDTrainer(_trainer_base()):
    """``transformers.Trainer`` that distills ``model`` (the student) from ``teacher_model``.

    Extra keyword arguments: ``teacher_model`` (frozen, moved to the student's device) and the
    fused loss's options: ``options=KDLossOptions(...)`` or its fields as keywords (``divergence``,
    ``beta``, ``temperature``, ``t2_scaling``, ``hard_label_weight``, ``chunk_size``, ``impl``, ...;
    see ``fused_linear_kd_loss``). Gradient accumulation: when the Trainer counts the batch's label
    tokens (``num_items_in_batch``), the loss is divided by that count and the Trainer is told it
    is already scaled.
    """

    def __init__(self, *args, teacher_model, options: KDLossOptions | None = None, **kwargs):
        # the loss options are KDLossOptions' fields (one definition); the rest are the Trainer's
        loss_fn = FusedLinearKDLoss(options=options, **{k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs})
        super().__init__(*args, **kwargs)
        self.kd_loss_fn = loss_fn
        self.kd_spec = spec_of(self.kd_loss_fn, self.model, teacher_model)
        teacher_model.eval().requires_grad_(False)
        if not any(hasattr(p, "ds_id") for p in teacher_model.parameters()):
            teacher_model.to(self.args.device)
        self.teacher_model = teacher_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        # bf16/fp16=True: accelerate autocasts only model.forward, which the fused path bypasses
        with self.accelerator.autocast():
            loss = kd_step(model, self.teacher_model, inputs["input_ids"], inputs.get("attention_mask"), labels,
                           spec=self.kd_spec, num_items=num_items_in_batch)["loss"]
        # divided by the accumulated batch's token count: the Trainer must not divide again
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # the count is global; DDP averages gradients
        return (loss, None) if return_outputs else loss
