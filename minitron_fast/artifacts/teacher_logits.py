"""The offline teacher-logits file contract: top-k teacher log-probabilities per token, by train block.

A directory written by ``minitron-fast teacher-logits`` (``minitron_fast.teacher_logits``)::

    manifest.json            written last: its presence means the directory is complete
    run.json                 the writer's identity (checked when a killed write resumes)
    shard-00000.safetensors  blocks [0, S), then [S, 2S), ... (each written atomically)

Rows are keyed by **train-block index** (the index of a ``seq_len`` block in the packed train
split, ``minitron_fast.data.token_blocks(..., "train", ...)``), never by the order a trainer reads
them, so any world size, data order or resume reads the right rows. A block of ``L`` tokens has
``L - 1`` rows: row ``t`` is the teacher's distribution of token ``t + 1`` given tokens ``0..t``
(the last position predicts a token outside the block and is not stored).

Tensors of one shard (``nb`` blocks, ``R = L - 1`` rows each, top ``k``):

    values      bf16  [nb, R, k]   log p_teacher of the top-k tokens, sorted descending
    indices     u16   [nb, R, k]   their token ids (the low 16 bits when V > 65,536)
    indices_hi  u8    [nb, R, ceil(k/8)]  only when 65,536 < V <= 131,072: bit 16 of each id,
                                   8 ids per byte (17-bit ids; int32 ``indices`` above 131,072)
    tail        f32   [nb, R]      log of the teacher's probability mass outside the top-k
    block_hash  i64   [nb]         a 64-bit hash of each block's token ids (data check)

The stored form is temperature-free: ``values`` and ``tail`` are the teacher's raw logits minus
their per-row log-sum-exp (a per-row shift, so ``softmax(values / T)`` is the top-k teacher at
any temperature). Together they give the full-softmax normalizer: the teacher's distribution
over the k tokens plus one "tail" bucket is ``softmax([values, tail])``. At k = 64 a token
costs 128 (values) + 128 (indices) + 4 (tail) = 260 bytes (V <= 65,536), 268 bytes with
17-bit ids.

Readers (``TeacherLogits``) check every shard's size against the manifest before use (a
truncated shard is named, never read as zeros) and the run's data, tokenizer, teacher and
``seq_len`` against the manifest (``check_run``), and serve rows with ``safe_open`` slices
(memory-mapped: only the rows asked for are read).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_write_bytes, atomic_write_json

FORMAT = "minitron_fast.teacher_logits"
VERSION = 1
FORM = "log_softmax"  # values and tail: raw logits minus the row's log-sum-exp (temperature-free)
MANIFEST = "manifest.json"
RUN = "run.json"
SEMANTICS = ("renorm", "tail")


class TeacherLogitsError(MinitronError, ValueError):
    """A teacher-logits directory that is incomplete, damaged, or belongs to another run."""


# -- identities -------------------------------------------------------------------------------------

def block_hashes(blocks: Any, *, limit: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """``[n]`` int64: a 64-bit BLAKE2b hash of each block's token ids (as int32) of ``[n, L]`` blocks
    (a tensor or ``minitron_fast.data.TokenBlocks``, read ``chunk`` blocks at a time); only the
    first ``limit`` blocks when given."""
    n = len(blocks) if limit is None else min(len(blocks), limit)
    out: list[int] = []
    for c0 in range(0, n, chunk):
        arr = torch.as_tensor(blocks[c0:min(c0 + chunk, n)]).to(torch.int32).contiguous().numpy()
        out += [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True)
                for row in arr]
    return torch.tensor(out, dtype=torch.int64)


def hashes_digest(hashes: torch.Tensor) -> str:
    """One digest of a sequence of block hashes (the manifest's data hash)."""
    return hashlib.sha256(hashes.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of a tokenizer's vocabulary and special tokens (what fixes the token ids)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items())
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def model_digest(path: str | os.PathLike) -> str:
    """A hash of a checkpoint directory that survives copies: ``config.json``'s text and, per
    weight file, its name, size and SHA-256 of its first and last MiB (no full read of the weights)."""
    p = Path(path)
    h = hashlib.sha256()
    cfg = p / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"")
    for f in sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin"))):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


# -- the row form and its codec -----------------------------------------------------------------------

def index_bits(vocab_size: int) -> int:
    """Bits per stored token id: 16 up to 65,536 tokens, 17 up to 131,072, else 32."""
    return 16 if vocab_size <= 1 << 16 else 17 if vocab_size <= 1 << 17 else 32


def bytes_per_row(k: int, vocab_size: int) -> float:
    """Storage of one token's row (values, ids, tail), bytes."""
    bits = index_bits(vocab_size)
    ids = 2 * k + math.ceil(k / 8) if bits == 17 else (2 if bits == 16 else 4) * k
    return 2 * k + ids + 4


@torch.no_grad()
def topk_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored form of ``[n, V]`` logits (overwritten; fp32 or fp64): ``(values [n, k]`` log-probs
    sorted descending, ``indices [n, k]`` int64, ``tail [n]`` log of the mass outside the top-k).
    ``tail`` is ``-inf`` when ``k == V``. Values are not rounded here (``encode`` rounds to bf16)."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k must lie in [1, {logits.shape[-1]}], got {k}")
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    lse = torch.logsumexp(z, -1, keepdim=True)
    v, i = torch.topk(z, k, dim=-1, sorted=True)
    z.scatter_(1, i, -math.inf)  # the rest, exactly (no 1 - sum p cancellation)
    tail = (torch.logsumexp(z, -1, keepdim=True) - lse).squeeze(-1)
    return v - lse, i, tail


