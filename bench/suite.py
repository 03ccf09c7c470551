"""``python -m bench all [--quick] [--out DIR] [--only a,b] [--skip a,b]``: every registered
benchmark, each in its own process (``python -m bench NAME --json DIR/NAME.json``), then one
summary: ``DIR/summary.md`` (the machine, one markdown table per benchmark, its plot) and
``DIR/summary.png`` (median time of every row, one panel per benchmark). A benchmark that fails
or times out is listed as such; the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import fmt_cell
from minitron_fast.io import save_figure

HELP = "run every benchmark (fresh process each) and write a summary markdown + plot"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder (default bench/results)")
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke run)")
    p.add_argument("--only", default="", help="comma-separated benchmarks to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark (default 3600)")


def _cell(v: Any) -> str:
    return fmt_cell(v).replace("|", "/")  # a markdown table cell


def rows_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    keys = ["case", "impl", "median_s", "p20_s", "p80_s", "peak_mb", "ok"]
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and k not in ("bench", "error")
                 and not isinstance(v, (dict, list))]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(meta: dict[str, Any]) -> str:
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    return (f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('mem_gb')} GiB, GPU: {m.get('gpu') or 'none'}); "
            f"torch {v.get('torch')}, transformers {v.get('transformers')}, deepspeed {v.get('deepspeed')}; "
            f"commit {meta.get('commit')}, {meta.get('time')}")


def plot_summary(results: dict[str, dict[str, Any]], png: Path) -> Path | None:
    panels = [(n, [r for r in res.get("rows", []) if isinstance(r.get("median_s"), (int, float))])
              for n, res in results.items()]
    panels = [(n, rows) for n, rows in panels if rows]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.2 + 0.28 * sum(len(r) for _, r in panels) + 0.6 * len(panels)),
                             squeeze=False, gridspec_kw={"height_ratios": [max(1, len(r)) for _, r in panels]})
    for ax, (name, rows) in zip(axes[:, 0], panels):
        labels = [f"{r.get('case')} / {r.get('impl')}" for r in rows]
        ax.barh(range(len(rows)), [r["median_s"] for r in rows], color="tab:blue")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("median seconds (log scale)")
    fig.tight_layout()
    return save_figure(fig, png)


def run_all(args: argparse.Namespace, benches: dict[str, str], gpu_only: tuple[str, ...] = ()) -> int:
    """Runs ``benches`` (name -> module) each in its own process; ``gpu_only`` are left out where
    no CUDA GPU is visible."""
    from bench.common import meta

    names = [n for n in benches if n != "all"]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [s for s in [*only, *skip] if s not in names]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; registered: {', '.join(names)}", file=sys.stderr)
        return 2
    names = [n for n in (only or names) if n not in skip]
    import torch

    if not torch.cuda.is_available():
        left_out = [n for n in names if n in gpu_only]
        if left_out:
            print(f"== no CUDA GPU: leaving out {', '.join(left_out)} (its CPU rehearsal: python -m bench "
                  f"{left_out[0]} --tiny)", flush=True)
        names = [n for n in names if n not in gpu_only]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: dict[str, dict[str, Any]] = {}
    status: dict[str, str] = {}
    for name in names:
        path = out / f"{name}.json"
        cmd = [sys.executable, "-m", "bench", name, "--json", str(path)] + (["--quick"] if args.quick else [])
        print(f"== bench {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=root, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
        dt = time.perf_counter() - t0
        if path.is_file():
            results[name] = json.loads(path.read_text())
        status[name] = ("timed out" if rc is None else "ok" if rc == 0 else
                        "some rows failed their correctness check" if rc == 1 and path.is_file() else f"failed (exit {rc})")
        status[name] += f", {dt:.0f} s"
        print(f"== bench {name}: {status[name]}", flush=True)

    m = meta()
    lines = ["# minitron_fast benchmark summary", "", f"Machine: {machine_line(m)}.", "",
             "Each benchmark ran in its own process" + (" with --quick (smoke sizes)" if args.quick else "") +
             "; numbers are from that one run on this machine.", "", "| benchmark | status |", "|---|---|"]
    lines += [f"| {n} | {s} |" for n, s in status.items()]
    png = plot_summary(results, out / "summary.png")
    if png:
        lines += ["", f"![median time of every row]({png.name})"]
    for name in names:
        lines += ["", f"## {name}", ""]
        if name not in results:
            lines.append(f"No results ({status[name]}).")
            continue
        lines.append(rows_markdown(results[name].get("rows", [])))
        if (out / f"{name}.png").is_file():
            lines += ["", f"![{name}]({name}.png)"]
    tmp = out / ".summary.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "summary.md")
    print(f"wrote {out / 'summary.md'}" + (f" and {png}" if png else ""))
    return 0 if all(s.startswith("ok") for s in status.values()) else 1
