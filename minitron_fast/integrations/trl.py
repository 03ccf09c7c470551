"""TRL's ``DistillationTrainer`` with minitron_fast's fused KD loss.

``FusedDistillationTrainer`` is TRL's trainer (its data handling, on-policy generation, logging,
accelerate/DeepSpeed set-up) with one method replaced: the divergence. TRL computes it with its
own chunked divergence (``trl/kernels/chunked_divergence.py``) from both models' hidden states and
``lm_head.weight``; here the same hidden states go through minitron_fast's one KD step
(``ops.kd_step.head_loss``: the fused loss, which never materializes ``[N, V]``), so

- TRL's ``beta`` keeps its meaning (0 forward KL, 1 reverse KL, between: the generalized JSD with
  ``m = beta p_t + (1 - beta) p_s``) and ``temperature`` too; no ``T**2`` factor, as in TRL;
- the teacher can be its top-k logits (``teacher_top_k``), with the tail bucket (``tail=True``)
  or renormalized, as the offline teacher is stored;
- under DeepSpeed ZeRO-3 the student's partitioned ``lm_head`` is gathered by running the loss as
  the head's forward, and the teacher's read-only (``tests/integrations/test_zero3.py``: 2 CPU
  ranks, both heads partitioned, the losses and trained head equal to one process's);
- ``lmbda`` mixes on-policy and off-policy batches as GKD does: each generation batch is the
  student's own samples with probability ``lmbda`` (TRL 1.16 always generates), else the
  dataset's ``completion`` column (1.0, the default, is TRL's behaviour).

The student's per-token entropy that TRL logs is not computed by the fused loss: it is logged
as NaN.

Example (the 10 lines of a TRL script, with our loss in place)::

    from trl import DistillationConfig
    from minitron_fast.integrations.trl import FusedDistillationTrainer

    args = DistillationConfig(output_dir="out", beta=0.5, temperature=1.0, max_completion_length=128)
    trainer = FusedDistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=ds,            # "prompt" (and "completion" for lmbda < 1)
                                       processing_class=tokenizer, lmbda=0.5, teacher_top_k=None)
    trainer.train()
"""
from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor, nn

try:
    import trl
    from trl import DistillationTrainer
except ImportError as exc:  # pragma: no cover - exercised by tests/integrations/test_trl.py in a subprocess
    raise ImportError("minitron_fast.integrations.trl needs TRL: pip install minitron_fast[trl]") from exc

from minitron_fast.ops.kd_loss.params import DEFAULTS, KDLossOptions
from minitron_fast.ops.kd_step import (IGNORE_INDEX, KDSetupError, KDSpec, TeacherHidden, TopKTeacher,
                                       decoder_and_head, head_loss, head_options, unwrap)

TRL_VERSION = trl.__version__

# config fields that scale logits before the softmax (TRL reads them; the fused loss has no such factor)
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def check_beta_lmbda(beta: float, lmbda: float) -> None:
    """``beta`` and ``lmbda`` in [0, 1], each refused in one line naming it."""
    for name, v in (("beta", beta), ("lmbda", lmbda)):
        if not 0.0 <= float(v) <= 1.0:
            raise KDSetupError(f"{name}={v} lies outside [0, 1] (beta: 0 forward KL, 1 reverse KL, between the "
                               "generalized JSD; lmbda: the fraction of on-policy batches)")


def divergence_of(beta: float) -> str:
    """TRL's ``beta`` as a divergence of the KD loss (the registry's ``for_beta``): 0 forward KL,
    1 reverse KL, else the generalized JSD at ``beta``."""
    from minitron_fast.ops.kd_loss.divergences import for_beta

    return for_beta(beta)


def _check_no_logit_scale(model: nn.Module, who: str) -> None:
    cfg = unwrap(model).config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for k in _LOGIT_SCALES:
        v = getattr(cfg, k, None)
        if v is not None and float(v) != 1.0:
            raise KDSetupError(f"the {who}'s config sets {k}={v}: the fused loss applies no logit scale; use TRL's own "
                               "DistillationTrainer for this model")


def _topk_teacher(rows: Tensor, head: nn.Module, k: int, *, tail: bool, softcap: float | None) -> TopKTeacher:
    """The teacher's top-k log-probabilities (and tail) for ``rows [N, Ht]``, a bounded chunk of
    rows at a time (``artifacts.teacher_logits.head_topk_rows``), the head gathered under ZeRO-3."""
    from minitron_fast.artifacts.teacher_logits import head_topk_rows
    from minitron_fast.ops.zero3 import gathered

    with gathered(head.weight, getattr(head, "bias", None)):
        v, i, t = head_topk_rows(rows, head.weight, getattr(head, "bias", None), k, softcap=softcap)
    return TopKTeacher(v.to(rows.device), i.to(rows.device), t.to(rows.device) if tail else None)


