"""Packed token shards on disk: tokenize a corpus once, in bounded memory, and read it through
``numpy.memmap``.

Layout of one corpus's shard directory (``<cache>/tokens/<corpus hash>/``)::

    tokens.bin     every document's token ids, each followed by the EOS id, back to back
                   (uint16 when the vocabulary fits, else uint32)
    doc_ends.bin   int64 end offset (in tokens) of each document
    buckets.bin    uint8 split bucket of each document: crc32(text) % 100
    meta.json      tokenizer fingerprint, dtype and sizes; written last

The directory is built under ``<corpus hash>.partial/`` and renamed when complete, so a
directory under the final name is always whole. The build records its progress after every
batch (``progress.json``: documents read, tokens and documents written); a build killed midway
resumes from there (the files are cut back to the recorded sizes first). A file lock
(``<corpus hash>.lock``) makes concurrent builders (the ranks of one job, two jobs) wait for one.

Shards are keyed by the corpus's content hash; ``meta.json`` records which tokenizer made them.
A directory made by another tokenizer is rebuilt, with a message.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from minitron_fast.data.sources import corpus_fingerprint, iter_pieces
from minitron_fast.errors import DataError
from minitron_fast.io import atomic_write_json, cache_dir

log = logging.getLogger("minitron_fast.data")

FORMAT = 1
BATCH_CHARS = 1 << 21      # characters tokenized per batch (bounds the build's memory)


def token_cache_root(cache: str | os.PathLike | None = None) -> Path:
    """Where token shards live: ``cache``, else $MINITRON_FAST_TOKEN_CACHE, else
    ``<minitron_fast cache>/tokens``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("MINITRON_FAST_TOKEN_CACHE")
    return Path(env).expanduser() if env else cache_dir() / "tokens"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: the fast tokenizer's full JSON (vocabulary, merges,
    normalizer, pre-tokenizer), else its vocabulary, plus the EOS id."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{type(tokenizer).__qualname__}\0{getattr(tokenizer, 'eos_token_id', None)}\0".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    elif hasattr(tokenizer, "fingerprint"):
        h.update(str(tokenizer.fingerprint).encode())
    return h.hexdigest()


def _token_dtype(tokenizer: Any) -> np.dtype:
    try:
        n = len(tokenizer)
    except TypeError:
        n = 1 << 32
    return np.dtype(np.uint16) if n <= 1 << 16 else np.dtype(np.uint32)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _batches(pieces: Iterator[tuple[str, bool]], skip: int) -> Iterator[list[tuple[str, bool]]]:
    batch: list[tuple[str, bool]] = []
    chars = 0
    for i, piece in enumerate(pieces):
        if i < skip:
            continue
        batch.append(piece)
        chars += len(piece[0])
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _truncate(path: Path, nbytes: int) -> None:
    with open(path, "ab") as f:
        f.truncate(nbytes)


