"""``minitron-fast info --model PATH|demo [--json]``."""
from __future__ import annotations

import argparse
import json

from minitron_fast.commands import add_model_argument



def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def model_info(model: str) -> dict:
    """The info record of ``model``, from its config alone (built on the meta device: no weights
    are read, so this is instant even for a 70B checkpoint)."""
    from minitron_fast.models import get_view
    from minitron_fast.models.loading import load_config, meta_model

    view = get_view(meta_model(load_config(model)))
    return view.info()


def format_table(rows: list[tuple[str, object]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v:,}" if isinstance(v, int) else f"{k:<{w}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info))
    else:
        print(format_table(list(info.items())))
    return 0
