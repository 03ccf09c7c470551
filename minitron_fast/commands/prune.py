"""``minitron-fast prune --model PATH|demo --scores FILE --target ... --out DIR [--no-streaming] [--plan-only]``.

The options are :class:`~minitron_fast.prune.config.PruneConfig`'s fields as flags."""
from __future__ import annotations

import argparse

from minitron_fast import configtools
from minitron_fast.commands import add_model_argument
from minitron_fast.prune.config import PruneConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--scores", default=None, help="importance scores (safetensors from `minitron-fast importance`); "
                   "needed unless --plan is given")
    p.add_argument("--plan", default=None, help="use this plan JSON instead of --scores/--target")
    p.add_argument("--out", default=None, help="output checkpoint directory (or, with --plan-only, the plan JSON path)")
    p.add_argument("--plan-only", action="store_true", help="write the plan JSON and stop")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    configtools.add_arguments(p, PruneConfig)
    # streaming is the default; the flag stays accepted for scripts written when it was not
    p.add_argument("--streaming", dest="streaming", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from minitron_fast.artifacts.plan import Plan, validate_plan
    from minitron_fast.errors import MinitronError
    from minitron_fast.models import view_class_for_config
    from minitron_fast.models.loading import load_config
    from minitron_fast.prune.api import plan_for, run_prune
    from minitron_fast.prune.surgery import pruned_config

    cfg = configtools.from_args(PruneConfig, args).validate("--")
    config = load_config(args.model)
    if args.plan:
        plan = Plan.load(args.plan)
        validate_plan(plan, config)
    else:
        if not args.scores or not cfg.target:
            raise MinitronError("pass --scores FILE and --target SHAPE (or --plan PLAN.json)")
        plan = plan_for(args.model, args.scores, cfg)
    view_cls = view_class_for_config(config)
    before = view_cls.count_params(config)["total"]
    after = view_cls.count_params(pruned_config(config, plan))["total"]  # kept layers' own types (dense or MoE)
    print(f"plan: {plan.summary()}")
    print(f"parameters: {before:,} -> {after:,} ({after / before:.1%})")
    if args.plan_only:
        if not args.out:
            print(json.dumps(plan.to_dict(), indent=2))
            return 0
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise MinitronError(f"{out} already exists; pass --overwrite or choose another --out")
        plan.save(out)
        print(f"wrote plan {out}")
        return 0
    if not args.out:
        raise MinitronError("pass --out DIR for the pruned checkpoint (or --plan-only)")
    _, out = run_prune(args.model, args.scores, args.out, cfg, plan=plan, overwrite=args.overwrite)
    print(f"wrote {out} ({'streaming' if cfg.streaming else 'in memory'})")
    return 0
