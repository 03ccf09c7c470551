"""``minitron-fast teacher-logits --model T --data D --top-k K --seq-len L --out DIR [--samples N]``.

The options are :class:`~minitron_fast.teacher_logits.config.TeacherLogitsConfig`'s fields as flags."""
from __future__ import annotations

import argparse

from minitron_fast import configtools
from minitron_fast.commands import add_data_arguments, add_model_argument, add_threads_argument, set_threads
from minitron_fast.teacher_logits.config import TeacherLogitsConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, "the teacher: HF checkpoint directory, or 'demo' for the embedded SmolLM2-135M")
    add_data_arguments(p, "training text (its train split, in block order)")
    p.add_argument("--out", required=True, help="directory to write (rerun the same command to resume a killed write)")
    configtools.add_arguments(p, TeacherLogitsConfig)
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from minitron_fast.teacher_logits import write_teacher_logits

    set_threads(args.threads)
    m = write_teacher_logits(args.model, args.data, out=args.out, text_field=args.text_field,
                             config=configtools.from_args(TeacherLogitsConfig, args).validate("--"), log=print)
    print(f"teacher logits {m['status']}: {m['n_blocks']} blocks x {m['rows_per_block']} tokens, top {m['top_k']}, "
          f"{m['bytes_per_token']:.1f} bytes/token, in {args.out}")
    return 0
