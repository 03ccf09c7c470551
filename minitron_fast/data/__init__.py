"""Text sources, deterministic splits and packed token blocks.

Sources: ``"demo"`` (the standard library's ``pydoc_data.topics``: ~465k characters of English
shipped with every Python), a plain ``.txt`` file (documents are blank-line separated
paragraphs), a ``.jsonl`` file with a text field, a directory of ``.txt`` files, or a HF
``datasets`` dataset saved with ``save_to_disk``.

Splits are by document, decided by a stable hash of the document's text, so they are disjoint,
deterministic across runs and machines, and stable when documents are added: ``train``
(distillation and teacher correction), ``calib`` (importance) and ``heldout`` (evaluation).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from minitron_fast.errors import DataError

DEMO = "demo"
SPLITS = ("train", "calib", "heldout")
# Percent of documents per split, by hash bucket in [0, 100).
SPLIT_BUCKETS = {"heldout": (0, 10), "calib": (10, 20), "train": (20, 100)}


def embedded_documents() -> list[str]:
    """The documents of ``pydoc_data.topics`` (one per help topic), in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def _bucket(doc: str) -> int:
    return zlib.crc32(doc.encode("utf-8")) % 100


def split_documents(docs: Iterable[str], split: str) -> list[str]:
    """The documents of ``docs`` that fall in ``split`` (``train``, ``calib`` or ``heldout``)."""
    if split not in SPLIT_BUCKETS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    lo, hi = SPLIT_BUCKETS[split]
    return [d for d in docs if lo <= _bucket(d) < hi]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def load_documents(source: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """All documents of ``source`` (see the module docstring), non-empty, in file order."""
    if str(source) == DEMO:
        return embedded_documents()
    p = Path(source).expanduser()
    if not p.exists():
        raise DataError(f"data path {p} does not exist; pass a .txt or .jsonl file, a directory, or 'demo'")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            docs = _load_hf_dataset(p, text_field)
        else:
            files = sorted(p.rglob("*.txt"))
            if not files:
                raise DataError(f"directory {p} holds no .txt files and is not a saved HF dataset (save_to_disk)")
            docs = [d for f in files for d in _paragraphs(f.read_text(encoding="utf-8", errors="replace"))]
    elif p.suffix in (".jsonl", ".json"):
        docs = _load_jsonl(p, text_field)
    else:
        docs = _paragraphs(p.read_text(encoding="utf-8", errors="replace"))
    if not docs:
        raise DataError(f"data source {p} is empty (no non-blank text found); point --data at a file with text")
    return docs


def _load_jsonl(p: Path, field: str) -> list[str]:
    docs: list[str] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
            if not isinstance(rec, dict) or field not in rec:
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise DataError(f"{p}:{lineno}: no field {field!r} (found {keys}); pass --text-field NAME")
            if isinstance(rec[field], str) and rec[field].strip():
                docs.append(rec[field].strip())
    return docs


def _load_hf_dataset(p: Path, field: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{p} is a saved HF dataset; reading it needs `pip install datasets`") from exc
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if field not in ds.column_names:
        raise DataError(f"dataset {p} has no column {field!r} (columns: {ds.column_names}); pass --text-field NAME")
    return [t.strip() for t in ds[field] if isinstance(t, str) and t.strip()]


def tokenize_documents(tokenizer: Any, docs: Sequence[str]) -> list[list[int]]:
    """Token ids of each document (no special tokens added)."""
    enc = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in enc]


def pack(token_docs: Sequence[Sequence[int]], seq_len: int, *, sep_id: int | None) -> torch.Tensor:
    """Concatenates documents (``sep_id`` between them when given) and cuts the stream into
    ``[n_blocks, seq_len]`` int64 blocks; the incomplete tail is dropped."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    stream: list[int] = []
    for ids in token_docs:
        stream.extend(ids)
        if sep_id is not None:
            stream.append(sep_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def token_blocks(tokenizer: Any, source: str | os.PathLike, split: str, seq_len: int, *,
                 max_blocks: int | None = None, text_field: str = "text") -> torch.Tensor:
    """``[n, seq_len]`` packed token blocks of one split of ``source``. Raises DataError naming
    the split and the sizes when the split holds less than one block."""
    docs = split_documents(load_documents(source, text_field=text_field), split)
    sep = tokenizer.eos_token_id
    blocks = pack(tokenize_documents(tokenizer, docs), seq_len, sep_id=sep)
    if blocks.shape[0] == 0:
        raise DataError(f"the {split!r} split of {source} holds fewer than {seq_len} tokens; use more data or a smaller --seq-len")
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    return blocks


__all__ = ["DEMO", "SPLITS", "embedded_documents", "split_documents", "load_documents", "tokenize_documents",
           "pack", "token_blocks"]
