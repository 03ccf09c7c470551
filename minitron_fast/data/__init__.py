"""Text sources, deterministic splits and packed token blocks, streamed through token shards.

Sources: ``"demo"`` (the standard library's ``pydoc_data.topics``: ~465k characters of English
shipped with every Python), a plain ``.txt`` file (documents are blank-line separated
paragraphs), a ``.jsonl`` file with a text field, a ``.parquet`` file, a directory of ``.txt``
files, or a HF ``datasets`` dataset saved with ``save_to_disk``.

Every source goes the same way: ``shards.open_corpus`` tokenizes it once, streaming, into
memory-mapped token shards cached by the hash of the corpus and the tokenizer; the split rule
(``splits``: by document hash, long documents and small corpora by block) picks each split's
spans; ``TokenBlocks`` reads ``[seq_len]`` blocks of one split by index, touching only those
blocks' pages. ``token_blocks`` materializes a split (calibration, held-out evaluation);
training indexes a ``TokenBlocks`` directly.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from minitron_fast.data.shards import TokenCorpus, open_corpus, token_cache_root, tokenizer_fingerprint
from minitron_fast.data.sources import DEMO, corpus_fingerprint, embedded_documents, iter_documents, iter_pieces
from minitron_fast.data.splits import SPLIT_BUCKETS, SPLITS, check_split
from minitron_fast.errors import DataError


class TokenBlocks:
    """Block-indexed random access to one split: ``len(ds)`` blocks, ``ds[i]`` is block ``i``
    (``[seq_len]`` int64), ``ds[idx]`` for an index tensor/array is ``[len(idx), seq_len]``.
    Block ``i`` is tokens ``[i * seq_len, (i + 1) * seq_len)`` of the split's token stream, so
    its index is a stable key (stored teacher logits are keyed by it).

    Example:
        >>> ds = TokenBlocks.open(tok, "demo", "train", 256)
        >>> len(ds), ds[0].shape
        (349, torch.Size([256]))
    """

    def __init__(self, corpus: TokenCorpus, split: str, seq_len: int, *, max_blocks: int | None = None,
                 source: str | os.PathLike | None = None):
        check_split(split)
        self.corpus, self.split, self.seq_len = corpus, split, seq_len
        self.source = source if source is not None else corpus.meta.get("source")
        self._starts, self._lens = corpus.spans(split, seq_len)
        self._cum = np.cumsum(self._lens)
        total = int(self._cum[-1]) if self._cum.size else 0
        n = total // seq_len
        self.n = n if max_blocks is None else min(n, max_blocks)

    @classmethod
    def open(cls, tokenizer: Any, source: str | os.PathLike, split: str, seq_len: int, *,
             max_blocks: int | None = None, text_field: str = "text", cache: str | os.PathLike | None = None,
             progress: bool = True) -> "TokenBlocks":
        """The blocks of ``split`` of ``source`` (tokenized into the shard cache on first use)."""
        check_split(split)
        if seq_len < 2:
            raise DataError(f"seq_len must be at least 2, got {seq_len}")
        corpus = open_corpus(tokenizer, source, text_field=text_field, cache=cache, progress=progress)
        return cls(corpus, split, seq_len, max_blocks=max_blocks, source=source)

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.seq_len)

    def _gather(self, pos: np.ndarray) -> torch.Tensor:
        """Tokens at split-stream positions ``pos`` (int64 array) as an int64 tensor."""
        span = np.searchsorted(self._cum, pos, side="right")
        src = self._starts[span] + (pos - (self._cum[span] - self._lens[span]))
        return torch.from_numpy(self.corpus.tokens[src].astype(np.int64))

    def __getitem__(self, idx) -> torch.Tensor:
        T = self.seq_len
        if isinstance(idx, slice):
            idx = np.arange(self.n)[idx]
        if isinstance(idx, (int, np.integer)) or (torch.is_tensor(idx) and idx.dim() == 0):
            i = int(idx)
            if not -self.n <= i < self.n:
                raise IndexError(f"block {i} out of range for {self.n} blocks")
            i %= self.n
            return self._gather(np.arange(i * T, (i + 1) * T, dtype=np.int64))
        idx = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"block index out of range for {self.n} blocks")
        pos = (idx[:, None] * T + np.arange(T, dtype=np.int64)[None, :]).reshape(-1)
        return self._gather(pos).view(idx.size, T)

    def tensor(self) -> torch.Tensor:
        """All (``max_blocks``-capped) blocks as one ``[n, seq_len]`` int64 tensor."""
        return self._gather(np.arange(self.n * self.seq_len, dtype=np.int64)).view(self.n, self.seq_len)

    def require_one(self) -> "TokenBlocks":
        if self.n == 0:
            total = self.corpus.n_tokens
            raise DataError(f"the {self.split!r} split of {self.source} holds fewer than {self.seq_len} tokens (the "
                            f"corpus holds {total}; each of the 3 splits needs a block, so at least "
                            f"{3 * self.seq_len}); use more data or a smaller --seq-len")
        return self


def token_blocks(tokenizer: Any, source: str | os.PathLike, split: str, seq_len: int, *,
                 max_blocks: int | None = None, text_field: str = "text",
                 cache: str | os.PathLike | None = None) -> torch.Tensor:
    """``[n, seq_len]`` packed token blocks of one split of ``source``. Raises DataError naming
    the split and the sizes when the split holds less than one block."""
    return TokenBlocks.open(tokenizer, source, split, seq_len, max_blocks=max_blocks, text_field=text_field,
                            cache=cache).require_one().tensor()


# -- in-memory helpers (small inputs, tests) -------------------------------------------------------

def _bucket(doc: str) -> int:
    import zlib

    return zlib.crc32(doc.encode("utf-8")) % 100


def split_documents(docs: Iterable[str], split: str) -> list[str]:
    """The documents of ``docs`` whose hash bucket falls in ``split`` (rule 1 of ``splits``)."""
    check_split(split)
    lo, hi = SPLIT_BUCKETS[split]
    return [d for d in docs if lo <= _bucket(d) < hi]


def load_documents(source: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """All documents of ``source`` (see the module docstring), non-empty, in file order."""
    docs = list(iter_documents(source, text_field=text_field))
    if not docs:
        raise DataError(f"data source {source} is empty (no non-blank text found); point --data at a file with text")
    return docs


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


__all__ = ["DEMO", "SPLITS", "TokenBlocks", "TokenCorpus", "corpus_fingerprint", "embedded_documents",
           "iter_documents", "iter_pieces", "load_documents", "open_corpus", "pack", "split_documents",
           "token_blocks", "token_cache_root", "tokenize_documents", "tokenizer_fingerprint"]
