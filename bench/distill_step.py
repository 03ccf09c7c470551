"""``python -m bench distill_step``: one distillation training step, fused KD loss vs materialized logits.

Teacher: the embedded SmolLM2-135M (fp32, vocabulary 49,152). Student: the teacher cut to its first
half of layers (30 -> 15) and half its MLP neurons (1536 -> 768), weights sliced from the teacher
(a stand-in for a pruned student; the step's cost does not depend on which units were kept).
Each case runs the real trainer (``minitron_fast.distill.train``: DeepSpeed engine, world of one,
ZeRO-0, client AdamW) in a fresh process for ``--steps`` optimizer steps on the pydoc text, and
reads its ``metrics.jsonl``. Rows: ``impl`` ``fused`` (never materializes ``[N, V]``) and
``materialized`` (full fp32 student and teacher logits, torch ``log_softmax`` + KL);
``median_s`` is the step time after the first (warm-up) step, ``tokens_per_s`` from it,
``peak_mb`` the process's peak RSS (models, optimizer state, activations and the loss),
``rss_after_mb`` its RSS after the last step and ``step_transient_mb`` the difference: what a step
needs on top of what stays resident (the loss's share of memory shows there; at SmolLM2 size the
resident models and AdamW state dominate the peak). ``--micro-batch 4,16`` runs several sizes.
``--lm-weight W`` adds the student's next-token CE to KD: the trainer's one KD step
(``ops.kd_step``) takes both parts from one fused pass over the student's lm_head.
Correctness: both impls must give the same first-step loss (rtol 5e-4, the fp32 slack).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

HELP = "distillation training step on SmolLM2-135M -> half-depth/half-FFN student: fused KD loss vs materialized logits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--micro-batch", default="4",
                   help="blocks per step; a comma-separated list runs each size (default 4; e.g. 4,16: the "
                        "logits' share of the step's memory grows with the tokens per step)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per case; the first is warm-up (default 4)")
    p.add_argument("--impls", default="fused,materialized", help="comma-separated impls to run")
    p.add_argument("--lm-weight", type=float, default=0.0,
                   help="weight of the student's next-token CE beside KD (default 0: logit-only KD, the papers' "
                        "choice); > 0 shows the one-pass KD+CE step (both parts from one fused call)")
    p.add_argument("--workdir", type=Path, default=None, help="where the student checkpoint and runs go (default: a temp dir)")


def build_student(out: Path, layers: int = 15, ffn: int = 768) -> Path:
    """Slices the embedded SmolLM2-135M to ``layers`` layers and ``ffn`` MLP neurons; saves an HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from minitron_fast.models import get_view
    from minitron_fast.models.export import export_hf
    from minitron_fast.models.loading import load_model, resolve_model_path

    if (out / "config.json").is_file():
        return out
    teacher = load_model("demo")
    view = get_view(teacher)
    cfg = view.config_for(teacher.config, view.geometry().replace(num_hidden_layers=layers, intermediate_size=ffn))
    student = AutoModelForCausalLM.from_config(cfg)
    sv = get_view(student)
    with torch.no_grad():
        sv.embed_tokens.weight.copy_(view.embed_tokens.weight)
        sv.final_norm.weight.copy_(view.final_norm.weight)
        if not sv.tied:
            sv.lm_head.weight.copy_(view.lm_head.weight)
        for s, t in zip(sv.layers, view.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(s, name).weight.copy_(getattr(t, name).weight)
            s.gate_proj.weight.copy_(t.gate_proj.weight[:ffn])
            s.up_proj.weight.copy_(t.up_proj.weight[:ffn])
            s.down_proj.weight.copy_(t.down_proj.weight[:, :ffn])
            s.input_norm.weight.copy_(t.input_norm.weight)
            s.post_attn_norm.weight.copy_(t.post_attn_norm.weight)
    export_hf(student, out, tokenizer_from=resolve_model_path("demo"), overwrite=True)
    return out


def run_case(impl: str, student: str, out: str, micro_batch: int, seq_len: int, steps: int,
             lm_weight: float = 0.0) -> dict[str, Any]:
    """One case in this (fresh) process: ``steps`` trainer steps; returns the metrics."""
    from minitron_fast.distill import load_config, train
    from minitron_fast.distill.trainer import read_metrics

    cfg = load_config(None, [f"teacher=demo", f"student={student}", f"out={out}", f"steps={steps}",
                             f"micro_batch_size={micro_batch}", "grad_accum=1", f"data.seq_len={seq_len}",
                             "data.eval_blocks=0", "warmup_steps=0", "schedule=constant", "lr=1e-4",
                             f"save_every={10**6}", "export=false", "ds.zero_stage=0",
                             f"loss.materialized={str(impl == 'materialized').lower()}",
                             f"loss.lm_weight={lm_weight}"])
    train(cfg, progress=False)
    recs = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]
    return {"ok": True, "losses": [r["loss"] for r in recs], "step_s": [r["step_s"] for r in recs],
            "tokens": recs[0]["tokens"], "peak_mb": max(r["peak_mem_mb"] for r in recs),
            "rss_after_mb": recs[-1].get("rss_mb")}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.common import work_dir

    with work_dir(args.workdir, "distill_step-") as work:
        return _run(args, work)


