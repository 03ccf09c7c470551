"""``minitron-fast distill --config recipe.yaml [--nproc N] [--resume] [key=value ...]``.

With ``--nproc 1`` (the default) the trainer runs in this process as a world of one; with more
processes, or a ``--hostfile``, this command starts DeepSpeed's launcher for you:
``deepspeed --num_gpus N --module minitron_fast.distill --config ... [key=value ...]`` (on a
machine without CUDA with ``DS_ACCELERATOR=cpu``, gloo). The recipe is validated here first, so a
bad key fails in one line before any process starts.
"""
from __future__ import annotations

import argparse
import subprocess



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML recipe (docs/distill.md lists the keys)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this node (GPUs, or CPU ranks with gloo); >1 starts the deepspeed launcher")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for a multi-node launch")
    p.add_argument("--launcher-args", default="", help="extra arguments for the deepspeed launcher (one quoted string)")
    p.add_argument("--resume", action="store_true", help="continue the run in the recipe's out directory")
    p.add_argument("--mode", choices=("distill", "correct-teacher"), default=None, help="shorthand for mode=...")
    p.add_argument("--print-config", action="store_true", help="print the validated recipe and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides, e.g. steps=100 loss.temperature=2 ds.zero_stage=3")


def run(args: argparse.Namespace) -> int:
    from minitron_fast.distill.config import dump_config, load_config
    from minitron_fast.errors import MinitronError

    overrides = list(args.overrides) + ([f"mode={args.mode}"] if args.mode else [])
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.nproc < 1:
        raise MinitronError(f"--nproc must be at least 1, got {args.nproc}")
    if args.hostfile:  # DeepSpeed's launcher only warns about a missing hostfile, then trains on one node
        from pathlib import Path

        if not Path(args.hostfile).is_file():
            raise MinitronError(f"--hostfile {args.hostfile} does not exist; pass a DeepSpeed hostfile "
                                "(lines 'host slots=N'), or leave it out for this node only")
    if args.nproc == 1 and not args.hostfile:
        from minitron_fast.distill import train

        res = train(cfg, resume=args.resume)
        parts = [f"{k} {res[k]:.4f}" for k in ("final_loss", "eval_loss") if res.get(k) is not None]
        print(f"{cfg.mode} done" + (": " + ", ".join(p.replace("_", " ") for p in parts) if parts else
                                    " (nothing left to train)") + f"; outputs in {cfg.out}")
        return 0
    import shlex

    from minitron_fast.distill.launch import launcher_env, trainer_command

    cmd = trainer_command(args.config, num_procs=args.nproc, launcher="deepspeed", resume=args.resume,
                          hostfile=args.hostfile, launcher_args=shlex.split(args.launcher_args or ""),
                          overrides=overrides)
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=launcher_env(cfg.device)).returncode
