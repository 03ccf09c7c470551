"""Writing the offline teacher's top-k logits: the teacher runs once over the train split.

Blocks are processed in train-block index order and written in shards of ``shard_tokens``
tokens (``minitron_fast.artifacts.teacher_logits`` is the file contract). Each shard is written
atomically; a killed write is resumed by rerunning the same command (complete shards of the
same inputs are kept, the rest recomputed), and the manifest is written last.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from minitron_fast.artifacts import teacher_logits as tl
from minitron_fast.io import atomic_write_json, same_or_inside
from minitron_fast.teacher_logits.config import TeacherLogitsConfig

log_ = logging.getLogger("minitron_fast.teacher_logits")

def teacher_rows(model: torch.nn.Module, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored form of the teacher's rows for blocks ``ids [B, L]``, on the CPU."""
    v, i, t = tl.model_rows(model, ids.to(model.device), k)
    return v.cpu(), i.cpu(), t.cpu()


def _identity(model: str, data: str, text_field: str, cfg: TeacherLogitsConfig, seq_len: int, tok: Any, vocab: int,
              n_split: int, hashes: torch.Tensor) -> dict[str, Any]:
    from minitron_fast.models.loading import resolve_model_path

    return {
        "format": tl.FORMAT, "version": tl.VERSION, "form": tl.FORM,
        "teacher": {"path": str(model), "digest": tl.model_digest(resolve_model_path(model))},
        "tokenizer": {"name": str(getattr(tok, "name_or_path", "")) or str(model), "digest": tl.tokenizer_digest(tok),
                      "size": len(tok)},
        "data": {"source": str(data), "split": "train", "text_field": text_field, "n_blocks_split": n_split,
                 "digest": tl.hashes_digest(hashes)},
        "top_k": cfg.top_k, "seq_len": seq_len, "vocab_size": vocab, "index_bits": tl.index_bits(vocab),
        "n_blocks": int(hashes.shape[0]), "rows_per_block": seq_len - 1, "shard_tokens": cfg.shard_tokens,
        "values_dtype": "bfloat16", "tail_dtype": "float32", "sorted": True,
    }


