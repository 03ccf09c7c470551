"""Shared benchmark plumbing: timing, peak memory in a fresh process, metadata, result rows."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

ROW_KEYS = ("bench", "case", "impl", "median_s", "p20_s", "p80_s", "peak_mb", "ok")


def meta() -> dict[str, Any]:
    """Commit, machine and package versions for the results file."""
    import torch

    def ver(name: str) -> str | None:
        try:
            return importlib_metadata_version(name)
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "versions": {n: ver(n) for n in ("torch", "triton", "transformers", "deepspeed", "liger-kernel", "trl",
                                          "minitron_fast")},
        "python": sys.version.split()[0],
    }


def importlib_metadata_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, reps: int = 5, sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median and 20th/80th percentile wall time of ``fn()`` over ``reps`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3]}


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB (``VmHWM``; see ``minitron_fast.io.peak_rss_mb``)."""
    from minitron_fast.io import peak_rss_mb as peak

    return peak()


def run_in_subprocess(target: str, kwargs: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    """Runs ``target`` ("module:function", called with ``**kwargs``, returning a JSON-able dict) in a
    fresh Python process, so its peak memory is its own. Returns the dict, or
    ``{"ok": False, "error": ...}`` when the process fails."""
    code = ("import json, sys, importlib; m, f = sys.argv[1].split(':'); "
            "r = getattr(importlib.import_module(m), f)(**json.loads(sys.argv[2])); "
            "print('__RESULT__' + json.dumps(r))")
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, "-c", code, target, json.dumps(kwargs)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout}s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("__RESULT__"):
            return json.loads(line[len("__RESULT__"):])
    return {"ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}


def finalize_rows(rows: list[dict[str, Any]], *, bench: str) -> list[dict[str, Any]]:
    """Fills ``bench``, checks the required keys, and blanks every number of a row whose
    correctness check failed (a wrong result is never reported as a timing)."""
    out = []
    for r in rows:
        r = dict(r)
        r.setdefault("bench", bench)
        r.setdefault("ok", True)
        for k in ROW_KEYS:
            r.setdefault(k, None)
        if not r["ok"]:
            for k in list(r):
                if k not in ("bench", "case", "impl", "ok", "error") and isinstance(r[k], (int, float)) and not isinstance(r[k], bool):
                    r[k] = None
        out.append(r)
    return out


def fmt_cell(v: Any) -> str:
    """One table cell: ``-`` for None, ``yes``/``FAILED`` for the correctness flag, 4 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "FAILED"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the rows (extra numeric fields included)."""
    if not rows:
        return "(no rows)"
    keys = list(ROW_KEYS[1:])
    for r in rows:
        for k in r:
            if k not in keys and k not in ("bench", "error") and not isinstance(r[k], (dict, list)):
                keys.append(k)

    table = [keys] + [[fmt_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(path: Path, obj: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def make_tiny_teacher(path: str | os.PathLike) -> Path:
    """A tiny Llama (GQA, untied; hidden 64, FFN 128, 4 layers, 4 query / 2 KV heads) with a
    160-token BPE tokenizer trained on the embedded pydoc text, saved as an HF checkpoint directory
    (nothing downloaded). The end-to-end tests and ``bench device_check`` run recipes on it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from minitron_fast.data import embedded_documents

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(embedded_documents()[:200], trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<unk>", "<eos>"], limit_alphabet=100, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     tie_word_embeddings=False))
    path = Path(path)
    m.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@contextlib.contextmanager
def work_dir(path: str | os.PathLike | None, prefix: str) -> Iterator[Path]:
    """A benchmark's working directory: ``path`` when given (created, and kept for inspection),
    else a fresh temporary directory removed at the end (models, token shards and stored logits
    run to gigabytes: an offline-teacher run left 13 GB in /tmp before this)."""
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)
