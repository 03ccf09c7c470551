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
    args = parse_args(parser, argv)
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
    except OSError as exc:
        msg = os_error_message(exc)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses with the subcommand's ``key=value`` overrides allowed anywhere, also after an
    option (``run demo --out x distill.steps=2``): the subcommand's arguments are parsed with
    argparse's intermixed parsing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    sub = getattr(args, "command", None)
    if rest and sub and sub in argv:
        sub_parser = parser._subparsers._group_actions[0].choices[sub]  # noqa: SLF001
        sub_args = sub_parser.parse_intermixed_args(argv[argv.index(sub) + 1:])
        for k, v in vars(sub_args).items():
            setattr(args, k, v)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def os_error_message(exc: OSError) -> str | None:
    """A one-line message for an OS error the user can fix (disk full, permissions, read-only
    file system); None for others (a bug: keep the traceback)."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}: free some space and rerun (the partial output was removed; "
                "finished outputs are intact)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror}{where}: check the permissions, or choose another path"
    if exc.errno in (errno.EIO, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
        return f"{exc.strerror}{where}"
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
