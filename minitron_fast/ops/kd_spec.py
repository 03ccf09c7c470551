"""What one KD step computes, torch-free: ``KDSpec``, the step's weights and its loss options
(``KDLossOptions``, the one definition), and which of those options the step sets itself.

Torch-free so that the trainer's recipe (``distill/config.py``, whose ``loss`` section is generated
from ``KDSpec`` and ``KDLossOptions``) is built and checked without torch; ``ops.kd_step`` runs it.

Example:
    >>> spec = KDSpec(kd_weight=1.0, lm_weight=0.5, loss=KDLossOptions(divergence="jsd", temperature=2.0))
    >>> spec.loss.temperature
    2.0
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from minitron_fast.errors import KDInputError, MinitronError
from minitron_fast.ops.kd_loss.params import DEFAULTS, KDLossOptions

IGNORE_INDEX = -100


class KDSetupError(MinitronError, ValueError):
    """A KD step that cannot run as given (options, or a teacher and student that cannot be
    distilled at the logit level)."""


#: ``KDLossOptions`` fields a KD step sets itself, and why: left at their defaults in
#: ``KDSpec.loss`` (a recipe, ``KDTrainer`` and the TRL trainer do not set them).
STEP_SETS: dict[str, str] = {
    "ignore_index": f"the step marks the tokens it leaves out {IGNORE_INDEX} in its own labels",
    "reduction": "the step sums over valid tokens and divides by num_items (the optimizer step's token count)",
    "hard_label_weight": "the step weighs the student's CE by lm_weight (over kd_weight); set lm_weight",
}

#: ``KDLossOptions`` fields that are facts of the two models: read from their configs by the step's
#: caller (``ops.kd_step.head_options``) into ``KDSpec.loss``; a recipe does not set them.
MODEL_FACTS: dict[str, str] = {
    "softcap": "the models' final-logit softcap, read from their configs",
    "vocab_size": "the vocabulary both lm_heads share (padding rows beyond it), read from the models' configs",
}


@dataclass(frozen=True)
class KDSpec:
    """What one KD step computes. The total is ``kd_weight * kd + lm_weight * lm + inter_weight * inter``.

    Attributes:
        kd_weight: logit KD (``loss.divergence`` at ``loss.temperature``; times ``T**2`` with
            ``loss.t2_scaling``).
        lm_weight: the student's next-token cross-entropy (temperature 1), from the same pass.
        inter_weight: the intermediate-state MSE (needs ``pairs``).
        materialized: plain fp32 torch logits ``[N, V]`` (the baseline and reference) instead of
            the fused loss, which never materializes them.
        loss: the fused loss's options (``KDLossOptions``: divergence, beta, temperature,
            t2_scaling, the row ``impl``, chunk_size, and the models' softcap and vocab_size); the
            fields in ``STEP_SETS`` stay at their defaults (the step sets them).
    """

    kd_weight: float = 1.0
    lm_weight: float = 0.0
    inter_weight: float = 0.0
    materialized: bool = False
    loss: KDLossOptions = field(default_factory=KDLossOptions)

    def __post_init__(self):
        if not isinstance(self.loss, KDLossOptions):
            raise KDSetupError(f"KDSpec.loss must be a KDLossOptions, got {type(self.loss).__name__}")
        try:
            self.loss.validate()
        except KDInputError as exc:
            raise KDSetupError(f"KDSpec.loss: {exc}") from None
        for name, why in STEP_SETS.items():
            if getattr(self.loss, name) != getattr(DEFAULTS, name):
                raise KDSetupError(f"KDSpec.loss.{name}={getattr(self.loss, name)!r}: {why}; leave it at "
                                   f"{getattr(DEFAULTS, name)!r}")
        if min(self.kd_weight, self.lm_weight, self.inter_weight) < 0:
            raise KDSetupError("KDSpec weights must be non-negative")

    def lm_only(self) -> "KDSpec":
        """The same options computing the LM loss alone (weight 1): teacher correction, evaluation."""
        return replace(self, kd_weight=0.0, lm_weight=1.0, inter_weight=0.0)


__all__ = ["IGNORE_INDEX", "KDSetupError", "KDSpec", "MODEL_FACTS", "STEP_SETS"]
