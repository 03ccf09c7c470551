"""The train / calib / heldout split rule, over a tokenized corpus's document index.

1. **By document** (the rule for ordinary corpora): a document of at most ``LONG_DOC_BLOCKS``
   blocks goes whole to the split of its hash bucket ``crc32(text) % 100`` (heldout 0-9,
   calib 10-19, train 20-99). Deterministic across runs and machines, and stable when
   documents are added.
2. **Long documents by block**: a document longer than ``LONG_DOC_BLOCKS`` blocks (and than
   ``LONG_DOC_TOKENS``: an ordinary long-context document stays whole) is cut into
   ``seq_len`` pieces, and piece ``j`` goes to ``PATTERN[j % 10]`` (heldout, calib, then eight
   train), so one book cannot put a tenth of the corpus in one split.
3. **Fallback for small corpora**: when rules 1-2 leave any split with less than one block (a
   handful of documents, or one text file without blank lines), the whole token stream is cut
   into blocks and block ``k`` goes to ``PATTERN[k % 10]``: every corpus of at least three
   blocks yields all three splits.

Within a split, spans keep corpus order; ``seq_len`` blocks are cut from their concatenation.
"""
from __future__ import annotations

import numpy as np

from minitron_fast.errors import DataError

SPLITS = ("train", "calib", "heldout")
# Percent of documents per split, by hash bucket in [0, 100).
SPLIT_BUCKETS = {"heldout": (0, 10), "calib": (10, 20), "train": (20, 100)}
LONG_DOC_BLOCKS = 64
LONG_DOC_TOKENS = 16384
SPLIT_CODE = {"heldout": 0, "calib": 1, "train": 2}
PATTERN = np.array([0, 1] + [2] * 8, dtype=np.int8)   # block j % 10 -> split code


def check_split(split: str) -> None:
    if split not in SPLIT_BUCKETS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")


def bucket_codes(buckets: np.ndarray) -> np.ndarray:
    """Split code of each hash bucket."""
    codes = np.full(buckets.shape, SPLIT_CODE["train"], dtype=np.int8)
    for name, (lo, hi) in SPLIT_BUCKETS.items():
        codes[(buckets >= lo) & (buckets < hi)] = SPLIT_CODE[name]
    return codes


def _by_document(starts: np.ndarray, ends: np.ndarray, buckets: np.ndarray, seq_len: int):
    """All pieces under rules 1-2: ``(piece_starts, piece_lengths, piece_codes)`` in corpus order."""
    lens = ends - starts
    long = lens > max(LONG_DOC_BLOCKS * seq_len, LONG_DOC_TOKENS)
    n_pieces = np.where(long, -(-lens // seq_len), 1)
    doc = np.repeat(np.arange(lens.size), n_pieces)
    first = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    j = np.arange(doc.size) - first                       # piece index within its document
    p_start = starts[doc] + j * seq_len * long[doc]
    p_len = np.where(long[doc], np.minimum(seq_len, ends[doc] - p_start), lens[doc])
    codes = np.where(long[doc], PATTERN[j % PATTERN.size], bucket_codes(buckets)[doc])
    return p_start, p_len, codes


def split_spans(starts: np.ndarray, ends: np.ndarray, buckets: np.ndarray, split: str, seq_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` int64 token spans of ``split`` (rules in the module doc)."""
    check_split(split)
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    code = SPLIT_CODE[split]
    p_start, p_len, codes = _by_document(starts, ends, buckets, seq_len)
    totals = np.bincount(codes, weights=p_len, minlength=3)
    if totals.min() >= seq_len:
        keep = codes == code
        return p_start[keep].astype(np.int64), p_len[keep].astype(np.int64)
    n_blocks = int(ends[-1]) // seq_len if ends.size else 0
    k = np.arange(n_blocks, dtype=np.int64)
    keep = PATTERN[k % PATTERN.size] == code
    return k[keep] * seq_len, np.full(int(keep.sum()), seq_len, dtype=np.int64)


__all__ = ["LONG_DOC_BLOCKS", "LONG_DOC_TOKENS", "PATTERN", "SPLITS", "SPLIT_BUCKETS", "check_split", "split_spans"]
