"""The search stage's options: one dataclass, read by the recipe's ``search`` section, the
``minitron-fast search`` flags and :func:`~minitron_fast.search.run_search`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from minitron_fast.artifacts.targets import BUDGET_EXAMPLES, TargetError, parse_budget_spec
from minitron_fast.configtools import key, DeviceConfig, OptionError, opt
from minitron_fast.errors import MinitronError

KINDS = ("width", "depth", "mixed", "kv")

#: the distill loss keys that make search's retraining objective (a recipe's ``distill.loss``, or
#: the ``search`` command's flags); the rest (``impl``, ``chunk_size``, ``materialized``, top-k)
#: say how distill computes it on its own devices, not what it optimizes, and are not taken
RETRAIN_LOSS_KEYS = ("kd_weight", "lm_weight", "divergence", "beta", "temperature", "t2_scaling")


class SearchError(MinitronError, ValueError):
    """A budget no candidate meets, or a search that cannot run."""


@dataclass
class SearchConfig(DeviceConfig):
    enabled: bool = opt(False, "run the search stage (the recipe; the search command always runs)", cli=False)
    params: str | None = opt(None, f"parameter budget: {BUDGET_EXAMPLES}")
    tolerance: float = opt(0.05, "candidates within this fraction below the budget")
    kinds: list[str] = opt(help="candidate kinds: width (layers and KV groups kept), depth (only layers cut), "
                                "mixed (layers and width cut, KV groups kept), kv (whole KV groups removed, where "
                                "the teacher has more than one; leave it out to keep every KV head)",
                           default_factory=lambda: list(KINDS), choices=KINDS)
    multiple: int | None = opt(None, "hidden/FFN multiple (default 64, or 8 below hidden 1024)")
    max_candidates: int = opt(3, "candidates per kind (spread over the hidden sizes)")
    prune_heads: bool = opt(True, "also shrink query heads (every KV group keeps the same number)",
                            aliases=("--no-head-pruning",))
    retrain_steps: int = opt(20, "KD steps of micro_batch_size blocks per candidate before ranking (0: rank right "
                                 "after pruning)")
    micro_batch_size: int = opt(4, "blocks per retraining step")
    lr: float = opt(2e-4, "retraining learning rate")
    lora_rank: int = opt(0, "retrain with LoRA of this rank through peft (0: full fine-tuning)")
    eval_blocks: int = opt(4, "held-out blocks for ranking")
    seed: int | None = opt(None, "retraining data order and initialization (default: the recipe's seed; 0 on the "
                                 "command line)")

    def validate(self, where: str = "") -> "SearchConfig":
        self.check_device(where)  # and every field with choices
        if self.params is not None:
            try:
                parse_budget_spec(self.params)
            except TargetError as exc:
                raise OptionError(f"{key(where, 'params')}: {exc}") from None
        if not self.kinds:
            raise OptionError(f"{key(where, 'kinds')} must be a non-empty list of {', '.join(KINDS)}")
        if not 0 < self.tolerance < 1:
            raise OptionError(f"{key(where, 'tolerance')} must lie in (0, 1), got {self.tolerance}")
        if self.retrain_steps < 0 or self.lora_rank < 0:
            raise OptionError(f"{key(where, 'retrain_steps')} and {key(where, 'lora_rank')} must be >= 0")
        for k in ("max_candidates", "micro_batch_size", "eval_blocks"):
            if getattr(self, k) < 1:
                raise OptionError(f"{key(where, k)} must be at least 1, got {getattr(self, k)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise OptionError(f"{key(where, 'lr')} must be a finite positive number, got {self.lr}")
        if self.multiple is not None and self.multiple < 1:
            raise OptionError(f"{key(where, 'multiple')} must be positive, got {self.multiple}")
        return self


def retrain_spec(loss: Any) -> Any:
    """Search's retraining ``KDSpec`` from the :data:`RETRAIN_LOSS_KEYS` of ``loss`` (a recipe's
    ``distill.loss`` section, or anything with those attributes); a bad value is a one-line
    SearchError."""
    from minitron_fast.ops.kd_loss.params import KDLossOptions
    from minitron_fast.ops.kd_spec import KDSpec

    v = {k: getattr(loss, k) for k in RETRAIN_LOSS_KEYS}
    if v["kd_weight"] < 0 or v["lm_weight"] < 0 or v["kd_weight"] + v["lm_weight"] == 0:
        raise SearchError(f"retraining objective: kd_weight {v['kd_weight']} and lm_weight {v['lm_weight']} must be "
                          ">= 0, one of them positive")
    try:
        return KDSpec(kd_weight=v.pop("kd_weight"), lm_weight=v.pop("lm_weight"), loss=KDLossOptions(**v))
    except MinitronError as exc:
        raise SearchError(f"retraining objective: {exc}") from None


__all__ = ["KINDS", "RETRAIN_LOSS_KEYS", "SearchConfig", "SearchError", "retrain_spec"]
