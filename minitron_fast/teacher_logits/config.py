"""The teacher-logits stage's one config: the recipe section, the API argument and the CLI flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from minitron_fast.errors import MinitronError


class TeacherLogitsConfigError(MinitronError, ValueError):
    """A teacher-logits config that does not validate."""


def _opt(help_: str, **kw: Any) -> Any:
    return field(metadata={"help": help_}, **kw)


@dataclass
class TeacherLogitsConfig:
    """Options of ``minitron-fast teacher-logits`` (each field is a flag: ``top_k`` -> ``--top-k``)."""

    model: str | None = _opt("teacher: HF checkpoint directory, or 'demo' for the embedded SmolLM2-135M", default=None)
    data: str = _opt("text: .txt/.jsonl file, directory, saved HF dataset, or 'demo'; its 'train' split is used",
                     default="demo")
    out: str | None = _opt("directory to write (resumed when it holds an interrupted write of the same inputs)",
                           default=None)
    top_k: int = _opt("teacher logits kept per token", default=64)
    seq_len: int = _opt("tokens per train block; must equal the distillation run's data.seq_len", default=256)
    samples: int | None = _opt("train blocks to write (the first N by index; default: all)", default=None)
    batch_size: int = _opt("blocks per teacher forward pass", default=8)
    text_field: str = _opt("JSONL/dataset text field", default="text")
    device: str = _opt("cpu or cuda[:i] (ignored with --device-map)", default="cpu")
    dtype: str = _opt("teacher dtype: float32, bfloat16 or float16", default="float32")
    device_map: str | None = _opt("HF device_map for a teacher larger than one device (e.g. auto)", default=None)
    attn_implementation: str | None = _opt("attention kernel (default: flash-attn 2 on CUDA when installed, else "
                                           "sdpa)", default=None)
    shard_tokens: int = _opt("tokens per shard file (the unit of resume)", default=1 << 20)
    threads: int | None = _opt("torch CPU threads", default=None)

    def validate(self) -> "TeacherLogitsConfig":
        if not self.model:
            raise TeacherLogitsConfigError("teacher-logits needs a teacher: --model PATH (or demo)")
        if not self.out:
            raise TeacherLogitsConfigError("teacher-logits needs an output directory: --out DIR")
        for name in ("top_k", "batch_size", "shard_tokens"):
            if getattr(self, name) < 1:
                raise TeacherLogitsConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise TeacherLogitsConfigError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.samples is not None and self.samples < 1:
            raise TeacherLogitsConfigError(f"samples must be at least 1 (or unset for the whole split), got {self.samples}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise TeacherLogitsConfigError(f"dtype={self.dtype!r} is not one of float32, bfloat16, float16")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cache_fields(self) -> dict[str, Any]:
        """The fields that decide the written rows (not where they go or how fast)."""
        d = self.to_dict()
        for k in ("out", "model", "device", "device_map", "batch_size", "threads", "attn_implementation"):
            d.pop(k)
        return d
