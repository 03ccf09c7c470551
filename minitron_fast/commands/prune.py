"""``minitron-fast prune --model PATH|demo --scores FILE --target ... --out DIR [--streaming] [--plan-only]``."""
from __future__ import annotations

import argparse

HELP = "prune a model to a target shape (width and depth) from importance scores; writes an HF checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF checkpoint directory, or 'demo' for the embedded SmolLM2-135M")
    p.add_argument("--scores", default=None, help="importance scores (safetensors from `minitron-fast importance`); "
                   "needed unless --plan is given")
    p.add_argument("--target", default=None,
                   help="target shape, e.g. hidden=3072,ffn=9216,heads=32,kv_heads=8,layers=32 (missing keys keep "
                   "the source value), or a budget params=4.5e9 / params=0.5x")
    p.add_argument("--plan", default=None, help="use this plan JSON instead of --scores/--target")
    p.add_argument("--out", default=None, help="output checkpoint directory (or, with --plan-only, the plan JSON path)")
    p.add_argument("--streaming", action="store_true",
                   help="prune straight from the safetensors shards, reading only kept slices (model larger than RAM)")
    p.add_argument("--plan-only", action="store_true", help="write the plan JSON and stop")
    p.add_argument("--depth-metric", default="block_importance", choices=("block_importance", "lm_loss", "lm_loss_block"),
                   help="depth score used to choose layers (default block_importance)")
    p.add_argument("--depth-mode", default="contiguous", choices=("contiguous", "top"),
                   help="remove the best contiguous block of layers (default) or keep the top layers")
    p.add_argument("--budget-axes", default="width", choices=("width", "ffn", "depth"),
                   help="axes a params= budget shrinks (default width: hidden and FFN)")
    p.add_argument("--impl", default="auto", choices=("auto", "cpp", "torch"), help="in-place compaction backend")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minitron_fast.errors import MinitronError
    from minitron_fast.io import check_output
    from minitron_fast.models import view_class_for_config
    from minitron_fast.models.loading import load_config, resolve_model_path
    from minitron_fast.prune import Plan, make_plan, prune_checkpoint, validate_plan

    config = load_config(args.model)
    src = resolve_model_path(args.model)
    if args.out:  # never over an input (model, scores, plan), checked before any work
        check_output(args.out, inputs=[src, args.scores, args.plan], want="file" if args.plan_only else "dir",
                     overwrite=args.overwrite)
    if args.plan:
        plan = Plan.load(args.plan)
        validate_plan(plan, config)
    else:
        if not args.scores or not args.target:
            raise MinitronError("pass --scores FILE and --target SHAPE (or --plan PLAN.json)")
        plan = make_plan(config, args.scores, args.target, depth_metric=args.depth_metric,
                         depth_mode=args.depth_mode, budget_axes=args.budget_axes)
    view_cls = view_class_for_config(config)
    before = view_cls.count_params(config)["total"]
    after = view_cls.count_params(config, plan.target_geometry())["total"]
    print(f"plan: {plan.summary()}")
    print(f"parameters: {before:,} -> {after:,} ({after / before:.1%})")
    if args.plan_only:
        if not args.out:
            print(json_dump(plan.to_dict()))
            return 0
        out = Path(args.out)
        plan.save(out)
        print(f"wrote plan {out}")
        return 0
    if not args.out:
        raise MinitronError("pass --out DIR for the pruned checkpoint (or --plan-only)")
    out = prune_checkpoint(src, plan, args.out, streaming=args.streaming, overwrite=args.overwrite,
                           scores_file=args.scores, impl=args.impl)
    print(f"wrote {out} ({'streaming' if args.streaming else 'in memory'})")
    return 0


def json_dump(obj) -> str:
    import json

    return json.dumps(obj, indent=2)
