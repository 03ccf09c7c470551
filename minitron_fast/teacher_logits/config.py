"""The teacher-logits stage's options: one dataclass, read by the recipe's ``teacher_logits``
section, the ``minitron-fast teacher-logits`` flags and
:func:`~minitron_fast.teacher_logits.write_teacher_logits`."""
from __future__ import annotations

from dataclasses import dataclass

from minitron_fast.configtools import DeviceMapConfig, OptionError, opt


@dataclass
class TeacherLogitsConfig(DeviceMapConfig):
    top_k: int = opt(64, "teacher logits kept per token (k)")
    seq_len: int | None = opt(None, "tokens per train block; must equal the distillation run's data.seq_len "
                                    "(default: the data's seq_len, 256 on the command line)")
    samples: int | None = opt(None, "train blocks to write: the first N by block index (default: the whole split)")
    batch_size: int = opt(8, "blocks per teacher forward pass")
    shard_tokens: int = opt(1 << 20, "tokens per shard file (the unit of resume)")

    def validate(self, where: str = "") -> "TeacherLogitsConfig":
        self.check_device(where)  # and every field with choices
        for name in ("top_k", "batch_size", "shard_tokens"):
            if getattr(self, name) < 1:
                raise OptionError(f"{where}{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise OptionError(f"{where}seq_len must be at least 2, got {self.seq_len}")
        if self.samples is not None and self.samples < 1:
            raise OptionError(f"{where}samples must be at least 1 (or unset for the whole split), got {self.samples}")
        return self


__all__ = ["TeacherLogitsConfig"]
