"""The ``minitron-fast`` command (also ``python -m minitron_fast``).

Each subcommand lives in ``minitron_fast/commands/<name>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; it parses arguments and calls the stage's
Python API, nothing more. A stage's option flags are derived from its config dataclass
(``configtools.add_arguments``); its one-line help is here, in ``COMMANDS``. Building the parser
imports the command modules and the stage configs, never torch or transformers, so ``--help``
stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from minitron_fast.errors import MinitronError

# name -> (module, one-line help). Order is the order shown by --help: the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("minitron_fast.commands.demo", "run the demo on the embedded SmolLM2-135M teacher and pydoc text"),
    "info": ("minitron_fast.commands.info", "print a model's family, geometry and parameter count"),
    "run": ("minitron_fast.commands.run", "run a recipe: teacher correction, importance, search, prune, distill, evaluate, export (cached per stage)"),
    "importance": ("minitron_fast.commands.importance", "activation importance of heads, KV groups, neurons, channels and layers"),
    "search": ("minitron_fast.commands.search", "search student shapes at a parameter budget: prune, briefly retrain by KD, rank, write the winner's plan"),
    "prune": ("minitron_fast.commands.prune", "prune a model to a target shape from importance scores (width and depth)"),
    "teacher-logits": ("minitron_fast.commands.teacher_logits", "run the teacher once over the train split and store its top-k logits (offline teacher)"),
    "distill": ("minitron_fast.commands.distill", "distill a student from a teacher (or correct the teacher) with DeepSpeed ZeRO"),
    "memory": ("minitron_fast.commands.memory", "per-GPU memory plan of a recipe's training stages (teacher, student, optimizer, activations, KD loss) against a GPU size"),
    "eval": ("minitron_fast.commands.eval", "held-out perplexity of a checkpoint (and lm-evaluation-harness tasks when installed)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minitron-fast",
        description="Minitron structured pruning and knowledge distillation for Hugging Face LLMs. "
        "Pass --model demo to use the embedded SmolLM2-135M teacher.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        _module(module).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(_module(args._module).run(args) or 0)
    except MinitronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