_LOGIT_BYTES = 1 << 28  # fp32 [rows, V] logits per lm_head call: 256 MiB (512 rows at V=128k)


@torch.no_grad()
def model_rows(model: torch.nn.Module, ids: torch.Tensor, k: int, *, gather: Any = None):
    """The stored form (``topk_rows``) of a causal LM's next-token distributions for blocks
    ``ids [B, L]``: ``values [B, L-1, k]``, ``indices [B, L-1, k]``, ``tail [B, L-1]`` (unrounded;
    ``encode`` rounds). The ``[rows, V]`` logits (softcapped as the model does) are made a bounded
    chunk of rows at a time; ``gather(weight, bias)``, when given, is a context manager that
    gathers a partitioned lm_head (ZeRO-3)."""
    import contextlib

    from minitron_fast.models import get_view

    view = get_view(model)
    head, cap = view.lm_head, view.final_logit_softcap
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    B, L, H = hidden.shape
    h = hidden[:, :-1].reshape(-1, H)
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    w, b = head.weight, head.bias
    with gather(w, b) if gather is not None else contextlib.nullcontext():
        rows = head_topk_rows(h, w, b, k, softcap=cap)
    return tuple(r.view(B, L - 1, *((k,) if j < 2 else ())) for j, r in enumerate(rows))


