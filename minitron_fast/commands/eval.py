"""``minitron-fast eval --model PATH|demo [--data SRC] [--tasks a,b]``: held-out perplexity, and
lm-evaluation-harness tasks when ``lm_eval`` is installed and the task data is local.

The options are :class:`~minitron_fast.evaluate.config.EvaluateConfig`'s fields as flags."""
from __future__ import annotations

import argparse

from minitron_fast import configtools
from minitron_fast.commands import add_data_arguments, add_model_argument, add_threads_argument, set_threads
from minitron_fast.evaluate.config import EvaluateConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    add_data_arguments(p)
    p.add_argument("--split", default="heldout", choices=["heldout", "calib", "train"], help="split to evaluate (default heldout)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    configtools.add_arguments(p, EvaluateConfig)
    add_threads_argument(p)
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from minitron_fast.evaluate.harness import evaluate_model, format_eval
    from minitron_fast.io import atomic_write_json

    set_threads(args.threads)
    r = evaluate_model(args.model, configtools.from_args(EvaluateConfig, args).validate("--"), data=args.data,
                       split=args.split, seq_len=args.seq_len, text_field=args.text_field)
    print(format_eval(r))
    if args.json:
        atomic_write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0
