"""The KD loss's options, defined once: ``KDLossOptions``, a torch-free frozen dataclass.

``fused_linear_kd_loss`` takes it (``options=``), and its option keywords are its fields with the
same names and defaults (``tests/ops/test_kd_params.py`` holds the two together); the
``FusedLinearKDLoss`` module is built on it, the KD step's ``KDSpec`` holds it (``ops.kd_spec``),
the trainer's recipe section ``loss`` is generated from it (``distill.config.loss_section``), and
``KDTrainer`` and the TRL integration take it. Validation is torch-free (the divergence registry
is), so a config can check its loss options without torch.

Example:
    >>> opts = KDLossOptions(divergence="jsd", beta=0.5, temperature=2.0).validate()
    >>> loss = fused_linear_kd_loss(h, W, th, tW, labels=y, options=opts)   # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from minitron_fast.errors import KDInputError
from minitron_fast.ops.kd_loss.divergences import REGISTRY, names

REDUCTIONS = ("mean", "sum", "none")
ROW_IMPLS = ("auto", "triton", "cpp", "torch")


@dataclass(frozen=True)
class KDLossOptions:
    """How the fused KD loss computes (see ``fused_linear_kd_loss`` for each option's math).

    Attributes:
        divergence: a registered divergence (``divergences.names()``).
        beta: the generalized JSD's beta (``m = beta p_t + (1 - beta) p_s``).
        temperature: ``T > 0``, both models' ``softmax(z / T)``.
        ignore_index: the label of rows left out of every term.
        hard_label_weight: ``w >= 0``; adds ``w * CE(z_s, label)`` at temperature 1.
        reduction: ``mean`` (over valid rows, or ``/ num_items``), ``sum`` or ``none``.
        chunk_size: rows per chunk (None: about 576 MB of ``[chunk, V]`` buffers).
        impl: the row implementation: ``auto``, ``triton``, ``cpp`` or ``torch``.
        t2_scaling: multiply the divergence by ``T**2``.
        softcap: ``c > 0`` or None: ``c tanh(z / c)`` on both models' logits (Gemma).
        vocab_size: the real vocabulary when a head carries padding rows (None: the smaller head's).
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    hard_label_weight: float = 0.0
    reduction: str = "mean"
    chunk_size: int | None = None
    impl: str = "auto"
    t2_scaling: bool = False
    softcap: float | None = None
    vocab_size: int | None = None

    def validate(self) -> "KDLossOptions":
        """Raises a one-line ``KDInputError`` naming the first bad option; returns self. (Whether
        the row ``impl`` can run a call is checked when the call resolves it against its tensors,
        ``vocab_size`` against the heads.)"""
        if self.divergence not in REGISTRY:
            raise KDInputError(f"divergence must be one of {names()}, got {self.divergence!r}")
        if not (isinstance(self.beta, (int, float)) and 0.0 <= float(self.beta) <= 1.0):
            raise KDInputError(f"beta must lie in [0, 1], got {self.beta!r}")
        t = self.temperature
        if not (isinstance(t, (int, float)) and float(t) > 0 and math.isfinite(t)):
            raise KDInputError(f"temperature must be a positive number, got {t!r}")
        if self.reduction not in REDUCTIONS:
            raise KDInputError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if float(self.hard_label_weight) < 0:
            raise KDInputError(f"hard_label_weight must be >= 0, got {self.hard_label_weight!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise KDInputError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.impl not in ROW_IMPLS:
            raise KDInputError(f"impl={self.impl!r} is not one of {ROW_IMPLS}")
        check_softcap(self.softcap)
        return self

    def replace(self, **changes: Any) -> "KDLossOptions":
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """The options as ``fused_linear_kd_loss`` keywords."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_softcap(softcap: Any) -> float | None:
    """``softcap``: None or a positive finite number (returned as float)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (math.isfinite(softcap)
                                                                                  and softcap > 0):
        raise KDInputError(f"softcap must be a positive number (e.g. 30.0 for Gemma-2) or None, got {softcap!r}")
    return float(softcap)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(KDLossOptions))
DEFAULTS = KDLossOptions()


def resolve_options(options: KDLossOptions | None, given: dict[str, Any]) -> KDLossOptions:
    """The options of a call: ``options`` as given (then no option keyword may differ from its
    default: one spelling per call), or the keywords ``given`` (name -> value)."""
    if options is None:
        return KDLossOptions(**given)
    if not isinstance(options, KDLossOptions):
        raise KDInputError(f"options must be a KDLossOptions, got {type(options).__name__}")
    clash = [k for k, v in given.items() if v != getattr(DEFAULTS, k)]
    if clash:
        raise KDInputError(f"pass the loss options either as options= or as keywords, not both ({', '.join(clash)} "
                           "given as keywords too)")
    return options


__all__ = ["DEFAULTS", "KDLossOptions", "check_softcap", "OPTION_NAMES", "REDUCTIONS", "ROW_IMPLS", "resolve_options"]