#: the loss options TRL's own arguments set (``DistillationConfig.beta`` and ``.temperature``)
_TRL_SETS = ("divergence", "beta", "temperature")


def trl_loss_options(beta: float, temperature: float, options: KDLossOptions | None = None,
                     **model_facts: Any) -> KDLossOptions:
    """The fused loss's options for TRL's ``beta`` and ``temperature``: ``options`` (the others:
    ``impl``, ``chunk_size``, ...; default ``KDLossOptions()``) with the divergence of ``beta``
    (``divergence_of``) at ``temperature``, and ``model_facts`` (``softcap``, ``vocab_size``) where
    ``options`` leaves them None. An option TRL sets, given in ``options`` too, is refused."""
    o = options if options is not None else KDLossOptions()
    if not isinstance(o, KDLossOptions):
        raise KDSetupError(f"options must be a KDLossOptions, got {type(o).__name__}")
    clash = [k for k in _TRL_SETS if getattr(o, k) != getattr(DEFAULTS, k)]
    if clash:
        raise KDSetupError(f"options.{clash[0]}={getattr(o, clash[0])!r}: TRL sets the divergence through "
                           "DistillationConfig's beta (0 forward KL, 1 reverse KL, between: JSD) and temperature; "
                           "set them there")
    facts = {k: v for k, v in model_facts.items() if getattr(o, k) is None}
    return o.replace(divergence=divergence_of(beta), beta=float(beta) if 0 < beta < 1 else DEFAULTS.beta,
                     temperature=float(temperature), **facts)


def fused_divergence_loss(student: nn.Module, teacher: nn.Module, student_hidden: Tensor, teacher_hidden: Tensor,
                          completion_ids: Tensor, loss_mask: Tensor, *, beta: float, temperature: float = 1.0,
                          num_items: Tensor | float | None = None, teacher_top_k: int | None = None,
                          tail: bool = True, options: KDLossOptions | None = None) -> tuple[Tensor, Tensor]:
    """TRL's divergence, through the one KD step: ``student_hidden [B, K, Hs]`` and
    ``teacher_hidden [B, K, Ht]`` are the models' final hidden states that predict the ``K``
    completion tokens ``completion_ids [B, K]`` (TRL's ``_get_last_hidden_state``), ``loss_mask
    [B, K]`` marks the tokens in the loss. ``options``: the fused loss's other options (the row
    ``impl``, ``chunk_size``, ...; ``trl_loss_options``). Returns ``(loss, valid tokens)``: the loss
    is the sum over valid tokens of the divergence at ``temperature``, divided by ``num_items``
    (None: the valid count), as TRL reduces it."""
    check_beta_lmbda(beta, 0.0)
    _check_no_logit_scale(student, "student")
    _check_no_logit_scale(teacher, "teacher")
    spec = KDSpec(kd_weight=1.0, loss=trl_loss_options(beta, temperature, options, **head_options(student, teacher)))
    _, s_head = decoder_and_head(student)
    _, t_head = decoder_and_head(teacher)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(t_head.weight.device)
    labels = completion_ids.masked_fill(loss_mask == 0, IGNORE_INDEX).reshape(-1).to(hs.device)
    if teacher_top_k is not None:
        t_rows: TeacherHidden | TopKTeacher = _topk_teacher(ht, t_head, teacher_top_k, tail=tail,
                                                            softcap=spec.loss.softcap)
    else:
        t_rows = TeacherHidden(ht, t_head.weight, getattr(t_head, "bias", None))
    out = head_loss(hs, s_head, t_rows, labels, spec=spec, num_items=num_items)
    return out["loss"], (labels != IGNORE_INDEX).sum()


class FusedDistillationTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` whose divergence is minitron_fast's fused KD loss (see the
    module docstring). Arguments are TRL's, plus:

    Args:
        lmbda: fraction of generation batches that are on-policy (the student's samples); the rest
            use the dataset's ``completion`` column. 1.0 (default) is TRL's behaviour.
        teacher_top_k: distil from the teacher's top-k logits (None: its full distribution).
        tail: with ``teacher_top_k``, keep the teacher's mass outside the top k as one bucket
            (True) or renormalize the top k (False; reverse KL is then refused: it is infinite).
        options: the fused loss's other options, a ``KDLossOptions`` (the row ``impl``,
            ``chunk_size``, ...; default: automatic); its divergence, beta and temperature are TRL's
            (``DistillationConfig.beta``, ``.temperature``).
    """

    def __init__(self, *args: Any, lmbda: float = 1.0, teacher_top_k: int | None = None, tail: bool = True,
                 options: KDLossOptions | None = None, **kwargs: Any):
        check_beta_lmbda(0.0, lmbda)
        KDSpec(loss=trl_loss_options(0.0, 1.0, options))  # checked before TRL builds anything
        if teacher_top_k is not None and teacher_top_k < 1:
            raise KDSetupError(f"teacher_top_k must be at least 1 (or None for the full distribution), got "
                               f"{teacher_top_k}")
        self.lmbda = float(lmbda)
        self.teacher_top_k, self.tail, self.loss_options = teacher_top_k, tail, options
        self._batch: list[dict[str, Any]] | None = None
        self._generation_batches = 0
        super().__init__(*args, **kwargs)
        check_beta_lmbda(self.beta, lmbda)
        self._check_pair()

    # -- set-up checks
    def _check_pair(self) -> None:
        student, teacher = unwrap(self.model), unwrap(self.teacher_model)
        vs, vt = student.config.vocab_size, teacher.config.vocab_size
        tok = getattr(self, "_tokenizer", None) or self.processing_class
        head_options(student, teacher, n_tokens=len(tok) if tok is not None else None)  # padding rows, softcaps
        _check_no_logit_scale(student, "student")
        _check_no_logit_scale(teacher, "teacher")
        if self.teacher_top_k is not None and self.teacher_top_k > min(vs, vt):
            raise KDSetupError(f"teacher_top_k={self.teacher_top_k} exceeds the vocabulary ({min(vs, vt)})")
        max_pos = getattr(student.config, "max_position_embeddings", None)
        gen = getattr(self.args, "max_completion_length", None)
        if max_pos and gen and gen >= max_pos:
            raise KDSetupError(f"max_completion_length={gen} leaves no room for a prompt within the student's "
                               f"context of {max_pos} tokens (max_position_embeddings); lower it")

    # -- lmbda: on-policy or the dataset's completions, per generation batch
    def on_policy_now(self) -> bool:
        """Whether this generation batch is the student's own samples: a draw seeded by the run's
        seed and the batch number, so every rank draws the same."""
        if self.lmbda >= 1.0:
            return True
        if self.lmbda <= 0.0:
            return False
        return random.Random(f"{self.args.seed}:{self._generation_batches}").random() < self.lmbda

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._batch = inputs
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._batch = None
            self._generation_batches += 1

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self.on_policy_now() or self._batch is None:
            self._metrics["train" if self.model.training else "eval"]["on_policy"].append(1.0)
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        self._metrics["train" if self.model.training else "eval"]["on_policy"].append(0.0)
        return self._dataset_completions(len(prompt_ids))

    def _dataset_completions(self, n: int) -> list[list[int]]:
        """The token ids of the batch's ``completion`` column (text, or an assistant message),
        ending with EOS and cut to ``max_completion_length``."""
        rows = self._batch or []
        if len(rows) != n or any("completion" not in r for r in rows):
            raise KDSetupError("lmbda < 1 needs a 'completion' column in the dataset (the off-policy batches train on "
                               "it); add one, or set lmbda=1 for on-policy training only")
        texts = []
        for r in rows:
            c = r["completion"]
            if isinstance(c, list):  # conversational: [{"role": "assistant", "content": ...}]
                c = "".join(m["content"] for m in c if isinstance(m.get("content"), str))
            texts.append(c)
        ids = self._tokenizer(text=texts, add_special_tokens=False)["input_ids"]
        eos = self._tokenizer.eos_token_id
        cap = self.args.max_completion_length or None
        out = []
        for x in ids:
            x = list(x)[: (cap - 1) if cap else None]
            out.append(x + ([eos] if eos is not None else []))
        return out

    # -- the loss
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if any(k in inputs for k in ("pixel_values", "image_grid_thw")):
            raise KDSetupError("FusedDistillationTrainer takes text models; use TRL's DistillationTrainer for VLMs")
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"] if "tool_mask" not in inputs else \
            inputs["completion_mask"] * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, keep)
        loss, n_valid = fused_divergence_loss(
            unwrapped_student, unwrapped_teacher, student_hidden, teacher_hidden, inputs["completion_ids"], loss_mask,
            beta=self.beta, temperature=self.temperature, num_items=num_items_in_batch,
            teacher_top_k=self.teacher_top_k, tail=self.tail, options=self.loss_options)
        return loss, torch.full((), float("nan"), device=loss.device), n_valid


__all__ = ["FusedDistillationTrainer", "TRL_VERSION", "check_beta_lmbda", "divergence_of", "fused_divergence_loss",
           "trl_loss_options"]
