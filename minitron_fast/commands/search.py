"""``minitron-fast search --model PATH|demo --scores FILE --params BUDGET [--out DIR]``: candidate
shapes at a parameter budget, each pruned, briefly retrained by KD and ranked by held-out loss;
prints the table and writes the winner's plan (``DIR/plan.json``, usable by ``prune``)."""
from __future__ import annotations

import argparse

HELP = "search student shapes at a parameter budget: prune, briefly retrain by KD, rank, write the winner's plan"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="teacher: HF checkpoint directory, or 'demo'")
    p.add_argument("--scores", required=True, help="importance scores file (minitron-fast importance)")
    p.add_argument("--params", required=True, help="budget: 4.5e9, 4.5B, 90M, or 0.7x (a fraction of the teacher)")
    p.add_argument("--out", default="runs/search", help="writes plan.json, search.json, table.txt here (default runs/search)")
    p.add_argument("--tolerance", type=float, default=0.05, help="candidates within this fraction below the budget")
    p.add_argument("--kinds", default="width,depth,mixed", help="comma-separated: width, depth, mixed")
    p.add_argument("--multiple", type=int, default=None, help="hidden/FFN multiple (default 64, or 8 below hidden 1024)")
    p.add_argument("--max-candidates", type=int, default=3, help="candidates per kind (default 3)")
    p.add_argument("--no-head-pruning", action="store_true", help="keep every query head")
    p.add_argument("--retrain-tokens", type=int, default=8192, help="KD tokens per candidate (default 8192; 0: rank right after pruning)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="blocks per retraining step (default 4)")
    p.add_argument("--lr", type=float, default=2e-4, help="retraining learning rate (default 2e-4)")
    p.add_argument("--lora-rank", type=int, default=0, help="retrain with LoRA of this rank through peft (default 0: full)")
    p.add_argument("--data", default="demo", help="text source (default demo)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--eval-blocks", type=int, default=4, help="held-out blocks for ranking (default 4)")
    p.add_argument("--depth-metric", default="block_importance", choices=["block_importance", "lm_loss"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    import torch

    from minitron_fast.errors import MinitronError
    from minitron_fast.io import check_output, same_or_inside
    from minitron_fast.models import view_class_for_config
    from minitron_fast.models.loading import check_seq_len, load_config, resolve_model_path
    from minitron_fast.pipeline.recipe import parse_budget
    from minitron_fast.search import run_search

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.model)
    if args.model != "demo" and same_or_inside(args.out, resolve_model_path(args.model)):
        raise MinitronError(f"--out {args.out} lies inside the input model directory; choose another --out")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise MinitronError(f"--out {args.out} is a file; pass a directory (it receives plan.json, search.json, "
                            "table.txt)")
    for name in ("plan.json", "search.json", "table.txt"):  # the files it writes: never an input
        check_output(Path(args.out) / name, inputs=[args.scores, args.data], kind="--out", allow_existing_file=True)
    check_seq_len(config, args.seq_len)
    if args.max_candidates < 1:
        raise MinitronError(f"--max-candidates must be at least 1, got {args.max_candidates}")
    for name in ("micro_batch_size", "eval_blocks", "seq_len"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            raise MinitronError(f"--{name.replace('_', '-')} must be at least {2 if name == 'seq_len' else 1}, "
                                f"got {getattr(args, name)}")
    if args.retrain_tokens < 0 or not math.isfinite(args.lr) or args.lr <= 0:
        raise MinitronError("--retrain-tokens must be >= 0 and --lr a finite positive number")
    full = view_class_for_config(config).count_params(config)["total"]
    budget = parse_budget(args.params, full)
    steps = args.retrain_tokens // (args.micro_batch_size * args.seq_len)
    res = run_search(args.model, args.scores, budget, out_dir=args.out, tolerance=args.tolerance,
                     kinds=[k.strip() for k in args.kinds.split(",") if k.strip()], multiple=args.multiple,
                     max_per_kind=args.max_candidates, retrain_steps=steps, micro_batch_size=args.micro_batch_size,
                     lr=args.lr, lora_rank=args.lora_rank, data=args.data, seq_len=args.seq_len,
                     eval_blocks=args.eval_blocks, depth_metric=args.depth_metric,
                     prune_heads=not args.no_head_pruning)
    print(f"wrote {res['plan']} (the winner's plan: minitron-fast prune --plan ... or run it with prune)")
    return 0
