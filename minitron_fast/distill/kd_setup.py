"""The distillation stage's KD set-up: the KD step's ``KDSpec`` from the recipe's ``loss`` section
and what the two models say (softcap, shared vocabulary), the tokenizer check, and the
intermediate-state loss's layer pairs and projection. No loss is computed here.

The step itself (decoders, lm_heads gathered under ZeRO-3, one fused-loss call returning its KD and
CE parts, the intermediate MSE) is ``minitron_fast.ops.kd_step``, shared with search, the
HF Trainer and TRL integrations and the benchmarks; the loss's options are one dataclass,
``ops.kd_loss.params.KDLossOptions``, from which the recipe's loss section is generated
(``distill.config.LossConfig``).

Intermediate-state loss: for each pair ``[s, t]``, the MSE between ``proj(raw output of student
layer s)`` and the raw output of teacher layer ``t`` (pre-final-norm on both sides, the last layer
included). ``proj`` is one learned linear map from student to teacher width shared by all pairs.
It starts from the prune plan when the student carries one (``minitron.json``): student channel
``j`` is teacher channel ``plan.hidden[j]``, so ``proj`` starts as that scatter; the identity when
the widths are equal and no plan exists; ``nn.Linear``'s default (random) initialization otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from minitron_fast.distill.config import LOSS_STEP_KEYS, ConfigError, LossConfig
from minitron_fast.ops.kd_spec import IGNORE_INDEX, KDSetupError, KDSpec  # noqa: F401  (re-exported)


def check_tokenizers(teacher_tok: Any, student_tok: Any, teacher: str, student: str) -> None:
    """Refuses a teacher and student whose tokenizers map tokens to different ids (compared as
    whole ``token -> id`` maps, not sizes)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return
    diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])
    example = f"e.g. {diff[0][0]!r} -> {diff[0][1]}" if diff else ""
    raise KDSetupError(f"teacher {teacher} and student {student} use different tokenizers ({len(tv)} vs {len(sv)} "
                       f"tokens, {len(diff)} token/id entries differ, {example}); logit KD needs one vocabulary: "
                       "distill a student pruned from this teacher")


def kd_spec(loss: LossConfig, *, inter_weight: float = 0.0, **model_facts: Any) -> KDSpec:
    """The KD step's spec from the recipe's ``loss`` section (its ``LOSS_STEP_KEYS`` and the loss
    options, ``LossConfig.options``) and what the models say (``model_facts``: ``softcap``,
    ``vocab_size``, as ``ops.kd_step.head_options`` returns them)."""
    return KDSpec(**{k: getattr(loss, k) for k in LOSS_STEP_KEYS}, inter_weight=inter_weight,
                  loss=loss.options(**model_facts))


# -- intermediate-state loss --------------------------------------------------------------------------

def layer_pairs(pairs: Sequence[Sequence[int]], n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Recipe pairs ``[[s, t], ...]`` (negative indices count from the last layer) as 0-based
    ``(student_layer, teacher_layer)``; refuses indices outside either model."""
    out = []
    for s, t in pairs:
        s2, t2 = s % n_student if s < 0 else s, t % n_teacher if t < 0 else t
        if not (0 <= s2 < n_student and 0 <= t2 < n_teacher):
            raise ConfigError(f"intermediate pair [{s}, {t}] is outside the student's {n_student} / teacher's "
                              f"{n_teacher} layers")
        out.append((s2, t2))
    return out


def _malformed(p: Path, exc: Exception) -> ConfigError:
    return ConfigError(f"{p} holds a malformed prune plan ({type(exc).__name__}: {exc}); re-export the student "
                       "with minitron-fast prune")


def plan_record(model_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The prune plan (as a dict) in ``model_dir/minitron.json`` (written by ``prune``, carried on by
    ``distill``'s export), or None when there is none."""
    p = Path(model_dir) / "minitron.json" if model_dir is not None else None
    if p is None or not p.is_file():
        return None
    try:
        plan = json.loads(p.read_text()).get("plan")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise _malformed(p, exc) from None
    return plan or None


def plan_hidden_channels(model_dir: str | os.PathLike | None) -> tuple[list[int], int] | None:
    """``(kept, source_hidden)``: the teacher channel kept as each student channel, from the prune
    plan in ``model_dir/minitron.json``, or None when there is none."""
    plan = plan_record(model_dir)
    if plan is None:
        return None
    try:
        return [int(i) for i in plan["kept"]["hidden"]], int(plan["source"]["hidden_size"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _malformed(Path(model_dir) / "minitron.json", exc) from None


def projection(student_width: int, teacher_width: int, plan: tuple[list[int], int] | None = None, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               where: str = "the student") -> nn.Linear:
    """The student->teacher width map of the intermediate-state loss, ``nn.Linear(Hs, Ht)`` without
    bias: ``weight[plan_kept[j], j] = 1`` (else 0) when a plan is known, the identity for equal
    widths without one, the default initialization otherwise."""
    proj = nn.Linear(student_width, teacher_width, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        if plan is not None:
            kept, source = plan
            if len(kept) != student_width or source != teacher_width or not all(0 <= k < source for k in kept):
                raise ConfigError(f"the prune plan of {where} keeps {len(kept)} of {source} hidden channels, but the "
                                  f"student is {student_width} and the teacher {teacher_width} wide: distill the "
                                  "student from the teacher it was pruned from")
            proj.weight.zero_()
            proj.weight[torch.tensor(kept, device=proj.weight.device), torch.arange(student_width, device=device)] = 1
        elif student_width == teacher_width:
            proj.weight.copy_(torch.eye(teacher_width, dtype=dtype, device=device))
    return proj
