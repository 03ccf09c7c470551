"""Exporting a model as a stock Hugging Face checkpoint (loadable with no minitron_fast import)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_dir, same_or_inside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def export_hf(model: torch.nn.Module, out_dir: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None,
              record: dict[str, Any] | None = None, overwrite: bool = False,
              protect: list[str | os.PathLike] = ()) -> Path:
    """Saves ``model`` to ``out_dir`` atomically in the ``save_pretrained`` layout (safetensors),
    copies the tokenizer files from ``tokenizer_from``, and writes ``record`` as
    ``minitron.json``. Refuses an existing ``out_dir`` unless ``overwrite``, and refuses to write
    inside any ``protect`` directory (the user's input model)."""
    out = Path(out_dir)
    for p in protect:
        if p is not None and same_or_inside(out, p):
            raise MinitronError(f"refusing to write into the input model directory {p}; choose another --out")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_from is not None:
            src = Path(tokenizer_from)
            for name in TOKENIZER_FILES:
                if (src / name).is_file() and not (tmp / name).exists():
                    shutil.copy2(src / name, tmp / name)
        if record is not None:
            (tmp / "minitron.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return out
