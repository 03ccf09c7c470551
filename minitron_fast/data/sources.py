"""Streaming document sources and their content fingerprints.

Every reader yields documents one at a time, in file order, in bounded memory: a ``.txt`` file
(blank-line separated paragraphs), a directory of ``.txt`` files, a ``.jsonl`` file with a text
field, a ``.parquet`` file, a HF ``datasets`` dataset saved with ``save_to_disk`` (read through
its Arrow memory map), or ``"demo"`` (the standard library's ``pydoc_data.topics``).

A document longer than ``MAX_PIECE_CHARS`` (a paragraph of a huge text file without blank
lines) is yielded in pieces, the later ones flagged as continuations, so no reader ever holds
more than about one piece in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from minitron_fast.errors import DataError

DEMO = "demo"
MAX_PIECE_CHARS = 1 << 20      # a paragraph longer than this is yielded in pieces
_READ_CHARS = 1 << 20
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

# (text, continues): ``continues`` is True when ``text`` extends the previous document.
Piece = tuple[str, bool]


def embedded_documents() -> list[str]:
    """The documents of ``pydoc_data.topics`` (one per help topic), in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def _resolve(source: str | os.PathLike) -> Path:
    p = Path(source).expanduser()
    if not p.exists():
        raise DataError(f"data path {p} does not exist; pass a .txt, .jsonl or .parquet file, a directory, or 'demo'")
    return p


def _is_hf_dataset(p: Path) -> bool:
    return p.is_dir() and any((p / m).exists() for m in _HF_MARKERS)


def source_kind(source: str | os.PathLike) -> str:
    """``demo``, ``hf``, ``dir``, ``jsonl``, ``parquet`` or ``txt`` (checks that the path exists)."""
    if str(source) == DEMO:
        return "demo"
    p = _resolve(source)
    if p.is_dir():
        return "hf" if _is_hf_dataset(p) else "dir"
    if p.suffix in (".jsonl", ".json"):
        return "jsonl"
    if p.suffix == ".parquet":
        return "parquet"
    return "txt"


def _paragraph_pieces(chunks: Iterator[str]) -> Iterator[Piece]:
    """Blank-line separated paragraphs (exactly ``text.split("\\n\\n")``, stripped, non-empty) of
    the text streamed as ``chunks``; a paragraph over ``MAX_PIECE_CHARS`` comes in pieces."""
    buf, cont = "", False
    for chunk in chunks:
        buf += chunk
        parts = buf.split("\n\n")
        buf = parts.pop()
        for part in parts:
            text = part.rstrip() if cont else part.strip()
            if text:
                yield text, cont
            cont = False
        if len(buf) > MAX_PIECE_CHARS:
            # keep a trailing "\n" in the buffer so a "\n\n" split across the cut is still seen
            cut = len(buf) - 1
            head, buf = buf[:cut], buf[cut:]
            head = head if cont else head.lstrip()
            if head:
                yield head, cont
                cont = True
    text = buf.rstrip() if cont else buf.strip()
    if text:
        yield text, cont


def _text_chunks(p: Path) -> Iterator[str]:
    # Plain text is read leniently (undecodable bytes become U+FFFD), as before.
    with p.open(encoding="utf-8", errors="replace", newline=None) as f:
        while chunk := f.read(_READ_CHARS):
            yield chunk


def _jsonl_pieces(p: Path, field: str) -> Iterator[Piece]:
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                                "JSON Lines must be UTF-8: re-encode the file (iconv -t utf-8)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(rec, dict) or field not in rec:
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise DataError(f"{p}:{lineno}: no field {field!r} (found {keys}); pass --text-field NAME")
            if isinstance(rec[field], str) and rec[field].strip():
                yield rec[field].strip(), False


def _load_hf(p: Path):
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{p} is a saved HF dataset; reading it needs `pip install datasets`") from exc
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # datasets raises FileNotFoundError, JSONDecodeError, ArrowInvalid, ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{p} looks like a saved HF dataset but cannot be read ({type(exc).__name__}: {msg}); "
                        "point --data at a directory written by Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


