"""``minitron-fast demo [--out runs/demo]``: the README's main job. Runs the shipped ``demo``
recipe end to end on the embedded SmolLM2-135M teacher and the standard library's pydoc text:
teacher correction, importance, width pruning, logit distillation on the DeepSpeed engine, a
same-shape student trained from scratch on the same tokens, evaluation and export. Writes
``report.md``, ``report.json`` and PNGs into ``--out`` and ends by printing the table.

Stages are cached in ``--out``: a rerun reuses what is done (``--redo STAGE`` forces one).
"""
from __future__ import annotations

import argparse



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap the distillation tokens (and scale teacher correction alike) for a quicker run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--redo", default="", help="comma-separated stages to rerun even when cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="demo recipe overrides, e.g. distill.steps=8")


def demo_overrides(max_tokens: int | None, threads: int | None, overrides: list[str]) -> list[str]:
    """``--max-tokens``/``--threads`` as recipe overrides (explicit key=value ones win)."""
    from minitron_fast.errors import MinitronError
    from minitron_fast.pipeline.recipe import load_recipe

    extra: list[str] = []
    if threads:
        extra.append(f"threads={threads}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise MinitronError(f"--max-tokens must be positive, got {max_tokens}")
        r = load_recipe("demo", overrides)
        d, c = r.distill, r.correct_teacher
        steps = max(1, max_tokens // (d.micro_batch_size * d.grad_accum * r.data.seq_len))
        extra.append(f"distill.steps={steps}")
        if c.enabled and steps < d.steps:
            extra.append(f"correct_teacher.steps={max(1, round(c.steps * steps / d.steps))}")
        extra.append(f"distill.warmup_steps={min(d.warmup_steps, max(0, steps - 1))}")
    return extra + list(overrides)


def run(args: argparse.Namespace) -> int:
    import time

    from minitron_fast.commands.run import print_summary
    from minitron_fast.errors import MinitronError
    from minitron_fast.pipeline.recipe import load_recipe
    from minitron_fast.pipeline.table import STAGES
    from minitron_fast.pipeline.runner import run_recipe

    t0 = time.perf_counter()
    recipe = load_recipe("demo", demo_overrides(args.max_tokens, args.threads, args.overrides))
    redo = tuple(s.strip() for s in args.redo.split(",") if s.strip())
    bad = [s for s in redo if s not in STAGES]
    if bad:
        raise MinitronError(f"--redo {','.join(bad)}: unknown stage; stages are {', '.join(STAGES)}")
    print("== minitron-fast demo: SmolLM2-135M-Instruct teacher (embedded), pydoc_data text, CPU ==", flush=True)
    print(f"   prune to {recipe.prune.target}; distill {recipe.distill.steps} steps; "
          f"results in {args.out}", flush=True)
    res = run_recipe(recipe, out=args.out, redo=redo, progress=not args.no_progress)
    print_summary(res)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
