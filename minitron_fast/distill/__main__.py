"""``python -m minitron_fast.distill --config recipe.yaml [--resume] [key=value ...]``.

One rank of a distillation / teacher-correction job. Launch several with DeepSpeed::

    deepspeed --num_gpus 8 --module minitron_fast.distill --config recipe.yaml steps=1000
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module minitron_fast.distill --config recipe.yaml

(``--local_rank``, which the launcher appends, is accepted and ignored: the rank comes from the
environment.) Started alone it runs as a world of one.
"""
from __future__ import annotations

import argparse
import logging
import sys

from minitron_fast.errors import MinitronError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minitron_fast.distill",
                                description="distillation / teacher correction on DeepSpeed ZeRO (one rank)")
    p.add_argument("--config", default=None, help="YAML recipe (see docs/distill.md)")
    p.add_argument("--resume", action="store_true", help="continue the run in the recipe's out directory")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. steps=100 loss.temperature=2")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from minitron_fast.distill import load_config, train

        cfg = load_config(args.config, args.overrides)
        res = train(cfg, resume=args.resume, progress=not args.no_progress)
    except MinitronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"done: {res}")
    return 0


if __name__ == "__main__":
    from minitron_fast.distill.engine import exit_process

    exit_process(main())  # every output is written; skip the interpreter's teardown (see exit_process)
