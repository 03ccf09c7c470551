"""Importance collection cost on SmolLM2-135M (this CPU): plain forward vs minitron_fast's
one-pass collection vs Model-Optimizer-style Python hooks, side by side in one process.

impl values: ``plain_forward`` (the model's forward with logits, no statistics),
``minitron_fast`` (``ImportanceCollector``: every axis + block importance; runs the decoder stack,
since no score needs the lm_head), ``hooks`` (forward hooks computing the same default scores the
way Model-Optimizer does: ``x.abs().mean(seq)`` then ``pow(2).sum(batch)`` per module, plus a
cosine hook per layer, on the full forward). A second ``minitron_fast`` row runs the full forward
(logits included) for a like-for-like comparison with the other two.

Reps are interleaved (plain, ours, hooks, plain, ...) so drift on a shared machine hits all
impls alike; ``cpu_s`` is the median process CPU time of a pass (with ``--threads 1`` it is
insensitive to other jobs taking the core, which wall time on a shared machine is not). ``peak_mb`` is the peak RSS of a fresh process doing one pass (model included);
``added_mb`` is the collector's own state (accumulators and per-batch sums).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

HELP = "importance collection cost on SmolLM2-135M: plain forward vs minitron_fast vs hook-based (Model-Optimizer style)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=16, help="calibration samples (default 16; --quick: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256; --quick: 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="timed passes per impl (default 3; --quick: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-subprocess-memory", action="store_true", help="skip the fresh-process peak memory runs")


class HookBaseline:
    """Model-Optimizer-style importance hooks (its Megatron plugin's recipe, on HF modules)."""

    def __init__(self, view):
        import torch

        self.view, self.handles = view, []
        g = view.geometry()
        self.nh = g.num_attention_heads
        L = view.num_layers
        device = next(view.model.parameters()).device
        z = lambda n: torch.zeros(n, device=device)  # noqa: E731
        self.heads = [z(g.num_attention_heads) for _ in range(L)]
        self.neurons = [z(g.intermediate_size) for _ in range(L)]
        self.channels = [z(g.hidden_size) for _ in range(L)]
        self.cos = [0.0] * L
        self._x = {}

    def attach(self):
        import torch.nn.functional as F

        for i, lv in enumerate(self.view.layers):
            def o_hook(m, a, i=i):
                x = a[0].detach().float()
                B, T, C = x.shape
                self.heads[i] += x.view(B, T, self.nh, -1).norm(dim=-1).abs().mean(1).pow(2).sum(0)

            def d_hook(m, a, i=i):
                self.neurons[i] += a[0].detach().float().abs().mean(1).pow(2).sum(0)

            def n_hook(m, a, out, i=i):
                self.channels[i] += out.detach().float().abs().mean(1).pow(2).sum(0)

            def pre(m, a, k, i=i):
                self._x[i] = a[0] if a else k["hidden_states"]

            def post(m, a, out, i=i):
                y = out[0] if isinstance(out, tuple) else out
                self.cos[i] += float(F.cosine_similarity(self._x.pop(i).float(), y.float(), dim=-1).mean())

            self.handles += [lv.o_proj.register_forward_pre_hook(o_hook), lv.down_proj.register_forward_pre_hook(d_hook),
                             lv.input_norm.register_forward_hook(n_hook), lv.post_attn_norm.register_forward_hook(n_hook),
                             lv.module.register_forward_pre_hook(pre, with_kwargs=True), lv.module.register_forward_hook(post)]
        return self

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _setup(samples: int, seq_len: int):
    import torch

    from minitron_fast.data import token_blocks
    from minitron_fast.models.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    model = load_model("demo")
    blocks = token_blocks(load_tokenizer("demo"), "demo", "calib", seq_len, max_blocks=samples)
    return model, blocks


def one_pass(impl: str, samples: int, seq_len: int, batch_size: int, threads: int | None = None) -> dict[str, Any]:
    """Fresh-process target: one pass of ``impl``; returns peak RSS."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from bench.common import peak_rss_mb, rss_mb
    from minitron_fast.importance import ImportanceCollector
    from minitron_fast.models import get_view

    model, blocks = _setup(samples, seq_len)
    base = rss_mb()
    with torch.no_grad():
        if impl == "minitron_fast":
            with ImportanceCollector(model) as col:
                for s in range(0, len(blocks), batch_size):
                    col.step(blocks[s: s + batch_size])
        else:
            hb = HookBaseline(get_view(model)).attach() if impl == "hooks" else None
            for s in range(0, len(blocks), batch_size):
                model(input_ids=blocks[s: s + batch_size], use_cache=False)
            if hb:
                hb.detach()
    return {"peak_mb": peak_rss_mb(), "rss_after_load_mb": base}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from bench.common import run_in_subprocess
    from minitron_fast.importance import ImportanceCollector
    from minitron_fast.models import get_view

    if args.threads:
        torch.set_num_threads(args.threads)
    samples = 4 if args.quick and args.samples == 16 else args.samples
    seq_len = 128 if args.quick and args.seq_len == 256 else args.seq_len
    reps = 2 if args.quick and args.reps == 3 else args.reps
    bs = args.batch_size
    model, blocks = _setup(samples, seq_len)
    view = get_view(model)
    case = f"SmolLM2-135M {len(blocks)}x{seq_len} bs{bs}"
    batches = [blocks[s: s + bs] for s in range(0, len(blocks), bs)]
    state: dict[str, Any] = {}

    def plain():
        for b in batches:
            model(input_ids=b, use_cache=False)

    def ours(full: bool):
        def f():
            with ImportanceCollector(view) as col:
                for b in batches:
                    col.step(b, run_lm_head=full)
            state["ours" + ("_full" if full else "")] = col
        return f

    def hooks():
        hb = HookBaseline(view).attach()
        try:
            plain()
        finally:
            hb.detach()
        state["hooks"] = hb

    fns = {"plain_forward": plain, "minitron_fast": ours(False), "minitron_fast_full": ours(True), "hooks": hooks}
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}  # process CPU time: robust to being descheduled
    with torch.no_grad():
        for k, f in fns.items():  # warm-up
            f()
        for _ in range(reps):
            for k, f in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)

    # correctness: ours (mean over sequence, L2 over batch) == the hooks' sqrt(sum of squared means)
    col, hb = state["ours"], state["hooks"]
    sc = col.scores()
    err = 0.0
    for i in range(view.num_layers):
        for got, ref in ((sc.neurons[i], hb.neurons[i].sqrt()), (sc.heads[i], hb.heads[i].sqrt()),
                         (col.norms[i][0].result(), None)):
            if ref is not None:
                err = max(err, float(((got - ref).abs() / ref.abs().clamp_min(1e-6)).max()))
    ok = err < 1e-3
    added = sum((t.numel() * t.element_size()) for st in col._all_stats() for t in (st.S1, st.S2) if t is not None)
    added += sum(st.n_units * bs * 4 * (st.need_s1 + st.need_s2) for st in col._all_stats())
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    peaks = {}
    if not args.no_subprocess_memory:
        for impl in ("plain_forward", "minitron_fast", "hooks"):
            r = run_in_subprocess("bench.importance:one_pass", {"impl": impl, "samples": samples, "seq_len": seq_len,
                                                                "batch_size": bs, "threads": args.threads},
                                  timeout=1800)
            peaks[impl] = r.get("peak_mb")
    base_med = statistics.median(times["plain_forward"])
    base_cpu = statistics.median(cpu["plain_forward"])
    rows = []
    for k, ts in times.items():
        ts = sorted(ts)
        impl = "minitron_fast" if k.startswith("minitron_fast") else k
        med = statistics.median(ts)
        rows.append({
            "case": case + (" full forward incl. lm_head" if k == "minitron_fast_full" else ""),
            "impl": impl, "median_s": med, "p20_s": ts[0], "p80_s": ts[-1],
            "peak_mb": peaks.get(k), "ratio_vs_plain": med / base_med,
            "tokens_per_s": len(blocks) * seq_len / med,
            "cpu_s": statistics.median(cpu[k]), "cpu_ratio_vs_plain": statistics.median(cpu[k]) / base_cpu,
            "cpu_min_ratio_vs_plain": min(cpu[k]) / min(cpu["plain_forward"]),
            "added_mb": added / 2**20 if impl == "minitron_fast" else None,
            "added_pct_of_model": 100 * added / 2**20 / model_mb if impl == "minitron_fast" else None,
            "max_rel_err_vs_hooks": err if impl != "plain_forward" else None,
            "ok": ok if impl != "plain_forward" else True,
            "threads": torch.get_num_threads(),
        })
    return rows


def plot(rows: list[dict[str, Any]], png_path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    labels = [r["impl"] + (" (full fwd)" if "full" in r["case"] else "") for r in rows]
    ax.barh(labels, [r["ratio_vs_plain"] or 0 for r in rows], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("time / plain forward (same run)")
    ax.set_title(rows[0]["case"])
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
