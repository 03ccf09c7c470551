"""``minitron-fast memory RECIPE [--gpu-mem 80GB] [--world N] [--json FILE] [key=value ...]``.

Prints the per-GPU memory plan of every stage of a pipeline recipe (a shipped name or a YAML
path) that loads a model, in the order the pipeline runs them, or of one trainer recipe
(``configs/distill/*.yaml``). Training stages (``correct_teacher``, ``distill``, ``scratch``):
teacher, student, gradients, optimizer states, activations (with and without activation
checkpointing) and the KD loss's workspace. Stages that load a whole model outside DeepSpeed
(``teacher_eval``, ``teacher_logits``, ``importance``, ``search``, ``prune``, ``evaluate``): its
weights in the stage's dtype, on one GPU or spread over the node's GPUs with ``device_map:
auto``, one forward's activations and the logits it makes. Each with a verdict against
``--gpu-mem`` and the recipe keys to change when the stage does not fit
(``minitron_fast.distill.memory``). Exit status 1 when a stage does not fit.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a shipped recipe name, a pipeline recipe YAML, or a trainer recipe (configs/distill/)")
    p.add_argument("--gpu-mem", default="80GB", help="memory of one GPU (default 80GB)")
    p.add_argument("--world", type=int, default=None,
                   help="ranks (default: launch.num_procs, or the slots of launch.hostfile; 1 for a trainer recipe); "
                        "on one node also the GPUs a device_map: auto stage spreads over")
    p.add_argument("--json", default=None, help="also write the plans as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. distill.micro_batch_size=2")


def run(args: argparse.Namespace) -> int:
    from minitron_fast.distill.memory import plan_recipe
    from minitron_fast.errors import MinitronError
    from minitron_fast.io import atomic_write_json, check_output

    if args.world is not None and args.world < 1:
        raise MinitronError(f"--world must be at least 1, got {args.world}")
    if args.json:  # never over an input (the recipe), checked before any work
        check_output(args.json, inputs=[args.recipe], kind="--json", allow_existing_file=True)
    plans = plan_recipe(args.recipe, list(args.overrides), gpu_mem=args.gpu_mem, world=args.world)
    for p, cfg in plans:
        print(p.render(cfg))
    if args.json:
        atomic_write_json(args.json, [p.to_dict() for p, _ in plans])
    over = [p.stage or p.title for p, _ in plans if p.fits is False]
    if over and len(plans) > 1:
        print(f"does not fit a {plans[0][0].gpu_mem / 1e9:.0f} GB GPU: {', '.join(over)}")
    return 0 if not over else 1
