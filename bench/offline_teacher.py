"""``python -m bench offline_teacher``: distillation from stored top-k teacher logits vs the live teacher.

Teacher: the embedded SmolLM2-135M (fp32, vocabulary 49,152). Student: the demo's, FFN 1536 -> 768
by activation importance (16 calibration blocks, as ``configs/demo.yaml``), pruned from the teacher.
Every run trains that student with the real trainer (``minitron_fast.distill.train``, DeepSpeed
world of one, ZeRO-1, the demo's distill settings: lr 3e-4 -> 3e-5 cosine, 2 warm-up steps, forward
KL at T = 1) on the same train blocks in the same order (``data.max_blocks`` = steps x micro-batch,
so each block is read once), each in a fresh process so its peak RSS is its own:

- ``online``: the full teacher, loaded beside the student (hidden states through the fused loss);
- ``offline_k{8,64,512}_{renorm,tail}``: the teacher's top-k logits written once by
  ``minitron_fast.teacher_logits`` for exactly those blocks (the write is timed per k), then read by
  the trainer with no teacher in memory (``renorm``: softmax over the top-k; ``tail``: top-k plus one
  bucket holding the rest of the teacher's mass).

Row fields: ``ppl`` held-out perplexity after training (the exported student on the first
``--eval-blocks`` held-out blocks), ``ppl_vs_online``; ``peak_mb`` the process's peak RSS during
training (models, optimizer state, activations, the loss) and
``peak_vs_online``; ``median_s``/``p20_s``/``p80_s`` the step time after the first step,
``tokens_per_s`` and ``speed_vs_online``; ``bytes_per_token`` (the shards on disk / stored tokens;
0 for online) and ``write_s`` (teacher forward + top-k + shard writes for the stored tokens).
Correctness (``ok``): every loss finite, and with the tail bucket the first step's KD loss is at
most the online one (merging outcomes cannot raise a KL divergence: data processing inequality;
same student, same first batch).
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

HELP = "distillation from stored top-k teacher logits (k=8/64/512, renorm/tail) vs the online teacher on SmolLM2-135M"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8; the demo uses 16)")
    p.add_argument("--micro-batch", type=int, default=4, help="blocks per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--eval-blocks", type=int, default=8, help="held-out blocks for the perplexity (default 8)")
    p.add_argument("--ks", default="8,64,512", help="top-k values (default 8,64,512)")
    p.add_argument("--semantics", default="renorm,tail", help="top-k semantics to run (default renorm,tail)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--workdir", type=Path, default=None, help="student, logits and runs (default: a temp dir)")


def build_student(work: Path, seq_len: int) -> Path:
    """The demo's pruned student: FFN 1536 -> 768 from 16 calibration blocks (cached in ``work``)."""
    from minitron_fast.importance import ImportanceConfig, run_importance
    from minitron_fast.prune import PruneConfig, run_prune

    out = work / "student"
    if (out / "config.json").is_file():
        return out
    scores = work / "scores.safetensors"
    if not scores.is_file():
        run_importance("demo", "demo", out=scores, heatmap_png=False, progress=False,
                       config=ImportanceConfig(samples=16, seq_len=seq_len, batch_size=8, device="cpu"))
    run_prune("demo", scores, out, PruneConfig(target="ffn=768", device="cpu"), progress=False)
    return out


def run_case(student: str, out: str, steps: int, micro_batch: int, seq_len: int, eval_blocks: int,
             teacher_logits: str | None, semantics: str, threads: int | None) -> dict[str, Any]:
    """One training run in this (fresh) process; returns its metrics."""
    from minitron_fast.distill import load_config, train
    from minitron_fast.distill.trainer import read_metrics

    import torch

    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.models.loading import load_model, load_tokenizer

    # the trainer's own held-out loss would also run at step 0 (the same for every run): the
    # exported student is evaluated once instead
    ov = [f"student={student}", f"out={out}", f"steps={steps}", f"micro_batch_size={micro_batch}", "grad_accum=1",
          f"data.seq_len={seq_len}", f"data.max_blocks={steps * micro_batch}", "data.eval_blocks=0",
          "lr=3e-4", "min_lr=3e-5", "warmup_steps=2", f"save_every={10**6}", "export=true",
          "ds.zero_stage=1", f"loss.topk_semantics={semantics}"]
    ov += [f"teacher_logits={teacher_logits}"] if teacher_logits else ["teacher=demo"]
    if threads:
        ov.append(f"threads={threads}")
    train(load_config(None, ov), progress=False)
    recs = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]
    peak = max(r["peak_mem_mb"] for r in recs)  # before the evaluation below loads a second copy
    model = load_model(Path(out) / "final")
    heldout = token_blocks(load_tokenizer(student), "demo", "heldout", seq_len, max_blocks=eval_blocks)
    with torch.no_grad():
        loss = lm_loss(model, heldout, batch_size=micro_batch, progress=False)
    return {"ok": True, "losses": [r["loss"] for r in recs], "step_s": [r["step_s"] for r in recs],
            "peak_mb": peak, "eval_loss": float(loss)}