def build_shards(tokenizer: Any, source: str | os.PathLike, target: Path, *, text_field: str = "text",
                 progress: bool = True) -> None:
    """Tokenizes ``source`` into the shard directory ``target`` (see the module doc); resumes a
    ``target.partial`` left by a killed build of the same corpus and tokenizer."""
    from tqdm.auto import tqdm

    tok_fp = tokenizer_fingerprint(tokenizer)
    dtype = _token_dtype(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    part = target.with_name(target.name + ".partial")
    prog_path = part / "progress.json"
    state = {"pieces": 0, "tokens": 0, "docs": 0, "crc": 0, "open_doc": False}
    if prog_path.is_file():
        try:
            old = json.loads(prog_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("tokenizer") == tok_fp and old.get("format") == FORMAT and old.get("dtype") == dtype.name:
            state.update({k: old[k] for k in state})
            log.info("resuming the tokenization of %s at document piece %d (%d tokens)", source, state["pieces"],
                     state["tokens"])
        else:
            shutil.rmtree(part)
    elif part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    files = {k: part / f"{k}.bin" for k in ("tokens", "doc_ends", "buckets")}
    sizes = {"tokens": state["tokens"] * dtype.itemsize, "doc_ends": state["docs"] * 8, "buckets": state["docs"]}
    for k, f in files.items():  # cut back to the last recorded batch (a kill may have written more)
        _truncate(f, sizes[k])

    bar = tqdm(desc=f"tokenizing {source}", unit=" tok", unit_scale=True, initial=state["tokens"],
               disable=not progress, dynamic_ncols=True)
    with bar, open(files["tokens"], "ab") as ft, open(files["doc_ends"], "ab") as fe, open(files["buckets"], "ab") as fb:
        for batch in _batches(iter_pieces(source, text_field=text_field), state["pieces"]):
            ids_list = tokenizer([t for t, _ in batch], add_special_tokens=False)["input_ids"]
            ends, buckets, chunks = [], [], []
            n, crc, open_doc = state["tokens"], state["crc"], state["open_doc"]
            for (text, cont), ids in zip(batch, ids_list):
                if open_doc and not cont:  # the previous document ends here
                    if eos is not None:
                        chunks.append(np.array([eos], dtype=dtype))
                        n += 1
                    ends.append(n)
                    buckets.append(crc % 100)
                    crc = 0
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and int(arr.max()) > np.iinfo(dtype).max:
                    raise DataError(f"token id {int(arr.max())} does not fit {dtype.name}; the tokenizer reports "
                                    f"{len(tokenizer)} tokens")
                chunks.append(arr.astype(dtype))
                n += arr.size
                crc = zlib.crc32(text.encode("utf-8"), crc)
                open_doc = True
            if chunks:
                ft.write(np.concatenate(chunks).tobytes())
            fe.write(np.asarray(ends, dtype=np.int64).tobytes())
            fb.write(np.asarray(buckets, dtype=np.uint8).tobytes())
            for f in (ft, fe, fb):
                f.flush()
                os.fsync(f.fileno())
            bar.update(n - state["tokens"])
            state.update(pieces=state["pieces"] + len(batch), tokens=n, docs=state["docs"] + len(ends), crc=crc,
                         open_doc=open_doc)
            atomic_write_json(prog_path, dict(state, tokenizer=tok_fp, format=FORMAT, dtype=dtype.name))
        if state["open_doc"]:  # the last document
            n = state["tokens"]
            if eos is not None:
                ft.write(np.array([eos], dtype=dtype).tobytes())
                n += 1
            fe.write(np.asarray([n], dtype=np.int64).tobytes())
            fb.write(np.asarray([state["crc"] % 100], dtype=np.uint8).tobytes())
            state.update(tokens=n, docs=state["docs"] + 1, open_doc=False)
            for f in (ft, fe, fb):
                f.flush()
                os.fsync(f.fileno())
    if state["docs"] == 0:
        shutil.rmtree(part)
        raise DataError(f"data source {source} is empty (no non-blank text found); point --data at a file with text")
    meta = {"format": FORMAT, "tokenizer": tok_fp, "tokenizer_name": str(getattr(tokenizer, "name_or_path", "")),
            "dtype": dtype.name, "eos": eos, "n_tokens": state["tokens"], "n_docs": state["docs"], "source": str(source)}
    atomic_write_json(part / "meta.json", meta)
    prog_path.unlink()
    if target.exists():
        shutil.rmtree(target)
    os.replace(part, target)


class TokenCorpus:
    """A tokenized corpus read through ``numpy.memmap`` (nothing is loaded until indexed)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.n_tokens = int(self.meta["n_tokens"])
        self.tokens = (np.memmap(self.path / "tokens.bin", dtype=self.dtype, mode="r", shape=(self.n_tokens,))
                       if self.n_tokens else np.zeros(0, dtype=self.dtype))
        self.doc_ends = np.fromfile(self.path / "doc_ends.bin", dtype=np.int64)
        self.buckets = np.fromfile(self.path / "buckets.bin", dtype=np.uint8)
        if self.doc_ends.size != self.meta["n_docs"] or self.buckets.size != self.meta["n_docs"] or \
                (self.doc_ends.size and self.doc_ends[-1] != self.n_tokens):
            raise DataError(f"token shards in {self.path} are inconsistent with their meta.json; delete the directory "
                            "to rebuild it")
        self._spans: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def doc_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.doc_ends[:-1]]).astype(np.int64)

    def spans(self, split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, lengths)`` of the token spans of ``split``, in corpus order (see
        ``minitron_fast.data.splits``)."""
        from minitron_fast.data.splits import split_spans

        key = (split, seq_len)
        if key not in self._spans:
            self._spans[key] = split_spans(self.doc_starts, self.doc_ends, self.buckets, split, seq_len)
        return self._spans[key]


def open_corpus(tokenizer: Any, source: str | os.PathLike, *, text_field: str = "text",
                cache: str | os.PathLike | None = None, progress: bool = True) -> TokenCorpus:
    """The token shards of ``source`` under ``tokenizer``: built (or resumed) on first use, then
    read from the cache. Safe to call from every rank at once (one builds, the others wait)."""
    fp = corpus_fingerprint(source, text_field=text_field)
    root = token_cache_root(cache)
    target = root / fp
    tok_fp = tokenizer_fingerprint(tokenizer)

    def ready(warn: bool) -> bool:
        meta = target / "meta.json"
        if not meta.is_file():
            return False
        try:
            m = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            m = {}
        if m.get("tokenizer") == tok_fp and m.get("format") == FORMAT:
            return True
        if warn:
            log.warning("token shards in %s were made by another tokenizer (%s) or format; rebuilding them for %s",
                        target, m.get("tokenizer_name") or m.get("tokenizer"),
                        getattr(tokenizer, "name_or_path", "") or tok_fp)
        return False

    if not ready(False):
        with _locked(root / f"{fp}.lock"):
            if not ready(True):
                build_shards(tokenizer, source, target, text_field=text_field, progress=progress)
    return TokenCorpus(target)


__all__ = ["BATCH_CHARS", "FORMAT", "TokenCorpus", "build_shards", "open_corpus", "token_cache_root",
           "tokenizer_fingerprint"]
