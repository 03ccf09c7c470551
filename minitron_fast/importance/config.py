"""The importance stage's options: one dataclass, read by the recipe's ``importance`` section, the
``minitron-fast importance`` flags and :func:`~minitron_fast.importance.run_importance`."""
from __future__ import annotations

from dataclasses import dataclass

from minitron_fast.configtools import key, DeviceMapConfig, OptionError, opt

AGGREGATIONS = ("mean", "l2", "var")
HEAD_SCORES = ("input", "output")


@dataclass
class ImportanceConfig(DeviceMapConfig):
    samples: int = opt(1024, "calibration samples: blocks of seq_len tokens from the data's calib split "
                             "(the papers use 1024)")
    seq_len: int | None = opt(None, "tokens per calibration sample (default: the data's seq_len, 256 on the "
                                    "command line)")
    batch_size: int = opt(8, "samples per forward pass (on the CPU, fewer where one sample's widest activation "
                             "times the batch would exceed 4 MB: the scores are the same, the forwards faster)")
    seq_agg: str = opt("mean", "aggregation over the sequence (the papers' best: mean)", choices=AGGREGATIONS)
    batch_agg: str = opt("l2", "aggregation over samples (the papers' best: l2)", choices=AGGREGATIONS)
    head_score: str = opt("input", "query heads by the norm of their output before o_proj (input; the papers') or "
                                   "of their contribution after o_proj (output; see docs/importance.md)",
                          choices=HEAD_SCORES)
    depth_lm_loss: bool = opt(False, "also the held-out LM loss with each layer, and each contiguous block of "
                                     "depth_block layers, skipped (depth metrics lm_loss and lm_loss_block)")
    depth_block: int | None = opt(None, "block size for depth_lm_loss: the number of layers the prune target "
                                        "drops (default layers // 4)")
    heldout_samples: int = opt(16, "held-out samples for depth_lm_loss")
    allow_fewer: bool = opt(False, "proceed when the data holds fewer calibration samples than samples")
    impl: str = opt("auto", "statistics kernels: auto, torch or triton", choices=("auto", "torch", "triton"))

    def validate(self, where: str = "") -> "ImportanceConfig":
        self.check_device(where)  # and every field with choices
        for k in ("samples", "batch_size", "heldout_samples"):
            if getattr(self, k) < 1:
                raise OptionError(f"{key(where, k)} must be at least 1, got {getattr(self, k)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise OptionError(f"{key(where, 'seq_len')} must be at least 2, got {self.seq_len}")
        if self.depth_block is not None and self.depth_block < 1:
            raise OptionError(f"{key(where, 'depth_block')} must be at least 1, got {self.depth_block}")
        return self

    def check_impl(self, device: str, where: str = "") -> None:
        """``impl=triton`` where Triton cannot run (a CPU device without TRITON_INTERPRET=1) is a
        one-line OptionError naming the implementations that can, raised before any model loads."""
        from minitron_fast.ops._dispatch import triton_available, triton_interpreted

        if self.impl == "triton" and not (triton_available() and (device.startswith("cuda") or triton_interpreted())):
            raise OptionError(f"{key(where, 'impl')}=triton cannot run on {device} (Triton kernels need a CUDA device, or "
                              "TRITON_INTERPRET=1 for the CPU interpreter); here these run: auto, torch")


__all__ = ["AGGREGATIONS", "HEAD_SCORES", "ImportanceConfig"]
