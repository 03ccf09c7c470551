"""The evaluate stage's options: one dataclass, read by the recipe's ``evaluate`` section (also
used by the pipeline's held-out perplexity of every checkpoint), the ``minitron-fast eval`` flags
and :func:`~minitron_fast.evaluate.harness.evaluate_model`."""
from __future__ import annotations

from dataclasses import dataclass

from minitron_fast.configtools import key, DeviceMapConfig, OptionError, opt


@dataclass
class EvaluateConfig(DeviceMapConfig):
    eval_blocks: int = opt(8, "held-out blocks (of the data's seq_len tokens) for the held-out loss")
    batch_size: int = opt(8, "blocks per forward")
    tasks: list[str] = opt(help="lm-evaluation-harness tasks: registered names and/or task YAML files (needs "
                                "lm_eval and the task data on this machine)", default_factory=list)
    include_path: list[str] = opt(help="a directory of lm-evaluation-harness task YAML files (repeatable), as "
                                       "lm_eval's --include_path", default_factory=list, list_style="append")
    limit: int | None = opt(None, "examples per lm-eval task (smoke runs; default: all)")

    def validate(self, where: str = "") -> "EvaluateConfig":
        self.check_device(where)
        if self.eval_blocks < 1 or self.batch_size < 1:
            raise OptionError(f"{key(where, 'eval_blocks')} and {key(where, 'batch_size')} must be at least 1, got "
                              f"{self.eval_blocks} and {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise OptionError(f"{key(where, 'limit')} must be at least 1 (or null for every example), got {self.limit}")
        return self


__all__ = ["EvaluateConfig"]
