"""The export stage's options and entry point: the distilled student copied, file by file and
atomically, to ``<out>/student`` (a stock HF checkpoint that loads with no minitron_fast import)."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from minitron_fast.configtools import opt


@dataclass
class ExportConfig:
    enabled: bool = opt(True, "export the distilled student as a stock HF checkpoint under out/student", cli=False)

    def validate(self, where: str = "") -> "ExportConfig":
        return self


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: ExportConfig | None = None) -> Path:
    """Copies the checkpoint directory ``src`` to ``dst`` atomically (replacing ``dst``)."""
    from minitron_fast.io import atomic_dir

    dst = Path(dst)
    with atomic_dir(dst, overwrite=True) as tmp:
        for f in Path(src).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return dst


__all__ = ["ExportConfig", "export_checkpoint"]