def _hf_pieces(p: Path, field: str) -> Iterator[Piece]:
    ds = _load_hf(p)
    if field not in ds.column_names:
        raise DataError(f"dataset {p} has no column {field!r} (columns: {ds.column_names}); pass --text-field NAME")
    for batch in ds.select_columns([field]).iter(batch_size=1024):  # Arrow memory map, one batch at a time
        for t in batch[field]:
            if isinstance(t, str) and t.strip():
                yield t.strip(), False


def _parquet_pieces(p: Path, field: str) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading {p} needs `pip install pyarrow`") from exc
    try:
        f = pq.ParquetFile(p)
    except Exception as exc:  # pyarrow.lib.ArrowInvalid and friends
        raise DataError(f"{p} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    names = f.schema_arrow.names
    if field not in names:
        raise DataError(f"{p} has no column {field!r} (columns: {names}); pass --text-field NAME")
    for batch in f.iter_batches(batch_size=1024, columns=[field]):
        for t in batch.column(0).to_pylist():
            if isinstance(t, str) and t.strip():
                yield t.strip(), False


def iter_pieces(source: str | os.PathLike, *, text_field: str = "text") -> Iterator[Piece]:
    """Streams the documents of ``source`` as ``(text, continues)`` pieces (see the module doc)."""
    kind = source_kind(source)
    if kind == "demo":
        yield from ((d, False) for d in embedded_documents())
        return
    p = Path(source).expanduser()
    if kind == "hf":
        yield from _hf_pieces(p, text_field)
    elif kind == "dir":
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise DataError(f"directory {p} holds no .txt files and is not a saved HF dataset (save_to_disk)")
        for f in files:
            yield from _paragraph_pieces(_text_chunks(f))
    elif kind == "jsonl":
        yield from _jsonl_pieces(p, text_field)
    elif kind == "parquet":
        yield from _parquet_pieces(p, text_field)
    else:
        yield from _paragraph_pieces(_text_chunks(p))


def iter_documents(source: str | os.PathLike, *, text_field: str = "text") -> Iterator[str]:
    """Whole documents of ``source`` (pieces joined: use ``iter_pieces`` for bounded memory)."""
    doc: list[str] = []
    for text, cont in iter_pieces(source, text_field=text_field):
        if not cont and doc:
            yield "".join(doc)
            doc = []
        doc.append(text)
    if doc:
        yield "".join(doc)


_FP_CACHE: dict[tuple, str] = {}


def _files_of(p: Path, kind: str) -> list[Path]:
    if kind == "dir":
        return sorted(p.rglob("*.txt"))
    if kind == "hf":
        return sorted(f for f in p.rglob("*") if f.is_file())
    return [p]


def corpus_fingerprint(source: str | os.PathLike, *, text_field: str = "text") -> str:
    """A content hash of ``source`` (every byte of every file it reads, their relative names and
    the text field): equal fingerprints mean the same documents. Memoized per process by
    (path, size, mtime), so the corpus is read once per process for hashing."""
    kind = source_kind(source)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{kind}\0{text_field if kind in ('jsonl', 'hf', 'parquet') else ''}\0".encode())
    if kind == "demo":
        for d in embedded_documents():
            h.update(d.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()
    p = Path(source).expanduser().resolve()
    files = _files_of(p, kind)
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (kind, text_field, stats)
    if key in _FP_CACHE:
        return _FP_CACHE[key]
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode() + b"\0")
        try:
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        except OSError as exc:
            raise DataError(f"cannot read {f}: {exc.strerror}; check its permissions") from None
        h.update(b"\0")
    _FP_CACHE[key] = h.hexdigest()
    return _FP_CACHE[key]


__all__ = ["DEMO", "MAX_PIECE_CHARS", "corpus_fingerprint", "embedded_documents", "iter_documents", "iter_pieces",
           "source_kind"]
