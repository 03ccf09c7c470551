"""Do activation scores pick better units than weight magnitude or chance? SmolLM2-135M pruned
one-shot (no retraining) to the same smaller width by each, held-out LM loss reported.

Pruning is simulated by zeroing (``minitron_fast.importance.simulate``), which equals real surgery
exactly (tested), so this benchmark needs no pruning code. Cases: MLP neurons only, query heads
only (GQA-uniform: the same number kept inside every KV group), embedding channels only, and all
three together. impl values: ``activation`` (minitron_fast scores, mean over sequence then L2 over
batch, on the calib split), ``activation_after_o_proj`` (the same, heads scored by their
contribution after ``o_proj``: ``head_score="output"``; heads and all-axes cases only), ``magnitude`` (L2 norm of each unit's weights), ``random`` (seeded).
Held-out text is the ``heldout`` split (disjoint from ``calib`` by document). ``median_s`` is the
time of the one held-out evaluation of that row.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from typing import Any

HELP = "SmolLM2-135M pruned one-shot by activation vs magnitude vs random scores: held-out LM loss"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-samples", type=int, default=32, help="calibration samples (default 32; --quick: 4)")
    p.add_argument("--heldout-samples", type=int, default=8, help="held-out samples (default 8; --quick: 2)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256; --quick: 128)")
    p.add_argument("--keep-neurons", type=float, default=0.5, help="fraction of MLP neurons kept (default 0.5)")
    p.add_argument("--keep-heads-per-group", type=int, default=2, help="query heads kept per KV group (default 2 of 3)")
    p.add_argument("--keep-channels", type=float, default=0.75, help="fraction of hidden channels kept (default 0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from minitron_fast.data import token_blocks
    from minitron_fast.importance import collect_importance
    from minitron_fast.importance.depth import heldout_loss
    from minitron_fast.importance.simulate import (heads_within_groups, magnitude_scores, top_k, zero_channels,
                                                   zero_heads, zero_neurons)
    from minitron_fast.models import get_view
    from minitron_fast.models.loading import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    n_cal = 4 if q and args.calib_samples == 32 else args.calib_samples
    n_ho = 2 if q and args.heldout_samples == 8 else args.heldout_samples
    T = 128 if q and args.seq_len == 256 else args.seq_len
    model = load_model("demo")
    tok = load_tokenizer("demo")
    calib = token_blocks(tok, "demo", "calib", T, max_blocks=n_cal)
    heldout = token_blocks(tok, "demo", "heldout", T, max_blocks=n_ho)
    view = get_view(model)
    g = view.geometry()
    L = g.num_hidden_layers

    t0 = time.perf_counter()
    act = collect_importance(model, calib, batch_size=8, progress=True)
    t_collect = time.perf_counter() - t0
    mag = magnitude_scores(view)
    gen = torch.Generator().manual_seed(args.seed)
    rnd = {"heads": [torch.rand(g.num_attention_heads, generator=gen) for _ in range(L)],
           "neurons": [torch.rand(g.intermediate_size, generator=gen) for _ in range(L)],
           "channels": torch.rand(g.hidden_size, generator=gen)}
    act_out = collect_importance(model, calib, batch_size=8, progress=True, head_score="output")
    methods = {"activation": {"heads": act.heads, "neurons": act.neurons, "channels": act.channels},
               "activation_after_o_proj": {"heads": act_out.heads, "neurons": act.neurons, "channels": act.channels},
               "magnitude": mag, "random": rnd}
    k_neurons = int(round(g.intermediate_size * args.keep_neurons))
    k_channels = int(round(g.hidden_size * args.keep_channels))
    per_group = args.keep_heads_per_group
    if not 1 <= per_group <= g.num_attention_heads // g.num_key_value_heads:
        raise SystemExit(f"--keep-heads-per-group must be in [1, {g.num_attention_heads // g.num_key_value_heads}]")

    def evaluate(m) -> tuple[float, float]:
        t = time.perf_counter()
        loss = heldout_loss(m, heldout, batch_size=8)
        return loss, time.perf_counter() - t

    base, t_base = evaluate(model)
    shape = (f"ffn {g.intermediate_size}->{k_neurons}", f"heads {g.num_attention_heads}->{per_group * g.num_key_value_heads}",
             f"hidden {g.hidden_size}->{k_channels}")
    rows = [{"case": "unpruned", "impl": "none", "median_s": t_base, "lm_loss": base, "ppl": math.exp(base),
             "delta_loss": 0.0, "ok": True}]
    cases = {"neurons": shape[0], "heads": shape[1], "channels": shape[2], "all": ", ".join(shape)}
    for case, desc in cases.items():
        for name, sc in methods.items():
            if name == "activation_after_o_proj" and case not in ("heads", "all"):
                continue  # same neuron and channel scores as "activation"
            m = copy.deepcopy(model)
            if case in ("neurons", "all"):
                zero_neurons(m, [top_k(sc["neurons"][i], k_neurons) for i in range(L)])
            if case in ("heads", "all"):
                zero_heads(m, [heads_within_groups(sc["heads"][i], g.num_key_value_heads, per_group) for i in range(L)])
            if case in ("channels", "all"):
                zero_channels(m, top_k(sc["channels"], k_channels))
            loss, t = evaluate(m)
            del m
            rows.append({"case": f"{case}: {desc}", "impl": name, "median_s": t, "lm_loss": loss, "ppl": math.exp(loss),
                         "delta_loss": loss - base, "ok": math.isfinite(loss)})
    for r in rows:
        r.update({"calib_tokens": int(calib.numel()), "heldout_tokens": int(heldout.numel()),
                  "collect_s": t_collect, "p20_s": None, "p80_s": None, "peak_mb": None})
    return rows


def plot(rows: list[dict[str, Any]], png_path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cases = [r["case"] for r in rows if r["impl"] == "activation"]
    impls = ["activation", "activation_after_o_proj", "magnitude", "random"]
    base = next(r["lm_loss"] for r in rows if r["impl"] == "none")
    fig, ax = plt.subplots(figsize=(9, 3.5))
    w = 0.2
    for j, impl in enumerate(impls):
        vals = [next((r["lm_loss"] or 0 for r in rows if r["case"] == c and r["impl"] == impl), 0) for c in cases]
        ax.bar([i + (j - 1.5) * w for i in range(len(cases))], vals, w, label=impl)
    ax.axhline(base, color="k", lw=0.8, ls="--", label="unpruned")
    ax.set_xticks(range(len(cases)), [c.split(":")[0] for c in cases])
    ax.set_ylabel("held-out LM loss (nats/token)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M one-shot width pruning, no retraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