@torch.no_grad()
def head_topk_rows(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, *,
                   softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_rows`` of the logits ``h [n, H] @ weight.T + bias`` (softcapped), made a bounded chunk
    of rows at a time (``_LOGIT_BYTES``), so ``[n, V]`` is never held whole."""
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    chunk = max(1, _LOGIT_BYTES // (4 * weight.shape[0]))
    for c0 in range(0, h.shape[0], chunk):
        z = torch.nn.functional.linear(h[c0:c0 + chunk].to(device=weight.device, dtype=weight.dtype), weight,
                                       bias).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        out.append(topk_rows(z, k))
    if not out:  # no rows
        if not 1 <= k <= weight.shape[0]:
            raise ValueError(f"top_k must lie in [1, {weight.shape[0]}], got {k}")
        return (h.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.int64, device=h.device),
                h.new_zeros(0, dtype=torch.float32))
    return tuple(torch.cat([o[j] for o in out]) for j in range(3))


def truncate_rows(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, k: int):
    """The top-``k`` of sorted top-K rows (``k <= K``), the dropped ranks folded into the tail
    (exact: the same as ``topk_rows`` at ``k`` up to the stored rounding)."""
    K = values.shape[-1]
    if k > K:
        raise ValueError(f"cannot take the top {k} of rows stored with top_k={K}")
    if k == K:
        return values, indices, tail
    dt = torch.promote_types(tail.dtype, torch.float32)
    rest = torch.logsumexp(values[..., k:].to(dt), -1)
    return values[..., :k], indices[..., :k], torch.logaddexp(tail.to(dt), rest)


def _pack_bit16(indices: torch.Tensor) -> torch.Tensor:
    """Bit 16 of each id of ``[..., k]``, 8 per byte -> ``[..., ceil(k/8)]`` uint8."""
    k = indices.shape[-1]
    bits = ((indices >> 16) & 1).to(torch.uint8)
    pad = (-k) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.view(*bits.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=bits.device)).to(torch.uint8)  # on the ids' device
    return (bits * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def _unpack_bit16(packed: torch.Tensor, k: int) -> torch.Tensor:
    bits = (packed.to(torch.int64)[..., None] >> torch.arange(8, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :k] << 16


def encode(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """The stored tensors of rows ``values [..., k]``, ``indices [..., k]``, ``tail [...]``."""
    bits = index_bits(vocab_size)
    idx = indices.to(torch.int64)
    out = {"values": values.to(torch.bfloat16).contiguous(), "tail": tail.to(torch.float32).contiguous()}
    if bits == 32:
        out["indices"] = idx.to(torch.int32).contiguous()
    else:
        out["indices"] = (idx & 0xFFFF).to(torch.int32).to(torch.uint16).contiguous()
        if bits == 17:
            out["indices_hi"] = _pack_bit16(idx).contiguous()
    return out


def decode(tensors: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``encode``'s inverse: ``(values fp32 [..., k], indices int64 [..., k], tail fp32 [...])``."""
    idx = tensors["indices"]
    idx = idx.to(torch.int32).to(torch.int64) & 0xFFFF if idx.dtype == torch.uint16 else idx.to(torch.int64)
    if "indices_hi" in tensors:
        idx = idx | _unpack_bit16(tensors["indices_hi"], k)
    return tensors["values"].float(), idx, tensors["tail"].float()


# -- writing ------------------------------------------------------------------------------------------

def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shard(path: str | os.PathLike, rows: dict[str, torch.Tensor], hashes: torch.Tensor, *, first_block: int,
                run_id: str) -> int:
    """Writes one shard atomically (temporary name, fsync, rename); returns its size in bytes."""
    from safetensors.torch import save

    tensors = dict(rows, block_hash=hashes.to(torch.int64).contiguous())
    meta = {"format": FORMAT, "first_block": str(first_block), "n_blocks": str(int(hashes.shape[0])), "run": run_id}
    data = save(tensors, metadata=meta)
    atomic_write_bytes(path, data)
    return len(data)


def shard_is_complete(path: Path, *, first_block: int, n_blocks: int, run_id: str) -> bool:
    """Whether an existing shard file is whole and belongs to this write (resume)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            m = f.metadata() or {}
    except Exception:  # a damaged file: rewritten
        return False
    return (m.get("run") == run_id and m.get("first_block") == str(first_block)
            and m.get("n_blocks") == str(n_blocks))


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / MANIFEST, manifest)


# -- reading ------------------------------------------------------------------------------------------

@dataclass
class RunIdentity:
    """What a training run knows about itself, checked against a manifest by ``check_run``."""

    seq_len: int
    tokenizer_digest: str
    vocab_size: int
    data_source: str | None = None
    text_field: str | None = None
    teacher_digest: str | None = None   # only when the run also names the teacher


class TeacherLogits:
    """A complete teacher-logits directory, opened for reading.

    Example:
        >>> tl = TeacherLogits("runs/logits")
        >>> tl.check_run(identity, block_hashes(train_blocks))
        >>> values, indices, tail = tl.rows([17, 3], k=64)   # [2, L-1, 64], [2, L-1, 64], [2, L-1]
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        mpath = self.dir / MANIFEST
        if not self.dir.is_dir():
            raise TeacherLogitsError(f"teacher logits directory {self.dir} does not exist; write it with "
                                     "`minitron-fast teacher-logits --out DIR`")
        if not mpath.is_file():
            hint = " (a write was interrupted: rerun the same teacher-logits command to finish it)" \
                if (self.dir / RUN).is_file() else ""
            raise TeacherLogitsError(f"{self.dir} holds no {MANIFEST}: not a complete teacher-logits directory{hint}")
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise TeacherLogitsError(f"{mpath} is not valid JSON ({exc.msg}); rewrite the directory") from exc
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise TeacherLogitsError(f"{mpath} is not a {FORMAT} v{VERSION} manifest (got {m.get('format')} "
                                     f"v{m.get('version')})")
        self.manifest = m
        self.k = int(m["top_k"])
        self.seq_len = int(m["seq_len"])
        self.vocab_size = int(m["vocab_size"])
        self.n_blocks = int(m["n_blocks"])
        self.rows_per_block = self.seq_len - 1
        self._starts: list[int] = []
        self._shards: list[dict[str, Any]] = []
        for s in m["shards"]:
            p = self.dir / s["file"]
            size = p.stat().st_size if p.is_file() else None
            if size is None:
                raise TeacherLogitsError(f"teacher logits shard {p} is missing; rewrite the directory with "
                                         "`minitron-fast teacher-logits`")
            if size != s["bytes"]:
                raise TeacherLogitsError(f"teacher logits shard {p} is truncated or damaged: {size} bytes, the "
                                         f"manifest says {s['bytes']}; delete it and rerun the teacher-logits command")
            self._starts.append(int(s["first_block"]))
            self._shards.append(dict(s, path=p))
        self._open: dict[int, Any] = {}
        self._hashes: torch.Tensor | None = None

    # -- identity checks
    @property
    def tokens(self) -> int:
        return self.n_blocks * self.rows_per_block

    def block_hashes(self) -> torch.Tensor:
        """``[n_blocks]`` stored hashes of the blocks' token ids."""
        if self._hashes is None:
            self._hashes = torch.cat([self._handle(i).get_tensor("block_hash") for i in range(len(self._shards))])
        return self._hashes

    def check_run(self, run: RunIdentity, hashes: torch.Tensor | None = None, *, n_blocks: int | None = None) -> None:
        """Raises TeacherLogitsError (one line naming the mismatch) unless these logits were
        written for ``run``: the same ``seq_len``, tokenizer, vocabulary, data (``hashes``: the
        hashes of the run's first train blocks; ``n_blocks``: how many it reads, at most the
        stored count) and, when given, teacher."""
        m, d = self.manifest, self.dir
        if run.seq_len != self.seq_len:
            raise TeacherLogitsError(f"teacher logits {d} were written at seq_len {self.seq_len} but this run uses "
                                     f"seq_len {run.seq_len}; use data.seq_len={self.seq_len} or rewrite them")
        if run.tokenizer_digest != m["tokenizer"]["digest"]:
            raise TeacherLogitsError(f"teacher logits {d} were written with another tokenizer ({m['tokenizer']['name']},"
                                     f" digest {m['tokenizer']['digest']} != {run.tokenizer_digest}); use the teacher's "
                                     "tokenizer or rewrite them")
        if run.vocab_size < self.vocab_size:
            raise TeacherLogitsError(f"teacher logits {d} cover a {self.vocab_size}-token vocabulary but the student "
                                     f"has {run.vocab_size}; logit KD needs one vocabulary")
        if run.teacher_digest is not None and run.teacher_digest != m["teacher"]["digest"]:
            raise TeacherLogitsError(f"teacher logits {d} were written by another teacher ({m['teacher']['path']}, "
                                     f"digest {m['teacher']['digest']} != {run.teacher_digest}); rewrite them from "
                                     "this run's teacher or drop `teacher:` from the recipe")
        data = m["data"]
        for key, mine in (("source", run.data_source), ("text_field", run.text_field)):
            if mine is not None and str(mine) != str(data[key]):
                raise TeacherLogitsError(f"teacher logits {d} were written on data {key} {data[key]!r} but this run "
                                         f"uses {mine!r}; use the same data or rewrite them")
        if n_blocks is not None:
            self.check_blocks(n_blocks)
        if hashes is not None:
            self.check_blocks(int(hashes.shape[0]))
            stored = self.block_hashes()[: hashes.shape[0]]
            bad = (stored != hashes.to(torch.int64)).nonzero()
            if bad.numel():
                raise TeacherLogitsError(f"teacher logits {d} were written on other data: train block {int(bad[0])} "
                                         f"holds different tokens ({int(bad.numel())} of {hashes.shape[0]} blocks "
                                         f"differ; source {data['source']!r}); rewrite them for this data")

    def check_blocks(self, n: int) -> None:
        if n > self.n_blocks:
            raise TeacherLogitsError(
                f"this run reads {n} train blocks ({n * self.rows_per_block:,} tokens) but teacher logits {self.dir} "
                f"hold {self.n_blocks} blocks ({self.tokens:,} tokens); set data.max_blocks={self.n_blocks} or "
                "rewrite them with more --samples")

    # -- rows
    def _handle(self, i: int):
        from safetensors import safe_open

        h = self._open.get(i)
        if h is None:
            p = self._shards[i]["path"]
            try:
                h = safe_open(str(p), "pt")
            except Exception as exc:
                raise TeacherLogitsError(f"teacher logits shard {p} cannot be read ({exc}); delete it and rerun "
                                         "the teacher-logits command") from exc
            self._open[i] = h
        return h

    def rows(self, blocks: Sequence[int], *, k: int | None = None):
        """The rows of train blocks ``blocks``: ``values [b, L-1, k]`` fp32, ``indices [b, L-1, k]``
        int64, ``tail [b, L-1]`` fp32 (``k`` <= the stored top_k; fewer folds the rest into the tail)."""
        vals, idxs, tails = [], [], []
        for b in blocks:
            b = int(b)
            if not 0 <= b < self.n_blocks:
                raise TeacherLogitsError(f"train block {b} is not stored: teacher logits {self.dir} hold blocks "
                                         f"0..{self.n_blocks - 1} ({self.tokens:,} tokens)")
            i = bisect.bisect_right(self._starts, b) - 1
            j = b - self._starts[i]
            h = self._handle(i)
            t = {name: h.get_slice(name)[j:j + 1] for name in ("values", "indices", "indices_hi", "tail")
                 if name in self._shards[i]["tensors"]}
            v, ix, tl = decode(t, self.k)
            vals.append(v)
            idxs.append(ix)
            tails.append(tl)
        v, ix, tl = torch.cat(vals), torch.cat(idxs), torch.cat(tails)
        if k is not None:
            v, ix, tl = truncate_rows(v, ix, tl, k)
        return v, ix, tl


__all__ = ["FORMAT", "VERSION", "FORM", "SEMANTICS", "TeacherLogitsError", "TeacherLogits", "RunIdentity",
           "block_hashes", "hashes_digest", "tokenizer_digest", "model_digest", "index_bits", "bytes_per_row",
           "topk_rows", "model_rows", "truncate_rows", "encode", "decode", "shard_name", "write_shard", "shard_is_complete",
           "write_manifest", "head_topk_rows"]
