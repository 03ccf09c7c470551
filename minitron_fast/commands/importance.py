"""``minitron-fast importance --model PATH|demo --data PATH|demo --out scores.safetensors [...]``.

The options are :class:`~minitron_fast.importance.config.ImportanceConfig`'s fields as flags."""
from __future__ import annotations

import argparse

from minitron_fast import configtools
from minitron_fast.commands import add_data_arguments, add_model_argument, add_threads_argument, set_threads
from minitron_fast.importance.config import ImportanceConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    add_data_arguments(p, "calibration text (its calib split; with --depth-lm-loss also its heldout split)")
    p.add_argument("--out", required=True, help="scores file to write (a heatmap PNG is written beside it)")
    configtools.add_arguments(p, ImportanceConfig)
    p.add_argument("--no-heatmap", action="store_true", help="do not write the PNG heatmap")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    import time

    from minitron_fast.importance.api import run_importance
    from minitron_fast.importance.report import summary

    set_threads(args.threads)
    t0 = time.perf_counter()
    scores, paths = run_importance(args.model, args.data, out=args.out,
                                   config=configtools.from_args(ImportanceConfig, args).validate("--"),
                                   text_field=args.text_field, heatmap_png=not args.no_heatmap)
    print(summary(scores))
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({time.perf_counter() - t0:.1f} s)")
    return 0
