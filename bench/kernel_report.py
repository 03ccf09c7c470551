"""Ahead-of-time compilation report for every Triton kernel in ``kernels/*.py`` (their ``AOT_SPECS``).

Compiles each spec for sm_80 (A100) and sm_90 (H100) on this machine, which needs no GPU:
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``, then
reads the cubin with the ``cuobjdump`` shipped inside the triton wheel
(``triton/backends/nvidia/bin/``): registers, stack (spill) bytes and shared memory from
``--dump-resource-usage``, and whether the SASS holds ``HGMMA`` (sm_90's wgmma tensor-core path)
or ``HMMA`` (mma.sync). One row per kernel, config and architecture; ``ok`` is false when the
compile fails. Rows carry ``median_s`` = compile time.

    python -m bench kernel_report [--only SUBSTRING] [--arch 80 90] [--json FILE]
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import tempfile
import time
from pathlib import Path

HELP = "compile every kernels/*.py AOT_SPECS kernel for sm_80/sm_90; registers, spills, smem, HGMMA"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default=None, help="only specs whose name contains this substring")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default: 80 90)")
    p.add_argument("--module", default=None, help="only this kernels module (e.g. kd_loss)")


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def kernel_modules() -> list[str]:
    """Names of the ``minitron_fast.kernels`` submodules (the top-level ``kernels/`` folder)."""
    import minitron_fast.kernels as kpkg

    return sorted(m.name for m in pkgutil.iter_modules(kpkg.__path__) if not m.name.startswith("_"))


def collect_specs(module: str | None = None, only: str | None = None) -> list[tuple[str, dict]]:
    out = []
    for name in kernel_modules():
        if module and name != module:
            continue
        mod = importlib.import_module(f"minitron_fast.kernels.{name}")
        for spec in getattr(mod, "AOT_SPECS", []) or []:
            if only and only not in spec["name"]:
                continue
            out.append((name, spec))
    return out


def parse_resource_usage(text: str) -> dict:
    """``REG:40 STACK:0 SHARED:0 LOCAL:0 ...`` lines of ``cuobjdump --dump-resource-usage``."""
    res = {}
    for key, field in (("REG", "registers"), ("STACK", "stack_bytes"), ("SHARED", "smem_bytes"),
                       ("LOCAL", "local_bytes")):
        m = re.search(rf"\b{key}:(\d+)", text)
        res[field] = int(m.group(1)) if m else None
    return res


def compile_spec(spec: dict, arch: int) -> dict:
    """Compiles one spec for ``sm_<arch>``; returns the report fields (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("kernel is not a JITFunction (TRITON_INTERPRET=1 is set?)")
    constexprs = dict(spec.get("constexprs", {}))
    sig = dict(spec["signature"])
    for k in constexprs:  # accept signatures with or without the constexpr entries
        sig.setdefault(k, "constexpr")
    sig = {n: sig[n] for n in fn.arg_names if n in sig}
    missing = [n for n in fn.arg_names if n not in sig]
    if missing:
        raise ValueError(f"signature lacks {missing}")
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    opts = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    t0 = time.perf_counter()
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    dt = time.perf_counter() - t0
    cubin = ck.asm["cubin"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        ru = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "--dump-sass", path], capture_output=True, text=True).stdout
    res = parse_resource_usage(ru)
    res.update({
        "compile_s": dt,
        # strings, not bools: the driver's table prints a False bool as "FAILED"
        "hgmma": "yes" if "HGMMA" in sass else "no",
        "hmma": "yes" if "HMMA" in sass else "no",
    })
    return res


def run(args) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("kernel_report compiles for real GPUs: unset TRITON_INTERPRET")
    rows = []
    for module, spec in collect_specs(getattr(args, "module", None), getattr(args, "only", None)):
        for arch in args.arch:
            row = {"case": f"{module}:{spec['name']}", "impl": f"sm_{arch}", "num_warps": spec.get("num_warps", 4),
                   "num_stages": spec.get("num_stages", 3)}
            try:
                r = compile_spec(spec, arch)
                row.update(r)
                row["median_s"] = row["p20_s"] = row["p80_s"] = r["compile_s"]
                row["spills"] = "yes" if ((r["stack_bytes"] or 0) > 0 or (r["local_bytes"] or 0) > 0) else "no"
                row["ok"] = True
            except Exception as exc:  # a kernel that does not compile is a failed row, not a crash
                row["ok"] = False
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            row["flops"] = spec.get("flops")
            row["min_bytes"] = spec.get("min_bytes")
            rows.append(row)
            print(f"  {row['case']} sm_{arch}: " + (
                f"REG {row.get('registers')} STACK {row.get('stack_bytes')} SMEM {row.get('smem_bytes')} "
                f"HGMMA {row.get('hgmma')}" if row["ok"] else f"FAILED {row['error']}"), flush=True)
    return rows


def plot(rows: list[dict], png_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("ok") and r.get("registers") is not None]
    if not ok:
        return
    labels = [f"{r['case'].split(':', 1)[1]} {r['impl']}" for r in ok]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.25 * len(ok))))
    colors = ["tab:red" if r.get("spills") == "yes" else "tab:blue" for r in ok]
    ax.barh(range(len(ok)), [r["registers"] for r in ok], color=colors)
    ax.set_yticks(range(len(ok)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.axvline(255, color="k", lw=0.5)
    ax.set_xlabel("registers per thread (red: spills)")
    ax.set_title("Triton kernels compiled ahead of time")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