def _describe(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    for key in ("teacher", "tokenizer", "data", "top_k", "seq_len", "vocab_size", "n_blocks"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}")
    return "; ".join(diffs[:2]) or "format"


def write_teacher_logits(model: str | os.PathLike = "demo", data: str | os.PathLike = "demo", *,
                         out: str | os.PathLike, config: TeacherLogitsConfig | None = None, text_field: str = "text",
                         default_seq_len: int = 256, progress: bool = True,
                         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs the teacher ``model`` over the first ``config.samples`` train blocks of ``data`` (all
    by default) and writes their top-k logits to ``out`` (``config.seq_len`` None means
    ``default_seq_len``). Returns the manifest (plus ``seconds`` of this call and ``status``:
    ``written``, ``resumed`` or ``complete`` when nothing was left to do).

    Example:
        >>> from minitron_fast.teacher_logits import TeacherLogitsConfig, write_teacher_logits
        >>> write_teacher_logits("demo", "demo", out="runs/logits", config=TeacherLogitsConfig(top_k=64, samples=32))
    """
    from tqdm.auto import tqdm

    from minitron_fast.data import TokenBlocks
    from minitron_fast.models.loading import check_seq_len, load_config, load_model, load_tokenizer, resolve_model_path

    log = log or log_.info
    cfg = (config or TeacherLogitsConfig()).validate()
    seq_len = cfg.seq_len or default_seq_len
    t0 = time.perf_counter()
    load_kw = cfg.load_kwargs()  # device: cuda without CUDA fails here, before any model loads
    out = Path(out)
    model_path = resolve_model_path(model)
    for src in [model_path] + ([Path(data)] if str(data) != "demo" and Path(data).exists() else []):
        if same_or_inside(out, src):
            raise tl.TeacherLogitsError(f"refusing to write teacher logits into the input {src}; choose another --out")
    config = load_config(model_path)
    check_seq_len(config, seq_len)
    vocab = int(config.vocab_size)
    if cfg.top_k > vocab:
        raise tl.TeacherLogitsError(f"--top-k {cfg.top_k} exceeds the teacher's vocabulary of {vocab} tokens")
    tok = load_tokenizer(model)
    blocks = TokenBlocks.open(tok, data, "train", seq_len, text_field=text_field,
                              progress=progress).require_one()  # memory-mapped: read a batch at a time
    n_split = len(blocks)
    n = n_split if cfg.samples is None else cfg.samples
    if n > n_split:
        raise tl.TeacherLogitsError(f"--samples {n}: the train split of {data} holds only {n_split} blocks of "
                                    f"{seq_len} tokens; ask for at most {n_split}")
    hashes = tl.block_hashes(blocks, limit=n)
    ident = _identity(str(model), str(data), text_field, cfg, seq_len, tok, vocab, n_split, hashes)
    run_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    ident["run"] = run_id

    manifest_path, run_path = out / tl.MANIFEST, out / tl.RUN
    status = "written"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("run") == run_id:
            log(f"teacher logits in {out} are complete for these inputs; nothing to do")
            return dict(old, status="complete", seconds=time.perf_counter() - t0)
        raise tl.TeacherLogitsError(f"{out} holds teacher logits of other inputs ({_describe(old, ident)}); "
                                    "choose another --out or delete it")
    if run_path.is_file():
        old = json.loads(run_path.read_text())
        if old.get("run") != run_id:
            raise tl.TeacherLogitsError(f"{out} holds an interrupted teacher-logits write of other inputs "
                                        f"({_describe(old, ident)}); choose another --out or delete it")
        status = "resumed"
    elif out.exists() and any(out.iterdir()):
        raise tl.TeacherLogitsError(f"output directory {out} is not empty and holds no teacher-logits write; "
                                    "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_path, ident)

    per_shard = max(1, cfg.shard_tokens // (seq_len - 1))
    plan = [(i, b0, min(b0 + per_shard, n)) for i, b0 in enumerate(range(0, n, per_shard))]
    done = {i for i, b0, b1 in plan
            if (out / tl.shard_name(i)).is_file()
            and tl.shard_is_complete(out / tl.shard_name(i), first_block=b0, n_blocks=b1 - b0, run_id=run_id)}
    if done:
        log(f"resuming: {len(done)} of {len(plan)} shards of {out} are already written")
    todo = [p for p in plan if p[0] not in done]
    teacher = load_model(model, **load_kw) if todo else None
    bar = tqdm(total=n, initial=sum(b1 - b0 for i, b0, b1 in plan if i in done), unit="block",
               desc=f"teacher logits (top {cfg.top_k})", disable=not progress, dynamic_ncols=True)
    t_write = time.perf_counter()
    for i, b0, b1 in todo:
        parts: list[dict[str, torch.Tensor]] = []
        for c0 in range(b0, b1, cfg.batch_size):
            c1 = min(c0 + cfg.batch_size, b1)
            parts.append(tl.encode(*teacher_rows(teacher, blocks[c0:c1], cfg.top_k), vocab))
            bar.update(c1 - c0)
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        tl.write_shard(out / tl.shard_name(i), rows, hashes[b0:b1], first_block=b0, run_id=run_id)
    bar.close()
    write_s = time.perf_counter() - t_write
    shards = []
    for i, b0, b1 in plan:
        p = out / tl.shard_name(i)
        shards.append({"file": p.name, "first_block": b0, "n_blocks": b1 - b0, "bytes": p.stat().st_size,
                       "tensors": sorted(_tensor_names(p))})
    total = sum(s["bytes"] for s in shards)
    manifest = dict(ident, shards=shards, bytes=total, bytes_per_token=total / (n * (seq_len - 1)),
                    write_seconds=write_s, written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tl.write_manifest(out, manifest)
    log(f"wrote teacher logits of {n} blocks ({n * (seq_len - 1):,} tokens, top {cfg.top_k}) to {out}: "
        f"{total / 2**20:.1f} MiB, {manifest['bytes_per_token']:.1f} bytes/token, {write_s:.1f} s")
    del teacher
    return dict(manifest, status=status, seconds=time.perf_counter() - t0)


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def expected_bytes_per_token(top_k: int, vocab_size: int) -> float:
    """Bytes per token of the row tensors alone (the shard headers and block hashes add little)."""
    return tl.bytes_per_row(top_k, vocab_size)


__all__ = ["write_teacher_logits", "teacher_rows", "expected_bytes_per_token"]
