"""Exporting a model as a stock Hugging Face checkpoint (loadable with no minitron_fast import)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_dir, file_sha256, same_or_inside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def minitron_record(*, source: str | os.PathLike | None = None, plan: Any = None,
                    scores_file: str | os.PathLike | None = None, scores_sha256: str | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``minitron.json`` record: the source model, the prune plan (a dict, or an object with
    ``to_dict()``), the scores file and its sha256 (computed when only the path is given), the
    package version, plus ``extra``."""
    from minitron_fast import __version__

    rec: dict[str, Any] = {"minitron_fast_version": __version__}
    if source is not None:
        rec["source"] = str(Path(source).resolve()) if Path(str(source)).exists() else str(source)
    if plan is not None:
        rec["plan"] = plan.to_dict() if hasattr(plan, "to_dict") else plan
    if scores_file is not None:
        rec["scores_file"] = str(scores_file)
        if scores_sha256 is None and Path(scores_file).is_file():
            scores_sha256 = file_sha256(scores_file)
    if scores_sha256 is not None:
        rec["scores_sha256"] = scores_sha256
    rec.update(extra or {})
    return rec


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer (and generation config) files present in ``src`` to ``dst``."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file() and not (Path(dst) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def export_hf(model: torch.nn.Module, out_dir: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None,
              record: dict[str, Any] | None = None, overwrite: bool = False,
              protect: list[str | os.PathLike] = (), source: str | os.PathLike | None = None, plan: Any = None,
              scores_file: str | os.PathLike | None = None) -> Path:
    """Saves ``model`` to ``out_dir`` atomically in the ``save_pretrained`` layout (safetensors),
    copies the tokenizer files from ``tokenizer_from``, and writes ``minitron.json``: ``record``
    merged with the source, plan and scores-file hash when given (``minitron_record``). Refuses
    an existing ``out_dir`` unless ``overwrite``, and refuses to write inside any ``protect``
    directory (the user's input model)."""
    out = Path(out_dir)
    for p in list(protect) + ([source] if source is not None and Path(str(source)).is_dir() else []):
        if p is not None and same_or_inside(out, p):
            raise MinitronError(f"refusing to write into the input model directory {p}; choose another --out")
    if source is not None or plan is not None or scores_file is not None:
        record = {**minitron_record(source=source, plan=plan, scores_file=scores_file), **(record or {})}
    with atomic_dir(out, overwrite=overwrite, inputs=protect) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_from is not None:
            copy_tokenizer_files(tokenizer_from, tmp)
        if record is not None:
            (tmp / "minitron.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return out
