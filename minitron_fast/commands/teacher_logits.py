"""``minitron-fast teacher-logits --model T --data D --top-k K --seq-len L --out DIR [--samples N]``.

The flags are the fields of :class:`minitron_fast.teacher_logits.TeacherLogitsConfig` (one list
of options: ``top_k`` is ``--top-k``), with their defaults and help.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

HELP = "run the teacher once over the train split and store its top-k logits (offline teacher)"


def _flag_type(tp: typing.Any):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {"int": int, "float": float, "str": str}.get(getattr(base, "__name__", str(base)), str)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minitron_fast.teacher_logits.config import TeacherLogitsConfig

    hints = typing.get_type_hints(TeacherLogitsConfig)
    for f in dataclasses.fields(TeacherLogitsConfig):
        default = f.default
        shown = "" if default is None else f" (default {default})"
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_flag_type(hints[f.name]), default=default,
                       help=f.metadata.get("help", "") + shown)


def run(args: argparse.Namespace) -> int:
    from minitron_fast.teacher_logits import TeacherLogitsConfig, write_teacher_logits

    cfg = TeacherLogitsConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherLogitsConfig)})
    m = write_teacher_logits(cfg, log=print)
    print(f"teacher logits {m['status']}: {m['n_blocks']} blocks x {m['rows_per_block']} tokens, top {m['top_k']}, "
          f"{m['bytes_per_token']:.1f} bytes/token, in {cfg.out}")
    return 0