def _run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    sizes = [int(x) for x in str(args.micro_batch).split(",") if x.strip()]
    T, steps = args.seq_len, args.steps
    if args.quick:
        sizes, T, steps = [2], 128, 2
    student = build_student(work / "student")
    rows: list[dict[str, Any]] = []
    for mb in sizes:
        rows += _run_size(args, student, work, mb, T, steps)
    return rows


def _run_size(args, student: Path, work: Path, mb: int, T: int, steps: int) -> list[dict[str, Any]]:
    from bench.common import run_in_subprocess

    rows, losses = [], {}
    for impl in [x.strip() for x in args.impls.split(",") if x.strip()]:
        out = work / f"run-{impl}-{mb}x{T}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        r = run_in_subprocess("bench.distill_step:run_case", {"impl": impl, "student": str(student), "out": str(out),
                                                               "micro_batch": mb, "seq_len": T, "steps": steps,
                                                               "lm_weight": args.lm_weight},
                              timeout=3600)
        loss = "kd" if not args.lm_weight else f"kd+{args.lm_weight:g}lm"
        row: dict[str, Any] = {"case": f"smollm2-135m->15L-ffn768 {loss} B={mb} T={T}", "impl": impl,
                               "micro_batch": mb, "seq_len": T, "vocab": 49152, "lm_weight": args.lm_weight}
        if not r.get("ok"):
            row.update(ok=False, error=r.get("error", "")[-500:])
            rows.append(row)
            continue
        times = sorted(r["step_s"][1:] or r["step_s"])
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
        med = statistics.median(times)
        row.update(median_s=med, p20_s=q[0], p80_s=q[3], peak_mb=r["peak_mb"], tokens_per_s=mb * T / med,
                   first_loss=r["losses"][0], ok=True, rss_after_mb=r.get("rss_after_mb"))
        if r.get("rss_after_mb"):
            # what a step needs on top of what stays resident (models, optimizer state, allocator)
            row["step_transient_mb"] = r["peak_mb"] - r["rss_after_mb"]
        losses[impl] = r["losses"][0]
        rows.append(row)
    if "fused" in losses and "materialized" in losses:
        # fp32 KD losses of ~10 nats over V=49,152: the fused and materialized sums differ by ~1e-4 relative
        agree = abs(losses["fused"] - losses["materialized"]) <= 5e-4 * abs(losses["materialized"])
        base = next(r for r in rows if r["impl"] == "materialized")
        for r in rows:
            r["ok"] = r["ok"] and agree
            if r.get("peak_mb") and base.get("peak_mb"):
                r["peak_vs_materialized"] = r["peak_mb"] / base["peak_mb"]
                r["speed_vs_materialized"] = base["median_s"] / r["median_s"]
            if r.get("step_transient_mb") and base.get("step_transient_mb"):
                r["transient_vs_materialized"] = r["step_transient_mb"] / base["step_transient_mb"]
    return rows


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("ok") and r.get("median_s")]
    if not ok:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [f"{r['impl']}\nB={r['micro_batch']}" for r in ok]
    colors = ["tab:green" if r["impl"] == "fused" else "tab:gray" for r in ok]
    a.bar(names, [r["tokens_per_s"] for r in ok], color=colors)
    a.set_ylabel("tokens / s (training step)")
    b.bar(names, [r["peak_mb"] for r in ok], color=colors)
    b.set_ylabel("peak RSS (MB)")
    fig.suptitle(f"SmolLM2-135M -> 15L/FFN768 student, T={ok[0]['seq_len']}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
