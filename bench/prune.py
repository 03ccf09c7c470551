"""``python -m bench prune [--json FILE] [--quick]``: pruning a model of a few GB of fp32 in place.

Each case runs in a fresh process (``bench.common.run_in_subprocess``) so its peak RSS is its own:

- ``inplace_c``: ``apply_plan(impl="cpp")``: compaction inside each parameter's buffer, freed
  pages returned to the OS;
- ``inplace_torch``: ``apply_plan(impl="torch")``: the same schedule with ``index_select(out=)``;
- ``naive_index_select``: what other toolkits do: a new tensor per parameter
  (``index_select`` rows, then columns) replacing the old one;
- ``streaming``: ``prune_checkpoint(streaming=True)`` from a safetensors file on disk to a new
  checkpoint (includes reading and writing the files; the page cache is warm);
- ``inplace_loaded``: the model loaded from that checkpoint by ``from_pretrained`` (weights stay
  copy-on-write file mappings), then ``apply_plan(impl="cpp")``;
- ``inplace_private``: the model loaded by ``prune.streaming.load_private`` (positioned reads into
  private memory), then ``apply_plan(impl="cpp")``: what ``prune`` without ``--streaming`` does;
- ``memcpy``: a plain copy of the pruned model's bytes into already-touched memory (the floor).

The model is a ``LlamaForCausalLM`` with Llama-3.1-8B layer shapes (hidden 4096, FFN 14336,
32 heads / 8 KV heads) and a reduced depth and vocabulary (default 2 layers, 32,768 tokens:
2.8 GB of fp32), built on the meta device and filled with a position code
``w[r, c] = (r * C + c) mod 65521``, so every kept element of the result is checked exactly.
Peak RSS is the pruning step's: the kernel's high-water mark is reset (``/proc/self/clear_refs``)
after the model is built, and ``peak_x_model`` = (peak - RSS before the model) / model bytes, so
1.0 means "nothing beyond the loaded model".
The plan is the Minitron 4B-Width shape: hidden 3072, FFN 9216, 24 heads (3 per KV group).

Rows: ``median_s`` (one prune; p20/p80 over ``--reps`` processes), ``peak_x_model`` (peak RSS
above the process's baseline, over the model's bytes), ``end_x_model`` (RSS after pruning, over
the model's bytes; the pruned model is ``pruned_x_model``), ``gb_s`` (pruned bytes written per
second) and ``x_memcpy`` (that throughput over the memcpy row's). The two loaded cases also
report ``loaded_x_model`` (RSS after loading and reading every weight once, as the importance
pass before pruning does), ``load_s`` and ``touch_s`` (that first read), and the growth of anonymous (``end_anon_x_model``) and
file-backed (``end_file_x_model``) RSS over the process's baseline; their ``peak_x_model`` is
the pruning step's peak over the RSS before loading.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from typing import Any

HELP = "in-place pruning (C++ / torch) vs index_select vs streaming vs memcpy: time, peak RSS, throughput"
IMPLS = ("inplace_c", "inplace_torch", "naive_index_select", "streaming", "inplace_loaded", "inplace_private", "memcpy")
P = 65521  # largest prime < 2**16: the fill codes are exact in fp32

SHAPES = {
    "llama8b_layers": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                           num_hidden_layers=2, vocab_size=32768),
    "quick": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=16, num_key_value_heads=4,
                  num_hidden_layers=2, vocab_size=8192),
}
TARGETS = {"llama8b_layers": "hidden=3072,ffn=9216,heads=24", "quick": "hidden=768,ffn=2304,heads=12"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 2; each is 0.87 GB of fp32)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32768)")
    p.add_argument("--reps", type=int, default=1, help="fresh processes per impl (median over them)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--workdir", default=None, help="where the streaming case writes its checkpoints (default: a temp dir)")


# -- the model ------------------------------------------------------------------------------------

def _config(shape: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, max_position_embeddings=256, tie_word_embeddings=False)


def _fill(t, chunk: int = 1 << 22) -> None:
    import torch

    flat = t.view(-1)
    for s in range(0, flat.numel(), chunk):
        e = min(flat.numel(), s + chunk)
        flat[s:e] = torch.arange(s, e) % P


def _codes(shape, rows, cols):
    """The expected fill codes of a [len(rows), len(cols)] slice of a tensor of ``shape``."""
    import torch

    C = shape[1] if len(shape) == 2 else 1
    r = torch.arange(shape[0]) if rows is None else rows
    if len(shape) == 1:
        return (r % P).float()
    c = torch.arange(C) if cols is None else cols
    return ((r[:, None] * C + c[None, :]) % P).float()


def _build(shape: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(shape))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            _fill(p.data)
    return model.eval()


def _plan(shape: dict[str, Any], target: str):
    import torch

    from minitron_fast.models import ModelView
    from minitron_fast.prune import make_plan

    g = ModelView.geometry_of(_config(shape))
    gen = torch.Generator().manual_seed(0)
    s = {"channels": torch.rand(g.hidden_size, generator=gen),
         "depth.block_importance": torch.rand(g.num_hidden_layers, generator=gen)}
    for i in range(g.num_hidden_layers):
        s[f"layers.{i}.heads"] = torch.rand(g.num_attention_heads, generator=gen)
        s[f"layers.{i}.kv_groups"] = torch.rand(g.num_key_value_heads, generator=gen)
        s[f"layers.{i}.neurons"] = torch.rand(g.intermediate_size, generator=gen)
    return make_plan(_config(shape), s, target)


def _expected_rules(shape, plan):
    """name -> (source shape, Rule) on a meta model of the source."""
    import torch
    from transformers import AutoModelForCausalLM

    from minitron_fast.prune.surgery import named_rules

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(_config(shape))
    rules = named_rules(meta, plan)
    return {n: (tuple(p.shape), rules[n]) for n, p in meta.named_parameters() if n in rules}


def _check(model_or_tensors, shape, plan) -> bool:
    """Every element of every pruned tensor equals the code of its source position."""
    import torch

    from minitron_fast.prune.surgery import layers_prefix

    exp = _expected_rules(shape, plan)
    items = dict(model_or_tensors.named_parameters()) if hasattr(model_or_tensors, "named_parameters") else model_or_tensors
    prefix = "model.layers."
    back = {new: old for new, old in enumerate(plan.layers)}
    for name, t in items.items():
        src = name
        if name.startswith(prefix):
            i, rest = name[len(prefix):].split(".", 1)
            src = f"{prefix}{back[int(i)]}.{rest}"
        sshape, rule = exp[src]
        if tuple(t.shape) != rule.shape(sshape):
            return False
        rows = rule.rows if rule.rows is not None else torch.arange(sshape[0])
        step = max(1, (1 << 22) // max(1, t.shape[1] if t.dim() == 2 else 1))
        for s in range(0, rows.numel(), step):
            want = _codes(sshape, rows[s:s + step], rule.cols)
            if not torch.equal(t[s:s + step].float(), want):
                return False
    return True


def _rss_mb() -> float:
    from bench.common import rss_mb

    return rss_mb()


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process, so the peak measured is the
    pruning step's, not the model build's (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_split_mb() -> dict[str, float]:
    """RssAnon and RssFile of this process (MB), from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _write_checkpoint(cfg, root: str) -> str:
    """A ``save_pretrained`` directory of the filled model, written one tensor at a time."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from minitron_fast.prune.streaming import write_safetensors_streaming

    src_dir = os.path.join(root, "src")
    os.makedirs(src_dir)
    cfg.save_pretrained(src_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    entries = [(n, torch.float32, tuple(p.shape)) for n, p in meta.named_parameters()]

    def produce():
        for _, _, shp in entries:
            t = torch.empty(shp)
            _fill(t)
            yield t

    write_safetensors_streaming(Path(src_dir) / "model.safetensors", entries, produce())
    return src_dir


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    from bench.common import peak_rss_mb

    return peak_rss_mb()


def _warmup(cfg) -> None:
    """Imports and first-call set-up (transformers' modeling code, _C, the staging buffers)
    happen before the baseline RSS is taken, so they are not counted against the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from minitron_fast.ops.compact import compact_
    from minitron_fast.prune import apply_plan, prune_checkpoint  # noqa: F401
    from minitron_fast.prune.streaming import SafetensorsFile  # noqa: F401

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(cfg)
    for impl in ("cpp", "torch"):
        w = torch.randn(3000, 700)
        compact_(w, torch.arange(1, 600), 1, impl=impl)
        compact_(w, torch.arange(1, 2000), 0, impl=impl)
    gc.collect()


def _naive(model, plan) -> None:
    """A new tensor per parameter, the way other toolkits prune (index_select, then replace)."""
    import torch
    from torch import nn

    from minitron_fast.models import get_view
    from minitron_fast.prune.surgery import all_rules, update_config_

    view = get_view(model)
    keep = set(plan.layers)
    for i in range(len(view.decoder_layers) - 1, -1, -1):
        if i not in keep:
            del view.decoder_layers[i]
    view.refresh()
    with torch.no_grad():
        for p, r in all_rules(view, plan):
            new = p.data
            if r.rows is not None:
                new = new.index_select(0, r.rows)
            if r.cols is not None:
                new = new.index_select(1, r.cols)
            p.data = new  # the old storage goes when its last reference does
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
    update_config_(model.config, plan.target_geometry(), plan)


# -- one case, in a fresh process -------------------------------------------------------------------

def case(impl: str, size: str, layers: int | None, vocab: int | None, workdir: str | None = None) -> dict[str, Any]:
    import torch

    shape = dict(SHAPES[size])
    if layers:
        shape["num_hidden_layers"] = layers
    if vocab:
        shape["vocab_size"] = vocab
    plan = _plan(shape, TARGETS[size])
    from minitron_fast.models import ModelView

    cfg = _config(shape)
    _warmup(cfg)
    model_bytes = ModelView.count_params(cfg)["total"] * 4
    pruned_bytes = ModelView.count_params(cfg, plan.target_geometry())["total"] * 4
    gc.collect()
    base = _rss_mb()
    out: dict[str, Any] = {"model_mb": model_bytes / 2**20, "pruned_x_model": pruned_bytes / model_bytes}
    if impl == "memcpy":
        src = torch.empty(model_bytes // 4)
        _fill(src)
        dst = torch.zeros(pruned_bytes // 4)  # already touched
        _reset_peak()
        t0 = time.perf_counter()
        dst.copy_(src[: dst.numel()])
        dt = time.perf_counter() - t0
        peak = _hwm_mb()
        ok = bool(torch.equal(dst[-1000:], src[dst.numel() - 1000: dst.numel()]))
        end = _rss_mb()
    elif impl == "streaming":
        from pathlib import Path

        from minitron_fast.prune import prune_checkpoint
        from minitron_fast.prune.streaming import SafetensorsFile

        root = tempfile.mkdtemp(prefix="bench_prune_", dir=workdir)
        try:
            src_dir = _write_checkpoint(cfg, root)
            gc.collect()
            base = _rss_mb()
            _reset_peak()
            t0 = time.perf_counter()
            prune_checkpoint(src_dir, plan, os.path.join(root, "out"), streaming=True, progress=False)
            dt = time.perf_counter() - t0
            end = _rss_mb()
            peak = _hwm_mb()
            f = SafetensorsFile(Path(root) / "out" / "model.safetensors")
            tensors = {n: f.read_rows(n, None, None) for n in f.header}
            ok = _check(tensors, shape, plan)
            f.close()
            del tensors
        finally:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    elif impl in ("inplace_loaded", "inplace_private"):
        from transformers import AutoModelForCausalLM

        from minitron_fast.prune import apply_plan
        from minitron_fast.prune.streaming import load_private

        root = tempfile.mkdtemp(prefix="bench_prune_", dir=workdir)
        try:
            src_dir = _write_checkpoint(cfg, root)
            gc.collect()
            base = _rss_mb()
            base_split = _rss_split_mb()
            t0 = time.perf_counter()
            if impl == "inplace_loaded":
                model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval()
            else:
                model = load_private(src_dir, dtype=torch.float32)
            out["load_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():  # use the weights once, as the importance pass before pruning does
                for p in model.parameters():
                    p.sum()
            out["touch_s"] = time.perf_counter() - t0  # from_pretrained's lazy mapping faults the pages in here
            gc.collect()
            out["loaded_x_model"] = (_rss_mb() - base) / (model_bytes / 2**20)
            _reset_peak()
            t0 = time.perf_counter()
            apply_plan(model, plan, impl="cpp")
            dt = time.perf_counter() - t0
            peak = _hwm_mb()
            gc.collect()
            end = _rss_mb()
            split = _rss_split_mb()
            for k, key in (("RssAnon", "end_anon_x_model"), ("RssFile", "end_file_x_model")):
                out[key] = (split.get(k, float("nan")) - base_split.get(k, float("nan"))) / (model_bytes / 2**20)
            ok = _check(model, shape, plan)
            del model
        finally:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    else:
        from minitron_fast.prune import apply_plan

        model = _build(shape)
        gc.collect()
        _reset_peak()
        t0 = time.perf_counter()
        if impl == "naive_index_select":
            _naive(model, plan)
        else:
            apply_plan(model, plan, impl={"inplace_c": "cpp", "inplace_torch": "torch"}[impl])
        dt = time.perf_counter() - t0
        peak = _hwm_mb()
        gc.collect()
        end = _rss_mb()
        ok = _check(model, shape, plan)
    out.update({"ok": ok, "time_s": dt, "peak_x_model": (peak - base) / (model_bytes / 2**20),
                "end_x_model": (end - base) / (model_bytes / 2**20), "peak_mb": peak, "base_mb": base,
                "gb_s": pruned_bytes / 2**30 / dt})
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.common import run_in_subprocess

    size = "quick" if args.quick else "llama8b_layers"
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = set(impls) - set(IMPLS)
    if bad:
        raise SystemExit(f"unknown impls {sorted(bad)}; choose from {IMPLS}")
    results: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.reps):
        for impl in impls:
            r = run_in_subprocess("bench.prune:case", {"impl": impl, "size": size, "layers": args.layers,
                                                       "vocab": args.vocab, "workdir": args.workdir}, timeout=1800)
            results.setdefault(impl, []).append(r)
            print(f"  {impl} rep {rep}: " + (f"{r['time_s']:.3f}s peak {r['peak_x_model']:.3f}x" if r.get("ok") else
                                               f"FAILED {r.get('error', '')[-300:]}"), flush=True)
    rows = []
    memcpy_gb_s = None
    if "memcpy" in results and all(r.get("ok") for r in results["memcpy"]):
        memcpy_gb_s = statistics.median(r["gb_s"] for r in results["memcpy"])
    for impl, rs in results.items():
        ok = all(r.get("ok") for r in rs)
        row: dict[str, Any] = {"case": f"{size}[{TARGETS[size]}]", "impl": impl, "ok": ok, "reps": len(rs)}
        if ok:
            times = sorted(r["time_s"] for r in rs)
            row.update({"median_s": statistics.median(times), "p20_s": times[0], "p80_s": times[-1],
                        "peak_mb": max(r["peak_mb"] for r in rs)})
            for k in ("model_mb", "pruned_x_model", "peak_x_model", "end_x_model", "gb_s", "load_s", "touch_s", "loaded_x_model",
                      "end_anon_x_model", "end_file_x_model"):
                if k in rs[0]:
                    row[k] = statistics.median(r[k] for r in rs)
            row["x_memcpy"] = row["gb_s"] / memcpy_gb_s if memcpy_gb_s else None
        else:
            row["error"] = "; ".join(str(r.get("error", "check failed"))[-500:] for r in rs if not r.get("ok"))
        rows.append(row)
    base = next((r for r in rows if r["impl"] == "naive_index_select" and r["ok"]), None)
    for r in rows:
        if base and r["ok"] and r["impl"] != "memcpy":
            r["speedup_vs_naive"] = base["median_s"] / r["median_s"]
    return rows


def plot(rows: list[dict[str, Any]], png_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("ok")]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["impl"] for r in rows]
    ax[0].bar(names, [r["gb_s"] for r in rows])
    ax[0].set_ylabel("pruned GB written / s")
    ax[1].bar(names, [r["peak_x_model"] for r in rows])
    ax[1].axhline(1.0, color="k", lw=0.5)
    ax[1].set_ylabel("peak RSS / model size")
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    fig.suptitle(rows[0]["case"] if rows else "prune")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