def write_case(out: str, k: int, samples: int, seq_len: int, threads: int | None) -> dict[str, Any]:
    from minitron_fast.teacher_logits import TeacherLogitsConfig, write_teacher_logits

    if threads:
        import torch

        torch.set_num_threads(threads)
    m = write_teacher_logits("demo", "demo", out=out, progress=False,
                             config=TeacherLogitsConfig(top_k=k, seq_len=seq_len, samples=samples, device="cpu"))
    return {"ok": True, "bytes_per_token": m["bytes_per_token"], "write_s": m["write_seconds"],
            "tokens": m["n_blocks"] * m["rows_per_block"]}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.common import work_dir

    with work_dir(args.workdir, "offline_teacher-") as work:
        return _run(args, work)


def _run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from bench.common import run_in_subprocess

    steps, mb, T, ev = args.steps, args.micro_batch, args.seq_len, args.eval_blocks
    ks = [int(x) for x in str(args.ks).split(",") if x.strip()]
    sems = [s.strip() for s in str(args.semantics).split(",") if s.strip()]
    if args.quick:
        steps, mb, T, ev, ks = 3, 2, 128, 2, [8, 64]
    student = build_student(work, T)
    case = f"smollm2-135m->ffn768 {steps}x{mb}x{T} tokens"
    common = dict(student=str(student), steps=steps, micro_batch=mb, seq_len=T, eval_blocks=ev, threads=args.threads)

    def train_row(impl: str, logits: str | None, semantics: str, extra: dict[str, Any]) -> dict[str, Any]:
        out = work / f"run-{impl}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_in_subprocess("bench.offline_teacher:run_case",
                              dict(common, out=str(out), teacher_logits=logits, semantics=semantics), timeout=3600)
        row: dict[str, Any] = {"case": case, "impl": impl, "steps": steps, "micro_batch": mb, "seq_len": T,
                               "tokens": steps * mb * T, **extra}
        if not r.get("ok"):
            return dict(row, ok=False, error=r.get("error", "")[-500:])
        times = sorted(r["step_s"][1:] or r["step_s"])
        q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
        med = statistics.median(times)
        finite = all(math.isfinite(x) for x in r["losses"]) and math.isfinite(r["eval_loss"])
        return dict(row, median_s=med, p20_s=q[0], p80_s=q[3], tokens_per_s=mb * T / med, peak_mb=r["peak_mb"],
                    ppl=math.exp(r["eval_loss"]), first_loss=r["losses"][0], final_loss=r["losses"][-1], ok=finite)

    rows = [train_row("online", None, "tail", {"bytes_per_token": 0, "k": None})]
    online = rows[0]
    for k in ks:
        logits = work / f"logits-k{k}"
        shutil.rmtree(logits, ignore_errors=True)
        w = run_in_subprocess("bench.offline_teacher:write_case",
                              dict(out=str(logits), k=k, samples=steps * mb, seq_len=T, threads=args.threads),
                              timeout=3600)
        if not w.get("ok"):
            rows += [dict(case=case, impl=f"offline_k{k}_{s}", ok=False, error=w.get("error", "")[-500:]) for s in sems]
            continue
        for s in sems:
            row = train_row(f"offline_k{k}_{s}", str(logits), s, {"k": k, "semantics": s,
                                                                   "bytes_per_token": w["bytes_per_token"],
                                                                   "write_s": w["write_s"]})
            if row["ok"] and s == "tail" and online.get("ok"):  # data processing inequality (fp32 slack)
                row["ok"] = row["first_loss"] <= online["first_loss"] * (1 + 1e-4) + 1e-6
            rows.append(row)
    if online.get("ok"):
        for r in rows[1:]:
            if r.get("ok"):
                r["ppl_vs_online"] = r["ppl"] / online["ppl"]
                r["peak_vs_online"] = r["peak_mb"] / online["peak_mb"]
                r["speed_vs_online"] = r["tokens_per_s"] / online["tokens_per_s"]
    return rows


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("ok") and r.get("ppl")]
    if not ok:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [r["impl"].replace("offline_", "") for r in ok]
    colors = ["tab:gray" if r["impl"] == "online" else "tab:blue" if r["impl"].endswith("renorm") else "tab:green"
              for r in ok]
    for ax, key, label in zip(axes, ("ppl", "peak_mb", "tokens_per_s"),
                              ("held-out perplexity", "peak RSS (MB)", "tokens / s (training step)")):
        ax.bar(names, [r[key] for r in ok], color=colors)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45)
    axes[0].axhline(ok[0]["ppl"] * 1.02, color="k", ls=":", lw=1)
    fig.suptitle(f"offline top-k teacher vs online, SmolLM2-135M -> FFN 768 ({ok[0]['tokens']:,} tokens)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
