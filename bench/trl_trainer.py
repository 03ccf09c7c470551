"""``python -m bench trl_trainer``: TRL's ``DistillationTrainer`` with its own chunked divergence
beside ``minitron_fast.integrations.trl.FusedDistillationTrainer`` (the same trainer, the fused loss
in place of the divergence), on the embedded SmolLM2-135M (issue 25's goal: the step's peak memory
with our loss no higher than with TRL's, the loss curve the same).

Both rows run the same script in a fresh process each: teacher = the embedded SmolLM2-135M-Instruct,
student = a copy of it with FFN 1536 -> 768 (our prune, the demo's student shape), prompts cut from
the embedded text's train split, TRL 1.16's on-policy loop (it always generates: ``generate``,
sampling with the same seed), ``beta`` (JSD 0.5 by default), the same optimizer, seed and
steps. Rows: ``peak_mb`` (the process's ``VmHWM`` after training, minus nothing: load included, the
same for both), ``step_peak_mb`` (the largest RSS rise over the training steps, read by a sampler
thread), ``median_s`` (median step time), ``losses`` (the logged loss per step). ``--quick`` runs a
tiny Llama instead (the smoke test).
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

HELP = "TRL's DistillationTrainer: its own divergence vs ours (FusedDistillationTrainer), peak memory and loss curve"
IMPLS = ("trl", "minitron_fast")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per row (default 3)")
    p.add_argument("--batch", type=int, default=2, help="prompts per step (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=192, help="tokens per prompt (default 192)")
    p.add_argument("--completion", type=int, default=64, help="max_completion_length (default 64)")
    p.add_argument("--beta", type=float, default=0.5, help="TRL's beta: 0 forward KL, 1 reverse KL (default 0.5: JSD)")
    p.add_argument("--impls", default=",".join(IMPLS), help="rows to run (default trl,minitron_fast)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per row")
    p.add_argument("--workdir", type=Path, default=None, help="student checkpoint and outputs (default: a temp dir)")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_case(impl: str, teacher: str, student: str, out: str, steps: int, batch: int, prompt_tokens: int,
             completion: int, beta: float, threads: int | None) -> dict[str, Any]:
    """One row in this (fresh) process: trains ``steps`` steps, returns its memory and losses."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from minitron_fast.data import token_blocks
    from minitron_fast.integrations.trl import FusedDistillationTrainer
    from minitron_fast.io import peak_rss_mb

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(teacher)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    blocks = token_blocks(tok, "demo", "train", prompt_tokens, max_blocks=steps * batch)
    prompts = [tok.decode(b, skip_special_tokens=True) for b in blocks]
    args = DistillationConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, bf16=False,
                              gradient_checkpointing=False, max_completion_length=completion, logging_steps=1,
                              report_to=[], use_cpu=True, beta=beta, learning_rate=1e-5, save_strategy="no", seed=0,
                              disable_tqdm=True)
    t_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    s_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    cls = FusedDistillationTrainer if impl == "minitron_fast" else DistillationTrainer
    samples: list[float] = []
    times: list[float] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(_rss_mb())
            time.sleep(0.02)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    tr = cls(model=s_model, teacher_model=t_model, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
             processing_class=tok, callbacks=[Clock()])
    base = _rss_mb()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        tr.train()
    finally:
        stop.set()
        th.join()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    times.sort()
    return {"ok": bool(losses) and all(x == x for x in losses), "peak_mb": peak_rss_mb(),
            "step_peak_mb": max(samples or [base]) - base, "median_s": times[len(times) // 2] if times else None,
            "losses": losses}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.common import work_dir

    with work_dir(args.workdir, "trl_trainer-") as work:
        return _run(args, work)


def _run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import importlib.util

    from bench.common import make_tiny_teacher, run_in_subprocess

    if importlib.util.find_spec("trl") is None:
        return [{"case": "trl", "impl": i, "ok": False, "ran": False, "note": "not installed: pip install trl"}
                for i in IMPLS]
    steps, batch, pt, comp = args.steps, args.batch, args.prompt_tokens, args.completion
    if args.quick:
        teacher = str(make_tiny_teacher(work / "teacher"))
        steps, batch, pt, comp = 2, 2, 24, 8
    else:
        from minitron_fast.models.embedded import converted_model_path

        teacher = str(converted_model_path())
    student = _student(teacher, work / "student")
    rows = []
    for impl in [s.strip() for s in args.impls.split(",") if s.strip()]:
        r = run_in_subprocess("bench.trl_trainer:run_case", dict(
            impl=impl, teacher=teacher, student=student, out=str(work / f"out-{impl}"), steps=steps, batch=batch,
            prompt_tokens=pt, completion=comp, beta=args.beta, threads=args.threads), timeout=3600)
        rows.append(dict(r, case=f"{'tiny' if args.quick else 'smollm2-135m'} beta={args.beta} B={batch} "
                                 f"prompt={pt} completion={comp} steps={steps}", impl=impl))
    by = {r["impl"]: r for r in rows}
    if "trl" in by and "minitron_fast" in by and by["trl"].get("losses") and by["minitron_fast"].get("losses"):
        a, b = by["trl"]["losses"], by["minitron_fast"]["losses"]
        diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
        by["minitron_fast"]["loss_rel_diff_vs_trl"] = diff
        for k in ("peak_mb", "step_peak_mb"):
            if by["trl"].get(k):
                by["minitron_fast"][f"{k}_vs_trl"] = by["minitron_fast"][k] / by["trl"][k]
    return rows


def _student(teacher: str, out: Path) -> str:
    """The teacher with its FFN halved by our prune (importance from 4 calibration blocks)."""
    import torch

    from minitron_fast.data import token_blocks
    from minitron_fast.importance import compute_importance
    from minitron_fast.models.loading import load_model, load_tokenizer
    from minitron_fast.prune import apply_plan, make_plan

    model = load_model(teacher)
    tok = load_tokenizer(teacher)
    calib = token_blocks(tok, "demo", "calib", 64, max_blocks=4)
    ffn = model.config.intermediate_size // 2
    model = apply_plan(model, make_plan(model, compute_importance(model, calib, progress=False), f"ffn={ffn}"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.manual_seed(0)
    return str(out)
