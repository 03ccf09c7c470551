"""``minitron-fast importance --model PATH|demo --data PATH|demo --out scores.safetensors [...]``."""
from __future__ import annotations

import argparse

HELP = "activation importance of heads, KV groups, neurons, channels and layers -> scores.safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory, or 'demo' for the embedded SmolLM2-135M")
    p.add_argument("--data", default="demo", help="calibration text: .txt/.jsonl file, directory, saved HF dataset, "
                   "or 'demo' (pydoc text); its 'calib' split is used (default demo)")
    p.add_argument("--out", required=True, help="scores file to write (a heatmap PNG is written beside it)")
    p.add_argument("--samples", type=int, default=1024, help="calibration samples (blocks of --seq-len tokens; default 1024)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    p.add_argument("--seq-agg", choices=("mean", "l2", "var"), default="mean", help="aggregation over the sequence (default mean)")
    p.add_argument("--batch-agg", choices=("mean", "l2", "var"), default="l2", help="aggregation over samples (default l2)")
    p.add_argument("--head-score", choices=("input", "output"), default="input",
                   help="query heads by the norm of their output before o_proj (input; the papers') or of their "
                   "contribution after o_proj (output; ranked better on SmolLM2-135M, see docs/importance.md)")
    p.add_argument("--depth-lm-loss", action="store_true",
                   help="also the held-out LM loss with each layer, and each contiguous block, skipped")
    p.add_argument("--depth-block", type=int, default=None, help="block size for --depth-lm-loss (default layers // 4)")
    p.add_argument("--heldout-samples", type=int, default=16, help="held-out samples for --depth-lm-loss (default 16)")
    p.add_argument("--allow-fewer", action="store_true", help="proceed when the data holds fewer samples than --samples")
    p.add_argument("--text-field", default="text", help="JSONL/dataset text field (default text)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--impl", default="auto", choices=("auto", "torch", "triton"),
                   help="statistics implementation: fused Triton kernels on CUDA, torch on CPU (default auto)")
    p.add_argument("--no-heatmap", action="store_true", help="do not write the PNG heatmap")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from minitron_fast.importance.api import run_importance
    from minitron_fast.importance.report import summary

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    scores, paths = run_importance(
        args.model, args.data, out=args.out, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
        seq_agg=args.seq_agg, batch_agg=args.batch_agg, with_depth_lm_loss=args.depth_lm_loss,
        depth_block=args.depth_block, heldout_samples=args.heldout_samples, allow_fewer=args.allow_fewer,
        text_field=args.text_field, dtype=args.dtype, device=args.device, impl=args.impl,
        heatmap_png=not args.no_heatmap, head_score=args.head_score)
    print(summary(scores))
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({time.perf_counter() - t0:.1f} s)")
    return 0
