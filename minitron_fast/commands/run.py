"""``minitron-fast run RECIPE [key=value ...] [--out DIR] [--redo STAGE,...]``: the whole pipeline
from a recipe (a YAML path or a shipped name: demo, llama3.1-8b-to-4b-width,
llama3.1-8b-to-4b-depth, mistral-nemo-12b-to-8b). Stages whose artifacts exist for the same
inputs are reused, so a rerun resumes."""
from __future__ import annotations

import argparse
import sys



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file, or a shipped recipe name (demo, llama3.1-8b-to-4b-width, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides, e.g. distill.steps=50 prune.target=hidden=512,ffn=1024")
    p.add_argument("--out", default=None, help="run directory (default: the recipe's out)")
    p.add_argument("--redo", default="", help="comma-separated stages to rerun even when cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true", help="check the recipe (as --check), print it and its stages (what each runs and loads, or why it is skipped), run nothing")
    p.add_argument("--check", action="store_true",
                   help="check the whole recipe against the teacher's config (targets, seq_len, dtypes, devices, "
                        "data, outputs, and with --gpu-mem every stage's memory plan), load no weights, run nothing; "
                        "every problem on one line, exit 2 if any (run does the same check before its first stage)")
    p.add_argument("--gpu-mem", default=None, metavar="SIZE",
                   help="GPU memory to plan every stage against, e.g. 80GB (default: the visible GPUs'; none: no "
                        "memory check on a machine without CUDA)")


def run(args: argparse.Namespace) -> int:
    from minitron_fast.errors import MinitronError
    from minitron_fast.pipeline.recipe import dump_recipe, load_recipe
    from minitron_fast.pipeline.table import STAGES, describe

    recipe = load_recipe(args.recipe, args.overrides)
    redo = tuple(s.strip() for s in args.redo.split(",") if s.strip())
    bad = [s for s in redo if s not in STAGES]
    if bad:
        raise MinitronError(f"--redo {','.join(bad)}: unknown stage; stages are {', '.join(STAGES)}")
    from minitron_fast.pipeline.check import check_recipe

    problems = check_recipe(recipe, recipe_ref=args.recipe, overrides=list(args.overrides), out=args.out,
                            gpu_mem=args.gpu_mem)
    if problems:
        for line in problems:
            print(line, file=sys.stderr)
        return 2
    if args.check:
        print(f"ok: {recipe.name} passes every check against {recipe.teacher}"
              + (f" (memory planned for {args.gpu_mem} GPUs)" if args.gpu_mem else ""))
        return 0
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        print("\n" + "\n".join("# " + line for line in describe(recipe).splitlines()))  # still YAML
        return 0
    from minitron_fast.pipeline.runner import run_recipe

    res = run_recipe(recipe, out=args.out, redo=redo, progress=not args.no_progress)
    print_summary(res)
    return 0


def print_summary(res: dict) -> None:
    print()
    print(res["table"])
    if res.get("gap_closed") is not None:
        print(f"distillation closed {res['gap_closed']:.0%} of the held-out loss gap that pruning opened")
    rep = res["report"]
    if rep.get("scratch_ppl") and rep.get("distilled_ppl"):
        print(f"distilled vs from scratch at {rep['tokens']:,} tokens: perplexity {rep['distilled_ppl']:.2f} vs "
              f"{rep['scratch_ppl']:.2f}")
    print(f"wall time {rep['wall_s']:.1f} s; report: {res['paths']['report.md']}")
