"""``python -m bench scale [--json FILE] [--quick]``: the scale rehearsal on this CPU (issue 17).

**Data rows** (``impl`` ``data_stream``, ``case`` ``small`` / ``large``): a corpus of
``--large-mb`` MB (default 200) of text, generated deterministically by shuffling and repeating
the paragraphs of ``pydoc_data.topics``, and one a tenth of that size, each tokenized by
``minitron_fast.data.open_corpus`` with the real SmolLM2 tokenizer (49,152 tokens) into memory-
mapped token shards, in a fresh process. ``peak_mb`` is that process's peak RSS,
``tokens_per_s`` the tokens written per second, ``x_small_peak`` the large case's peak over the
small one's (the goal: at most 1.1, peak memory independent of corpus size). Correctness: the
shards' token count equals the sum over documents, and a sample of blocks decodes back to the
corpus text.

**Teacher rows**: a random Llama-3-shaped teacher (default hidden 2048, FFN 8192, 16 layers,
32/8 heads: 1.2 B parameters with SmolLM2's 49,152 vocabulary) and a student of half its
depth and width, written as sharded safetensors (``--shard-mb`` per file). The real trainer
(``minitron_fast.distill.train``) runs ``--steps`` distillation steps:

- ``zero3_rank`` (``case`` ``rank0`` / ``rank1``): 2 CPU ranks under DeepSpeed's launcher, ZeRO-3,
  teacher and student built partitioned (``deepspeed.zero.Init`` through transformers), teacher
  ZeRO-3 inference, activation checkpointing on;
- ``single``: one process, ZeRO-0, the same models and global batch.

Both train in ``--dtype`` (default bf16, as the GPU recipes do; fp32 ZeRO additionally keeps an
fp32 clone of each rank's partition). The ZeRO-3 run sets ``deepspeed.max_live_parameters``
(``--max-live``, default 0: each module re-gathered when used, instead of DeepSpeed's default of
keeping up to 1e9 gathered elements, i.e. this whole student, from forward to backward).

``peak_mb`` is each process's peak RSS, ``tokens_per_s`` the job's training throughput (median
step after the first), ``x_single_peak`` a rank's peak over the single process's (goal <= 0.6).
``load_peak_mb`` / ``load_anon_mb``: the peak RSS while the models load (``Trainer._load``) and
the peak of its anonymous part (``RssAnon``: allocated memory, without the mapped pages of the
checkpoint's safetensors files, which transformers' ZeRO-3 loader maps on global rank 0 and the
kernel can reclaim); ``train_peak_mb`` the peak RSS after loading (sampled every 10 ms).
Correctness: both runs' first-step losses agree (rtol 1e-3).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from minitron_fast.io import peak_rss_mb

HELP = "scale rehearsal: streaming tokenization (small/large corpus) and a ZeRO-3-partitioned teacher on 2 CPU ranks vs 1 process"

SIZES = {  # teacher shapes (student: half the layers, 3/4 hidden, half FFN)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "300m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--large-mb", type=float, default=200.0, help="size of the large corpus, MB (small: a tenth)")
    p.add_argument("--teacher-size", choices=sorted(SIZES), default="1b", help="teacher shape (default 1b)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default: SmolLM2's tokenizer, 49,152)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per block in the teacher rows")
    p.add_argument("--steps", type=int, default=3, help="distillation steps per run (the first is warm-up)")
    p.add_argument("--shard-mb", type=int, default=200, help="safetensors shard size of the models, MB")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="training dtype of the teacher rows (default bf16, the GPU recipes' dtype)")
    p.add_argument("--max-live", type=int, default=0,
                   help="ZeRO-3 run's deepspeed.max_live_parameters (default 0: re-gather each module; -1: DeepSpeed's 1e9)")
    p.add_argument("--parts", default="data,teacher", help="data, teacher or both (comma-separated)")
    p.add_argument("--workdir", type=Path, default=None, help="where corpora, models and runs go (default: a temp dir)")


# -- data rows ------------------------------------------------------------------------------------

def make_corpus(path: Path, mb: float, seed: int = 0) -> Path:
    """``mb`` MB of text: the pydoc paragraphs shuffled (seeded) and repeated, blank-line separated."""
    from minitron_fast.data import embedded_documents

    if path.is_file() and path.stat().st_size >= mb * 1e6:
        return path
    paras = [p.strip() for d in embedded_documents() for p in d.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target = int(mb * 1e6)
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(paras)
            for i, p in enumerate(paras):
                s = f"{p} [{rng.randrange(10**6)}]\n\n"   # a tag per copy: no two documents are identical
                f.write(s)
                written += len(s.encode("utf-8"))
                if written >= target:
                    break
    os.replace(tmp, path)
    return path


def tokenize_case(corpus: str, cache: str, tokenizer: str = "demo") -> dict[str, Any]:
    """Runs in a fresh process: tokenizes ``corpus`` into shards under ``cache``; peak RSS, rate."""
    import numpy as np

    from minitron_fast.data import TokenBlocks, open_corpus
    from minitron_fast.models.loading import load_tokenizer

    tok = load_tokenizer(tokenizer)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    corpus_obj = open_corpus(tok, corpus, cache=cache, progress=False)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    n = corpus_obj.n_tokens
    # checks: documents tile the token file; a block decodes to text of the corpus
    ok = bool(corpus_obj.doc_ends[-1] == n and np.all(np.diff(corpus_obj.doc_ends) > 0))
    ds = TokenBlocks(corpus_obj, "train", 64)
    text = tok.decode(ds[len(ds) // 2].tolist()).split(tok.eos_token or "\0")[0].strip()[:40]
    with open(corpus, encoding="utf-8") as f:
        head = f.read(2_000_000)
    ok = ok and len(ds) > 0 and (text in head or len(text) < 10 or _in_file(corpus, text))
    return {"ok": ok, "n_tokens": n, "seconds": dt, "peak_mb": peak, "base_mb": base, "tokens_per_s": n / dt,
            "mb": os.path.getsize(corpus) / 1e6}


def _in_file(path: str, needle: str) -> bool:
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(1 << 24):
            if needle in chunk:
                return True
    return False


def data_rows(work: Path, large_mb: float) -> list[dict[str, Any]]:
    from bench.common import run_in_subprocess

    rows: list[dict[str, Any]] = []
    peaks = {}
    for case, mb in (("small", large_mb / 10), ("large", large_mb)):
        corpus = make_corpus(work / f"corpus_{case}.txt", mb)
        cache = work / f"tokens_{case}"
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        r = run_in_subprocess("bench.scale:tokenize_case", {"corpus": str(corpus), "cache": str(cache)}, timeout=3600)
        print(f"  data_stream {case} ({mb:.0f} MB): " + (f"{r['n_tokens']:,} tokens in {r['seconds']:.1f}s, peak "
              f"{r['peak_mb']:.0f} MB" if r.get("ok") else f"FAILED {str(r.get('error'))[-300:]}"), flush=True)
        row = {"case": case, "impl": "data_stream", "ok": bool(r.get("ok"))}
        if r.get("ok"):
            peaks[case] = r["peak_mb"]
            row.update(median_s=r["seconds"], peak_mb=r["peak_mb"], tokens_per_s=r["tokens_per_s"],
                       n_tokens=r["n_tokens"], corpus_mb=r["mb"], base_mb=r["base_mb"])
        else:
            row["error"] = str(r.get("error"))[-500:]
        rows.append(row)
    if "small" in peaks and "large" in peaks:
        rows[-1]["x_small_peak"] = peaks["large"] / peaks["small"]
    return rows


# -- teacher rows ---------------------------------------------------------------------------------

def build_models(work: Path, size: str, vocab: int | None, shard_mb: int,
                 dtype: str = "fp32") -> tuple[Path, Path, int]:
    """A random teacher of ``SIZES[size]`` and a smaller student, as sharded safetensors in
    ``dtype`` (bf16: as published checkpoints are) with SmolLM2's tokenizer files (so the real
    tokenizer reads the data). Returns paths and the teacher's parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron_fast.models.embedded import embedded_model_path
    from minitron_fast.models.export import copy_tokenizer_files

    shape = dict(SIZES[size])
    tok_dir = embedded_model_path()
    vocab = vocab or 49152
    s_shape = dict(shape, hidden_size=shape["hidden_size"] * 3 // 4, intermediate_size=shape["intermediate_size"] // 2,
                   num_hidden_layers=max(1, shape["num_hidden_layers"] // 2))
    s_shape["num_attention_heads"] = shape["num_attention_heads"] * 3 // 4
    s_shape["num_key_value_heads"] = max(1, shape["num_key_value_heads"] * 3 // 4)
    out = {}
    n_teacher = 0
    for name, sh in (("teacher", shape), ("student", s_shape)):
        d = work / (f"{name}_{size}_{vocab}" + ("" if dtype == "fp32" else f"_{dtype}"))
        out[name] = d
        cfg = LlamaConfig(**sh, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                          head_dim=shape["hidden_size"] // shape["num_attention_heads"])
        if name == "teacher":
            with torch.device("meta"):
                n_teacher = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        if (d / "config.json").is_file():
            continue
        torch.manual_seed(0 if name == "teacher" else 1)
        m = LlamaForCausalLM(cfg)
        if dtype == "bf16":
            m.to(torch.bfloat16)
        m.save_pretrained(d, max_shard_size=f"{shard_mb}MB")
        del m
        copy_tokenizer_files(tok_dir, d)
    return out["teacher"], out["student"], n_teacher


PHASE_KEYS = ("load_peak_mb", "load_anon_mb", "train_peak_mb")


class RssPhases:
    """Samples this process's ``/proc/self/status`` every ``interval`` s in a thread: the peak
    resident size and the peak of its anonymous part (``RssAnon``: what the process allocated,
    unlike ``RssFile``, mapped file pages such as memory-mapped checkpoint shards, which the
    kernel can drop) while loading (inside ``Trainer._load``) and after. Linux only."""

    def __init__(self, interval: float = 0.01):
        import threading

        from minitron_fast.distill import trainer

        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        load = trainer.Trainer._load

        def wrapped(tr, *a, **k):
            self.phase = "load"
            try:
                return load(tr, *a, **k)
            finally:
                self._sample()
                self.phase = "train"

        trainer.Trainer._load = wrapped
        self.interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def _sample(self) -> None:
        vals = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    vals[line.split(":")[0]] = int(line.split()[1]) / 1024
        peak = self.peaks.setdefault(self.phase, {})
        for k, v in vals.items():
            peak[k] = max(peak.get(k, 0.0), v)

    def _run(self) -> None:
        while True:
            self._sample()
            time.sleep(self.interval)

    def summary(self) -> dict[str, float | None]:
        self._sample()
        ld, tr = self.peaks.get("load", {}), self.peaks.get("train", {})
        return {"load_peak_mb": ld.get("VmRSS"), "load_anon_mb": ld.get("RssAnon"), "train_peak_mb": tr.get("VmRSS")}


WORKER = textwrap.dedent("""
    import json, os, sys
    from bench.scale import RssPhases
    from minitron_fast.distill import load_config, train
    from minitron_fast.distill.trainer import read_metrics
    from minitron_fast.io import peak_rss_mb
    phases = RssPhases()
    overrides = json.load(open(sys.argv[-1]))
    res = train(load_config(None, overrides), progress=False)
    out = [o.split("=", 1)[1] for o in overrides if o.startswith("out=")][0]
    rank = int(os.environ.get("RANK", "0"))
    line = {"rank": rank, "peak_mb": peak_rss_mb(), "result": res, **phases.summary()}
    if rank == 0:
        line["metrics"] = read_metrics(os.path.join(out, "metrics.jsonl"))
    with open(sys.argv[-1] + f".rank{rank}.result", "w") as f:  # (ranks' stdout lines can interleave)
        json.dump(line, f)
    from minitron_fast.distill.engine import exit_process
    exit_process(0)  # the result is written; skip the teardown that can abort a gloo rank
""")


def _overrides(teacher: Path, student: Path, out: Path, *, seq_len: int, steps: int, zero3: bool,
               micro_batch: int, grad_accum: int, threads: int, bf16: bool = True,
               max_live: int | None = 0) -> list[str]:
    o = {"teacher": teacher, "student": student, "out": out, "steps": steps, "micro_batch_size": micro_batch,
         "grad_accum": grad_accum, "data.seq_len": seq_len, "data.max_blocks": 256, "data.eval_blocks": 0,
         "eval_every": 10**6, "save_every": 10**6, "export": False, "warmup_steps": 0, "schedule": "constant",
         "lr": 1e-4, "threads": threads, "loss.chunk_size": 64, "ds.bf16": bf16}
    if zero3:
        o.update({"ds.zero_stage": 3, "ds.teacher_zero3": True, "ds.persistence_threshold": 0,
                  "activation_checkpointing": True})
        if max_live is not None:
            o["ds.max_live_parameters"] = max_live
    else:
        o.update({"ds.zero_stage": 0})
    return [f"{k}={v}" for k, v in o.items()]


def _launch(cmd: list[str], cwd: Path, timeout: float) -> tuple[list[dict[str, Any]], str]:
    """Runs a worker job (its last argument is the overrides file); returns each rank's result."""
    for old in Path(cmd[-1]).parent.glob(Path(cmd[-1]).name + ".rank*.result"):
        old.unlink()
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout}s"
    lines = [json.loads(p.read_text()) for p in sorted(Path(cmd[-1]).parent.glob(Path(cmd[-1]).name + ".rank*.result"))]
    return lines, "" if proc.returncode == 0 else (proc.stderr or proc.stdout)[-1500:]


def _throughput(metrics: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    recs = [r for r in metrics if "loss" in r]
    tps = [r["tokens_per_s"] for r in recs[1:]] or [r["tokens_per_s"] for r in recs]
    return (statistics.median(tps) if tps else None), (recs[0]["loss"] if recs else None)


def teacher_rows(work: Path, *, size: str, vocab: int | None, seq_len: int, steps: int, shard_mb: int,
                 bf16: bool = True, max_live: int | None = 0, timeout: float = 3600) -> list[dict[str, Any]]:
    from minitron_fast.distill.launch import free_port

    teacher, student, n_teacher = build_models(work, size, vocab, shard_mb, "bf16" if bf16 else "fp32")
    print(f"  teacher {size}: {n_teacher / 1e9:.2f} B parameters ({teacher})", flush=True)
    (work / "worker.py").write_text(WORKER)
    rows: list[dict[str, Any]] = []
    case = f"{size}[{n_teacher / 1e6:.0f}M]"
    z3 = _overrides(teacher, student, work / f"run_z3_{size}", seq_len=seq_len, steps=steps, zero3=True, micro_batch=1,
                    grad_accum=1, threads=1, bf16=bf16, max_live=max_live)
    single = _overrides(teacher, student, work / f"run_single_{size}", seq_len=seq_len, steps=steps, zero3=False,
                        micro_batch=1, grad_accum=2, threads=2, bf16=bf16)
    setup = {"model": case, "dtype": "bf16" if bf16 else "fp32"}
    for o in (z3, single):
        import shutil

        shutil.rmtree([x.split("=", 1)[1] for x in o if x.startswith("out=")][0], ignore_errors=True)
    (work / "z3.json").write_text(json.dumps(z3))  # (DeepSpeed's launcher re-quotes arguments: pass a file)
    (work / "single.json").write_text(json.dumps(single))
    z3_lines, z3_err = _launch([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                                str(free_port()), str(work / "worker.py"), str(work / "z3.json")], work, timeout)
    s_lines, s_err = _launch([sys.executable, str(work / "worker.py"), str(work / "single.json")], work, timeout)
    s_tps, s_loss = _throughput(s_lines[0]["metrics"]) if s_lines else (None, None)
    z_metrics = next((x["metrics"] for x in z3_lines if x["rank"] == 0), [])
    z_tps, z_loss = _throughput(z_metrics)
    agree = s_loss is not None and z_loss is not None and abs(s_loss - z_loss) <= 1e-3 * max(1.0, abs(s_loss))
    s_peak = s_lines[0]["peak_mb"] if s_lines else None
    for line in sorted(z3_lines, key=lambda x: x["rank"]):
        rows.append({"case": f"rank{line['rank']}", "impl": "zero3_rank", "ok": bool(agree and not z3_err),
                     "peak_mb": line["peak_mb"], "tokens_per_s": z_tps, **setup, "first_loss": z_loss,
                     **{k: line.get(k) for k in PHASE_KEYS},
                     "max_live_parameters": max_live,
                     "x_single_peak": line["peak_mb"] / s_peak if s_peak else None,
                     **({"error": z3_err} if z3_err else {})})
    if not z3_lines:
        rows += [{"case": f"rank{r}", "impl": "zero3_rank", "ok": False, "error": z3_err or "no result"} for r in (0, 1)]
    rows.append({"case": "single", "impl": "single", "ok": bool(s_lines) and not s_err and agree, "peak_mb": s_peak,
                 "tokens_per_s": s_tps, **setup, "first_loss": s_loss,
                 **{k: s_lines[0].get(k) if s_lines else None for k in PHASE_KEYS}, **({"error": s_err} if s_err else {})})
    if not agree and s_loss is not None and z_loss is not None:
        for r in rows:
            r["error"] = f"first-step losses differ: zero3 {z_loss} vs single {s_loss}"
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    large_mb = 2.0 if args.quick else args.large_mb
    size = "tiny" if args.quick else args.teacher_size
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        if "data" in parts:
            rows += data_rows(work, large_mb)
        if "teacher" in parts:
            rows += teacher_rows(work, size=size, vocab=args.vocab, seq_len=32 if args.quick else args.seq_len,
                                 steps=args.steps, shard_mb=args.shard_mb, bf16=args.dtype == "bf16",
                                 max_live=None if args.max_live < 0 else args.max_live)
    return rows


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minitron_fast.io import save_figure

    ok = [r for r in rows if r.get("ok") and r.get("peak_mb")]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['impl']}\n{r['case']}" for r in ok]
    ax.bar(labels, [r["peak_mb"] for r in ok])
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("scale rehearsal (CPU)")
    fig.tight_layout()
    save_figure(fig, png)
