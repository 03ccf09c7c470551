"""``minitron-fast eval --model PATH|demo [--data SRC] [--tasks a,b]``: held-out perplexity, and
lm-evaluation-harness tasks when ``lm_eval`` is installed and the task data is local."""
from __future__ import annotations

import argparse
import json

HELP = "held-out perplexity of a checkpoint (and lm-evaluation-harness tasks when installed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory, or 'demo' for the embedded SmolLM2-135M")
    p.add_argument("--data", default="demo", help="text: 'demo' (pydoc_data), a .txt/.jsonl file, a directory (default demo)")
    p.add_argument("--split", default="heldout", choices=["heldout", "calib", "train"], help="split to evaluate (default heldout)")
    p.add_argument("--text-field", default="text", help="JSONL/dataset text field (default text)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--eval-blocks", type=int, default=8, help="blocks to evaluate (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward (default 8)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-evaluation-harness tasks: registered names and/or task YAML files "
                        "(needs lm_eval and the task data on this machine)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a directory of lm-evaluation-harness task YAML files (repeatable), as lm_eval's --include_path")
    p.add_argument("--limit", type=int, default=None, help="examples per lm-eval task (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")


def run(args: argparse.Namespace) -> int:
    import torch

    from minitron_fast.evaluate.harness import evaluate_model, format_eval
    from minitron_fast.io import atomic_write_json, check_output
    from minitron_fast.models.loading import resolve_model_path

    if args.json:  # never over an input (the model directory, the data), checked before any work
        check_output(args.json, inputs=[resolve_model_path(args.model), args.data], kind="--json",
                     allow_existing_file=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    r = evaluate_model(args.model, data=args.data, split=args.split, seq_len=args.seq_len,
                       eval_blocks=args.eval_blocks, batch_size=args.batch_size, tasks=tasks, limit=args.limit,
                       include_path=args.include_path,
                       text_field=args.text_field)
    print(format_eval(r))
    if args.json:
        atomic_write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0
