"""The prune stage's options: one dataclass, read by the recipe's ``prune`` section, the
``minitron-fast prune`` flags and the pipeline's prune stage."""
from __future__ import annotations

from dataclasses import dataclass

from minitron_fast.artifacts.targets import BUDGET_AXES, TargetError, parse_target
from minitron_fast.configtools import key, DeviceConfig, OptionError, opt

DEPTH_METRICS = ("block_importance", "lm_loss", "lm_loss_block")
DEPTH_MODES = ("contiguous", "top")


@dataclass
class PruneConfig(DeviceConfig):
    target: str | None = opt(None, "target shape: hidden=3072,ffn=9216,heads=32,kv_heads=8,layers=16 (missing keys "
                                   "keep the source value), or a budget params=4.5e9 / params=90M / params=0.5x; "
                                   "MoE models also take experts=N (top-N experts per MoE layer) and "
                                   "expert_ffn=M (each expert's top-M neurons)")
    depth_metric: str = opt("block_importance", "depth score that chooses the layers to drop: block_importance, "
                                                "lm_loss (per layer) or lm_loss_block (the measured block; needs "
                                                "importance depth_lm_loss with depth_block = layers dropped)",
                            choices=DEPTH_METRICS)
    depth_mode: str = opt("contiguous", "drop the best contiguous block of layers (the 2nd paper) or keep the top "
                                        "layers", choices=DEPTH_MODES)
    budget_axes: str = opt("width", "axes a params= budget shrinks (width: hidden and FFN; experts: MoE "
                                                    "models' expert count)", choices=BUDGET_AXES)
    streaming: bool = opt(True, "prune straight from the safetensors shards, reading only kept slices (a model "
                                "larger than RAM); --no-streaming loads the model and prunes it in place",
                          aliases=("--in-memory",))
    impl: str = opt("auto", "in-place compaction backend (--no-streaming)", choices=("auto", "cpp", "torch"))

    def validate(self, where: str = "") -> "PruneConfig":
        self.check_device(where)  # and every field with choices
        if self.target is not None:
            try:
                parse_target(self.target)
            except TargetError as exc:
                raise OptionError(f"{key(where, 'target')}: {exc}") from None
        return self

    def check_impl(self, device: str, where: str = "") -> None:
        """``impl=cpp`` where the C++ compaction cannot run (``_C`` not built, or a CUDA model) is a
        one-line OptionError naming the implementations that can, raised before any model loads."""
        from minitron_fast._ext import HAS_C

        if self.impl == "cpp" and not self.streaming and (not HAS_C or device.startswith("cuda")):
            why = "minitron_fast._C is not built" if not HAS_C else f"it compacts host memory, not {device}"
            raise OptionError(f"{key(where, 'impl')}=cpp cannot run here ({why}); here these run: auto, torch")


__all__ = ["DEPTH_METRICS", "DEPTH_MODES", "PruneConfig"]
