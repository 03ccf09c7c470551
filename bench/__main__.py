"""``python -m bench NAME [--json FILE] [--quick] [...]``: run one benchmark (or ``all``).

Each benchmark is a module ``bench/<name>.py`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> list[dict]`` returning result rows (DESIGN.md, Benchmark results), and optionally
``plot(rows, png_path)``. This driver adds the ``meta`` block, refuses to report numbers of rows
whose correctness check failed, prints a table, and writes the JSON (and PNG beside it).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bench.common import finalize_rows, format_rows, meta, write_results

# name -> module. Order is the order `all` runs them in.
BENCHES: dict[str, str] = {
    "kernel_report": "bench.kernel_report",
    "kd_loss": "bench.kd_loss",
    "importance": "bench.importance",
    "importance_quality": "bench.importance_quality",
    "prune": "bench.prune",
    "distill_step": "bench.distill_step",
    "offline_teacher": "bench.offline_teacher",
    "paper_claims": "bench.paper_claims",
    "scale": "bench.scale",
    "peers": "bench.peers",
    "trl_trainer": "bench.trl_trainer",
    # needs a CUDA GPU (its CPU rehearsal is `python -m bench device_check --tiny`); `all` runs it
    # only where one is visible
    "device_check": "bench.device_check",
}
GPU_ONLY = ("device_check",)


def _available() -> dict[str, str]:
    here = Path(__file__).parent
    return {n: m for n, m in BENCHES.items() if (here / f"{m.split('.')[-1]}.py").exists()}


def main(argv: list[str] | None = None) -> int:
    benches = _available()
    parser = argparse.ArgumentParser(prog="python -m bench", description="minitron_fast benchmarks")
    sub = parser.add_subparsers(dest="name", metavar="NAME")
    for name, mod in benches.items():
        m = importlib.import_module(mod)
        p = sub.add_parser(name, help=getattr(m, "HELP", ""), description=getattr(m, "HELP", ""))
        p.add_argument("--json", type=Path, default=None, help="write {meta, rows} JSON here (PNG plot beside it)")
        p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (smoke run)")
        m.add_arguments(p)
        p.set_defaults(_module=m)
    from bench import suite

    p_all = sub.add_parser("all", help=suite.HELP, description=suite.__doc__)
    suite.add_arguments(p_all)
    args = parser.parse_args(argv)
    if not args.name:
        parser.print_help()
        return 2
    if args.name == "all":
        return suite.run_all(args, benches, GPU_ONLY)
    rows = finalize_rows(args._module.run(args), bench=args.name)
    print(format_rows(rows))
    if args.json:
        # a benchmark may leave run-wide facts (data sets, budgets) in args.bench_meta
        write_results(args.json, {"meta": dict(meta(), **(getattr(args, "bench_meta", None) or {})), "rows": rows})
        plot = getattr(args._module, "plot", None)
        if plot is not None and rows:
            plot(rows, args.json.with_suffix(".png"))
        print(f"wrote {args.json}")
    # a row that could not run at all (``ran: False``: a peer not installed, or crashing) says why in
    # its note; it is not a failed correctness check
    return 0 if all(r.get("ok", True) or r.get("ran") is False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
