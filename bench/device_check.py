"""The GPU day in one command: are the CUDA paths correct, and how fast against what users would pick?

``python -m bench device_check [--json FILE] [--budget-s 420] [--tiny] [--only a,b]``

Runs on one NVIDIA GPU (H100/H200, bf16) and stops starting new work when the budget is spent,
recording every case it skipped and why. Sections, in priority order:

1. ``correctness``: every Triton kernel against its torch reference at real shapes (the KD softmax
   rows for each divergence, with the float64 reference on a slice; the four importance-statistics
   kernels; the compaction gathers). Outputs and, for the KD loss, gradients.
2. ``kd_loss``: forward+backward at N=8,192, Hs=3,072, Ht=4,096, V=128,256 (Llama-3.1-8B -> 4B),
   bf16: ``minitron_fast`` (Triton rows), ``minitron_fast_torch``, ``torch_naive``, Liger's
   ``LigerFusedLinearJSD`` (beta=0) and chunked ``LigerFusedLinearJSDLoss`` (beta=0), and the GEMM
   floor (the four GEMMs into preallocated outputs). Time and ``torch.cuda.max_memory_allocated``.
3. ``importance``: a random Llama-3.1-8B-shaped model (bf16, SDPA), 8 x 4,096 tokens: the plain
   decoder forward, minitron_fast's fused collection (decoder only, as the stage runs it) and
   Model-Optimizer-style hooks, with the number of launches of each fused kernel (a kernel that is
   never launched fails the row: an unwired fast path shows).
4. ``compaction``: in-place Triton compaction of 8B-shaped bf16 layer weights (hidden 4096 -> 3072,
   FFN 14336 -> 9216, 32 -> 24 heads) against ``index_select`` into new tensors: GB/s and peak memory.
5. ``recipe``: a tiny recipe end to end (importance, prune, two distillation steps under DeepSpeed
   on one device) through ``minitron_fast.pipeline``.
6. ``gpu_paths``: the kinds of defect a reading of the CUDA-only branches found (issue 23): fp16
   gradients through the fused loss against float64 under a loss scale, the live top-k teacher's
   rows at V=128,256 on the device, what the pipeline process keeps reserved after it evaluated
   a model, and, where 2+ GPUs are visible, every Triton kernel launched on ``cuda:1`` and a
   2-rank ZeRO-3 ``torchrun`` step with the fused loss against one process (both skipped and
   named on one GPU).
   A ``kd_loss`` row of ours slower than ``KD_FLOOR_LIMIT`` x the GEMM floor fails.

``--tiny`` runs the same logic at tiny shapes on the CPU, Triton kernels under
``TRITON_INTERPRET=1`` (set here before any kernel is defined), so the script cannot rot between
GPU days (``tests/bench/test_device_check.py`` runs it). Its timings mean nothing.

Rows follow the benchmark contract (``bench``, ``case``, ``impl``, ``median_s``, ``p20_s``,
``p80_s``, ``peak_mb``, ``ok``) plus ``section`` and ``status`` (``ran`` / ``skipped: ...``);
``peak_mb`` is ``torch.cuda.max_memory_allocated`` above what the inputs hold (None on the CPU).
With ``--json FILE`` a markdown summary (device, driver, torch, triton, commit, each section's
table and the issue's goals against the numbers) is written beside it as ``FILE.md``.
Nothing is installed or downloaded: Liger comes from the project's ``bench`` extra.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

HELP = "one prepared GPU check: kernel correctness at real shapes, KD loss vs Liger/floor, importance, compaction, a tiny recipe"

SECTIONS = ("correctness", "kd_loss", "importance", "compaction", "recipe", "gpu_paths")
KD_FLOOR_LIMIT = 2.0  # a KD row slower than this many times the GEMM floor fails (issue 23)
KD_IMPLS = ("minitron_fast", "minitron_fast_torch", "torch_naive", "liger_fused_jsd", "liger_chunked", "gemm_floor")
IMPORTANCE_KERNELS = ("swiglu_stats", "rmsnorm_stats", "head_stats", "block_cos")


@dataclass(frozen=True)
class Shapes:
    """Every size the check uses; ``REAL`` on a GPU, ``TINY`` for the CPU rehearsal."""

    kd: tuple[int, int, int, int]          # N, Hs, Ht, V
    kd_check_rows: int                     # tokens checked against float64
    topk: int                              # k of the top-k teacher case
    model: dict[str, Any]                  # a LlamaConfig's kwargs
    imp_samples: int
    imp_seq: int
    imp_batch: int
    compact_layers: int
    compact_keep: dict[str, int]           # hidden, ffn, heads kept by the compaction case
    reps: int
    # seconds each case may take on an H100 (what the budget reserves before starting it)
    est_s: dict[str, float]


LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False)
REAL = Shapes(kd=(8192, 3072, 4096, 128256), kd_check_rows=128, topk=64, model=LLAMA_8B, imp_samples=8,
              imp_seq=4096, imp_batch=2, compact_layers=32, compact_keep={"hidden": 3072, "ffn": 9216, "heads": 24},
              reps=5, est_s={"correctness": 20, "kd_loss": 25, "importance": 60, "compaction": 40, "recipe": 90,
                     "gpu_paths": 15})
TINY = Shapes(kd=(96, 48, 64, 1000), kd_check_rows=32, topk=8,
              model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False),
              imp_samples=4, imp_seq=32, imp_batch=2, compact_layers=2,
              compact_keep={"hidden": 48, "ffn": 96, "heads": 3}, reps=2,
              est_s={"correctness": 1, "kd_loss": 1, "importance": 1, "compaction": 1, "recipe": 5, "gpu_paths": 1})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget in seconds; cases that no longer fit are skipped and listed (default 420)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes on the CPU, Triton under TRITON_INTERPRET=1 (a rehearsal: timings mean nothing)")
    p.add_argument("--only", default="", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")


# -- plumbing -------------------------------------------------------------------------------------

class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def fits(self, est_s: float) -> bool:
        return self.left() >= est_s


class Device:
    """The device under test: CUDA timing/memory, or the CPU rehearsal's wall clock and RSS."""

    def __init__(self, tiny: bool):
        import torch

        self.torch = torch
        self.cuda = not tiny
        self.name = torch.cuda.get_device_name() if self.cuda else "cpu (TRITON_INTERPRET=1)"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.dev = torch.device("cuda" if self.cuda else "cpu")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def reset_peak(self) -> float:
        """Resets the peak counter; returns what is allocated now (MB), the base of ``peak_above``."""
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated() / 2**20
        return 0.0

    def peak_above(self, base_mb: float) -> float | None:
        """Peak device memory above ``base_mb`` since :meth:`reset_peak` (None on the CPU, where the
        process's lifetime RSS peak cannot be reset between cases)."""
        self.sync()
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20 - base_mb
        return None

    def oom_types(self) -> tuple[type[BaseException], ...]:
        return (self.torch.cuda.OutOfMemoryError,) if self.cuda else (MemoryError,)


@contextlib.contextmanager
def count_calls(module: Any, names: tuple[str, ...]) -> Iterator[dict[str, int]]:
    """Counts calls of ``module.<name>`` (kernel launchers looked up through the module at call
    time) while the context is open."""
    counts = {n: 0 for n in names}
    originals = {n: getattr(module, n) for n in names}

    def wrap(n: str, fn: Callable) -> Callable:
        def counted(*a: Any, **k: Any) -> Any:
            counts[n] += 1
            return fn(*a, **k)
        return counted

    for n, fn in originals.items():
        setattr(module, n, wrap(n, fn))
    try:
        yield counts
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)


def _row(section: str, case: str, impl: str, **kw: Any) -> dict[str, Any]:
    return {"section": section, "case": case, "impl": impl, "status": "ran", **kw}


def _skipped(section: str, case: str, impl: str, why: str) -> dict[str, Any]:
    return {"section": section, "case": case, "impl": impl, "status": f"skipped: {why}", "ok": True}


def _rel(a: Any, b: Any) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _timed(dev: Device, fn: Callable[[], Any], reps: int) -> dict[str, float]:
    from bench.common import time_fn

    return time_fn(fn, warmup=1, reps=reps, sync=dev.sync)


# -- 1. correctness at real shapes ----------------------------------------------------------------

def _randn(dev: Device, *shape: int, gen: Any, scale: float = 1.0):
    """Random normal values made on the device itself (8B-sized tensors made on the host and
    copied would cost the budget minutes)."""
    import torch

    t = torch.randn(shape, generator=gen, device=dev.dev, dtype=dev.dtype)
    return t.mul_(scale) if scale != 1.0 else t


def _gen(dev: Device, seed: int):
    import torch

    return torch.Generator(device=dev.dev).manual_seed(seed)


def _kd_inputs(dev: Device, N: int, Hs: int, Ht: int, V: int, seed: int = 0):
    import torch

    g = _gen(dev, seed)
    h = _randn(dev, N, Hs, gen=g)
    W = _randn(dev, V, Hs, gen=g, scale=Hs ** -0.5)
    th = _randn(dev, N, Ht, gen=g)
    tW = _randn(dev, V, Ht, gen=g, scale=1.5 * Ht ** -0.5)
    labels = torch.randint(0, V, (N,), generator=g, device=dev.dev)
    labels[::17] = -100
    return h, W, th, tW, labels


def _kd_fwd_bwd(h, W, th, tW, labels, impl: str, **kw: Any):
    """Loss, dh and dW of ``fused_linear_kd_loss`` with ``impl`` (fresh leaves)."""
    from minitron_fast import fused_linear_kd_loss

    hs, Ws = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    if "teacher_topk" in kw:
        loss = fused_linear_kd_loss(hs, Ws, labels=labels, impl=impl, **kw)
    else:
        loss = fused_linear_kd_loss(hs, Ws, th, tW, labels=labels, impl=impl, **kw)
    loss.backward()
    return loss.detach(), hs.grad, Ws.grad


def _kd_reference(h, W, th, tW, labels, **kw: Any):
    """The float64 reference's loss, dh and dW."""
    import torch

    from minitron_fast.ops.kd_loss import kd_loss_reference

    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    zs = h64 @ W64.T
    if "teacher_topk" in kw:
        ref = kd_loss_reference(zs, labels=labels, **kw)
    else:
        ref = kd_loss_reference(zs, th.double() @ tW.double().T, labels=labels, **kw)
    dh, dW = torch.autograd.grad(ref, (h64, W64))
    return ref.detach(), dh, dW


def check_kd_rows(dev: Device, s: Shapes) -> list[dict[str, Any]]:
    """The Triton KD rows against the torch rows and the float64 reference, per divergence, on the
    first ``kd_check_rows`` tokens at the full vocabulary and hidden sizes. A kernel passes when its
    error against float64 is at most the torch path's error plus the dtype's slack."""
    import torch

    N, Hs, Ht, V = s.kd
    n = s.kd_check_rows
    h, W, th, tW, labels = _kd_inputs(dev, n, Hs, Ht, V)
    slack = 1e-2 if dev.dtype == torch.bfloat16 else 5e-4
    cases: list[tuple[str, dict[str, Any]]] = [
        ("forward_kl", {"divergence": "forward_kl"}),
        ("reverse_kl", {"divergence": "reverse_kl"}),
        ("jsd_beta0.5", {"divergence": "jsd", "beta": 0.5}),
        ("forward_kl_T2_ce0.3", {"divergence": "forward_kl", "temperature": 2.0, "hard_label_weight": 0.3}),
    ]
    with torch.no_grad():
        zt = (th.float() @ tW.float().T)
        vals, idx = zt.topk(s.topk, dim=-1)
    cases.append((f"forward_kl_top{s.topk}", {"divergence": "forward_kl", "teacher_topk": (vals, idx)}))
    rows = []
    for name, kw in cases:
        case = f"kd_rows[{name}] N={n} V={V} Hs={Hs} Ht={Ht} {str(dev.dtype).replace('torch.', '')}"
        ref = _kd_reference(h, W, th, tW, labels, **kw)
        errs: dict[str, dict[str, float]] = {}
        for impl in ("triton", "torch"):
            try:
                got = _kd_fwd_bwd(h, W, th, tW, labels, impl, **kw)
            except (ValueError, NotImplementedError, RuntimeError) as exc:
                if impl == "triton" and "impl" in str(exc):
                    errs[impl] = {"unsupported": str(exc).splitlines()[0]}
                    continue
                raise
            errs[impl] = {f"err_{k}": _rel(g, r) for k, g, r in zip(("loss", "dh", "dw"), got, ref)}
        if "unsupported" in errs.get("triton", {}):
            rows.append(_row("correctness", case, "triton", ok=True, status="not supported by impl=triton",
                             note=errs["triton"]["unsupported"]))
            continue
        tri, tor = errs["triton"], errs["torch"]
        ok = all(tri[k] <= tor[k] + slack and math.isfinite(tri[k]) for k in tri)
        rows.append(_row("correctness", case, "triton", ok=ok, **tri,
                         **{k.replace("err_", "torch_err_"): v for k, v in tor.items()}))
    return rows


def check_importance_kernels(dev: Device, s: Shapes) -> list[dict[str, Any]]:
    """The four importance-statistics kernels against the torch path at a real layer's shapes:
    outputs and both statistic buffers (they are forward-only: importance takes no gradients)."""
    import torch

    from minitron_fast.ops import importance as ops

    cfg = s.model
    B, T = 1, s.imp_seq
    H, F, nh = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    hd = H // nh
    g = _gen(dev, 1)
    mask = torch.ones(B, T, device=dev.dev)
    mask[:, -T // 8:] = 0  # padding at the end of the sample
    x = _randn(dev, B, T, H, gen=g)
    y = _randn(dev, B, T, H, gen=g) + x
    gate, up = _randn(dev, B, T, F, gen=g), _randn(dev, B, T, F, gen=g)
    attn = _randn(dev, B, T, nh * hd, gen=g)
    w = _randn(dev, H, gen=g, scale=0.1) + 1

    def stats(n_units: int):
        return torch.zeros(B, n_units, device=dev.dev), torch.zeros(B, n_units, device=dev.dev)

    def run(impl: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with torch.no_grad():
            s1, s2 = stats(F)
            out["swiglu_stats"] = (ops.swiglu_with_stats(gate, up, mask, s1, s2, impl=impl), s1, s2)
            s1, s2 = stats(H)
            out["rmsnorm_stats"] = (ops.rmsnorm_with_stats(x, w, 1e-5, mask, s1, s2, impl=impl), s1, s2)
            s1, s2 = stats(nh)
            ops.head_stats(attn, nh, mask, s1, s2, impl=impl)
            out["head_stats"] = (s1, s2)
            cos = torch.zeros(B, device=dev.dev)
            ops.block_cosine(x, y, mask, cos, impl=impl)
            out["block_cos"] = (cos,)
        return out

    from minitron_fast.kernels import importance as kmod

    with count_calls(kmod, IMPORTANCE_KERNELS) as launches:
        got = run("triton")
    ref = run("torch")
    rows = []
    tol = 2e-2 if dev.dtype == torch.bfloat16 else 1e-4
    for k in IMPORTANCE_KERNELS:
        errs = {f"err_{i}": _rel(a.float(), b.float()) for i, (a, b) in enumerate(zip(got[k], ref[k]))}
        ok = launches[k] > 0 and all(math.isfinite(v) and v <= tol for v in errs.values())
        rows.append(_row("correctness", f"{k} B={B} T={T} H={H} F={F} heads={nh}", "triton", ok=ok,
                         launches=launches[k], **errs))
    return rows


def check_compaction(dev: Device, s: Shapes) -> list[dict[str, Any]]:
    """In-place Triton row and column gathers == ``index_select`` (exact) on a real FFN matrix."""
    import torch

    from minitron_fast.ops.compact import compact_

    H, F = s.model["hidden_size"], s.model["intermediate_size"]
    keep = s.compact_keep
    g = torch.Generator().manual_seed(2)
    rows = []
    for dim, kept_n in ((0, keep["ffn"]), (1, keep["hidden"])):
        t = _randn(dev, F, H, gen=_gen(dev, 2 + dim))
        kept = torch.randperm(t.shape[dim], generator=g)[:kept_n].sort().values.to(dev.dev)
        expect = t.index_select(dim, kept)
        compact_(t, kept, dim, impl="triton")
        ok = tuple(t.shape) == tuple(expect.shape) and bool(torch.equal(t, expect))
        rows.append(_row("correctness", f"compact dim={dim} [{F}, {H}] keep {kept_n}", "triton", ok=ok,
                         max_abs_err=float((t.float() - expect.float()).abs().max()) if t.shape == expect.shape else None))
    return rows


# -- 2. the KD loss against its peers ------------------------------------------------------------

def _kd_step(impl: str, h, W, th, tW, labels) -> Callable[[], Any]:
    """``step()``: one forward+backward of ``impl`` (``bench.kd_loss``'s steps, on the inputs' device)."""
    from bench.kd_loss import make_step

    return make_step(impl, h, W, th, tW, labels, liger_compiled=h.is_cuda)


def bench_kd_loss(dev: Device, s: Shapes, budget: Budget) -> list[dict[str, Any]]:
    import torch

    N, Hs, Ht, V = s.kd
    case = f"llama8b->4b N={N} Hs={Hs} Ht={Ht} V={V} {str(dev.dtype).replace('torch.', '')}"
    rows, est = [], s.est_s["kd_loss"]
    n = s.kd_check_rows
    try:
        h, W, th, tW, labels = _kd_inputs(dev, N, Hs, Ht, V)
    except dev.oom_types() as exc:
        return [_skipped("kd_loss", case, "all", f"out of memory for the inputs ({exc})")]
    h.requires_grad_(), W.requires_grad_()
    for impl in KD_IMPLS:
        if impl.startswith("liger") and not dev.cuda:
            rows.append(_skipped("kd_loss", case, impl, "Liger's Triton kernels need CUDA"))
            continue
        if not budget.fits(est):
            rows.append(_skipped("kd_loss", case, impl, f"budget ({budget.left():.0f} s left, needs ~{est:.0f} s)"))
            continue
        try:
            base = dev.reset_peak()
            step = _kd_step(impl, h, W, th, tW, labels)
            timing = _timed(dev, step, s.reps)
            peak = dev.peak_above(base)
            h.grad = W.grad = None
            row = _row("kd_loss", case, impl, **timing, peak_mb=peak, N=N, V=V,
                       tflops=2.0 * N * V * (Ht + 3 * Hs) / timing["median_s"] / 1e12)
            if impl != "gemm_floor":  # the loss this impl gives on a slice, against float64 forward KL
                loss = float(_kd_step(impl, h[:n].detach().clone().requires_grad_(), W, th[:n], tW, labels[:n])())
                ref = float(_kd_reference(h[:n].detach(), W.detach(), th[:n], tW, labels[:n])[0])
                row["err_loss_vs_fp64"] = abs(loss - ref) / max(abs(ref), 1e-12)
                row["ok"] = row["err_loss_vs_fp64"] < (2e-2 if dev.dtype == torch.bfloat16 else 1e-3)
            else:
                row["ok"] = True
        except dev.oom_types() as exc:
            row = _skipped("kd_loss", case, impl, f"out of memory ({str(exc).splitlines()[0][:120]})")
        step = None
        h.grad = W.grad = None
        rows.append(row)
        dev.free()
    _ratios(rows, "kd_loss", {"gemm_floor": "vs_floor", "torch_naive": "vs_naive", "liger_fused_jsd": "vs_liger_fused",
                              "liger_chunked": "vs_liger_chunked"})
    for r in rows:
        if dev.cuda and r["impl"].startswith("minitron_fast") and (r.get("vs_floor") or 0) > KD_FLOOR_LIMIT:
            r["ok"] = False
            r["error"] = f"{r['vs_floor']:.2f}x the GEMM floor (limit {KD_FLOOR_LIMIT}x)"
    return rows


def _ratios(rows: list[dict[str, Any]], section: str, bases: dict[str, str]) -> None:
    timed = {r["impl"]: r for r in rows if r.get("section") == section and r.get("ok") and r.get("median_s")}
    for r in timed.values():
        for base, key in bases.items():
            if base in timed and base != r["impl"]:
                r[key] = r["median_s"] / timed[base]["median_s"]


# -- 3. importance collection ---------------------------------------------------------------------

def _random_model(dev: Device, cfg: dict[str, Any]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    torch.manual_seed(0)
    with torch.device(dev.dev):
        model = LlamaForCausalLM._from_config(config, dtype=dev.dtype, attn_implementation="sdpa")
    return model.eval()


def bench_importance(dev: Device, s: Shapes, budget: Budget) -> list[dict[str, Any]]:
    import torch

    from bench.importance import HookBaseline
    from minitron_fast.importance import ImportanceCollector
    from minitron_fast.kernels import importance as kmod
    from minitron_fast.models import get_view

    case = (f"llama-3.1-8b-shaped L={s.model['num_hidden_layers']} {s.imp_samples}x{s.imp_seq} "
            f"bs{s.imp_batch} {str(dev.dtype).replace('torch.', '')} sdpa")
    if not budget.fits(s.est_s["importance"]):
        return [_skipped("importance", case, i, f"budget ({budget.left():.0f} s left)")
                for i in ("plain_forward", "minitron_fast", "hooks")]
    try:
        model = _random_model(dev, s.model)
    except dev.oom_types() as exc:
        return [_skipped("importance", case, "all", f"out of memory building the model ({exc})")]
    view = get_view(model)
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, s.model["vocab_size"], (s.imp_samples, s.imp_seq), generator=g).to(dev.dev)
    batches = [blocks[i: i + s.imp_batch] for i in range(0, len(blocks), s.imp_batch)]
    decoder = model.model
    state: dict[str, Any] = {}

    def plain():
        for b in batches:
            decoder(input_ids=b, use_cache=False)

    def ours():
        with ImportanceCollector(view, impl="triton") as col:
            for b in batches:
                col.step(b)
        state["ours"] = col

    def hooks():
        hb = HookBaseline(view).attach()
        try:
            plain()
        finally:
            hb.detach()
        state["hooks"] = hb

    rows = []
    with torch.no_grad():
        for impl, fn in (("plain_forward", plain), ("minitron_fast", ours), ("hooks", hooks)):
            base = dev.reset_peak()
            with count_calls(kmod, IMPORTANCE_KERNELS) as launches:
                timing = _timed(dev, fn, s.reps)
            row = _row("importance", case, impl, **timing, peak_mb=dev.peak_above(base),
                       tokens_per_s=s.imp_samples * s.imp_seq / timing["median_s"], ok=True)
            if impl == "minitron_fast":
                calls = 1 + s.reps  # warm-up + timed passes
                row.update({f"launches_{k}": v // calls for k, v in launches.items()})
                never = [k for k, v in launches.items() if v == 0]
                if never:
                    row.update(ok=False, error=f"fused kernel(s) never launched: {', '.join(never)}")
            rows.append(row)
    # the fused statistics against the hooks' (mean over the sequence, L2 over the batch)
    sc, hb = state["ours"].scores(), state["hooks"]
    err = max(_rel(sc.neurons[i].float().cpu(), hb.neurons[i].sqrt().cpu()) for i in range(view.num_layers))
    err = max(err, max(_rel(sc.heads[i].float().cpu(), hb.heads[i].sqrt().cpu()) for i in range(view.num_layers)))
    for r in rows:
        if r["impl"] == "minitron_fast":
            r["max_rel_err_vs_hooks"] = err
            r["ok"] = r["ok"] and err < (5e-2 if dev.dtype == torch.bfloat16 else 1e-3)
    _ratios(rows, "importance", {"plain_forward": "vs_plain"})
    del model, view, decoder, state
    dev.free()
    return rows


# -- 4. in-place compaction ----------------------------------------------------------------------

def _layer_plan(s: Shapes, g) -> list[tuple[tuple[int, int], Any, Any]]:
    """(shape, kept rows or None, kept cols or None) of one Llama layer's seven matrices."""
    import torch

    cfg, keep = s.model, s.compact_keep
    H, F, nh, nkv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh
    pick = lambda n, k: torch.randperm(n, generator=g)[:k].sort().values  # noqa: E731
    hid, ffn = pick(H, keep["hidden"]), pick(F, keep["ffn"])
    per_group = keep["heads"] // nkv
    heads = torch.cat([grp * (nh // nkv) + torch.randperm(nh // nkv, generator=g)[:per_group].sort().values
                       for grp in range(nkv)])
    q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
    return [((nh * hd, H), q_rows, hid), ((nkv * hd, H), None, hid), ((nkv * hd, H), None, hid),
            ((H, nh * hd), hid, q_rows), ((F, H), ffn, hid), ((F, H), ffn, hid), ((H, F), hid, ffn)]


def bench_compaction(dev: Device, s: Shapes, budget: Budget) -> list[dict[str, Any]]:
    import torch

    from minitron_fast.ops.compact import compact_2d_

    case = (f"llama-3.1-8b layers x{s.compact_layers} -> hidden {s.compact_keep['hidden']}, ffn "
            f"{s.compact_keep['ffn']}, heads {s.compact_keep['heads']} {str(dev.dtype).replace('torch.', '')}")
    g = torch.Generator().manual_seed(4)
    plan = _layer_plan(s, g)
    rows = []
    for impl in ("minitron_fast_triton", "index_select"):
        if not budget.fits(s.est_s["compaction"] / 2):
            rows.append(_skipped("compaction", case, impl, f"budget ({budget.left():.0f} s left)"))
            continue
        try:
            gd = _gen(dev, 5)
            layers = [[_randn(dev, *shape, gen=gd) for shape, _, _ in plan] for _ in range(s.compact_layers)]
            idx = [(r.to(dev.dev) if r is not None else None, c.to(dev.dev) if c is not None else None)
                   for _, r, c in plan]
            expect = [t.index_select(0, r) if r is not None else t for t, (r, _) in zip(layers[0], idx)]
            expect = [t.index_select(1, c) if c is not None else t for t, (_, c) in zip(expect, idx)]
            moved = sum((r.numel() if r is not None else shape[0]) * (c.numel() if c is not None else shape[1])
                        for (shape, _, _), (r, c) in zip(plan, idx)) * s.compact_layers * layers[0][0].element_size()
            base = dev.reset_peak()
            t0 = time.perf_counter()
            if impl == "minitron_fast_triton":
                for ts in layers:
                    for t, (r, c) in zip(ts, idx):
                        compact_2d_(t, r, c, impl="triton")
            else:
                for ts in layers:
                    for j, (t, (r, c)) in enumerate(zip(ts, idx)):
                        if r is not None:
                            t = t.index_select(0, r)
                        if c is not None:
                            t = t.index_select(1, c)
                        ts[j] = t
            dev.sync()
            dt = time.perf_counter() - t0
            peak = dev.peak_above(base)
            ok = all(torch.equal(a, b) for a, b in zip(layers[0], expect))
            rows.append(_row("compaction", case, impl, median_s=dt, p20_s=dt, p80_s=dt, peak_mb=peak, ok=ok,
                             gb_per_s=2 * moved / dt / 1e9, kept_mb=moved / 2**20))
        except dev.oom_types() as exc:
            rows.append(_skipped("compaction", case, impl, f"out of memory ({str(exc).splitlines()[0][:120]})"))
        layers = expect = None
        dev.free()
    _ratios(rows, "compaction", {"index_select": "vs_index_select"})
    return rows


# -- 5. a tiny recipe end to end -----------------------------------------------------------------

def bench_recipe(dev: Device, s: Shapes, budget: Budget) -> list[dict[str, Any]]:
    """importance -> prune -> two distillation steps under DeepSpeed on one device, through the
    pipeline runner, on a tiny Llama with a tokenizer trained here (nothing downloaded)."""
    from bench.common import make_tiny_teacher
    from minitron_fast.pipeline.recipe import load_recipe
    from minitron_fast.pipeline.runner import run_recipe

    case = "tiny llama: importance, prune, 2 distill steps (DeepSpeed ZeRO-1, 1 process)"
    if not budget.fits(s.est_s["recipe"]):
        return [_skipped("recipe", case, "pipeline", f"budget ({budget.left():.0f} s left)")]
    work = Path(tempfile.mkdtemp(prefix="device_check_"))
    try:
        teacher = make_tiny_teacher(work / "teacher")
        recipe = work / "tiny.yaml"
        train = ("micro_batch_size: 2, lr: 1.0e-3, warmup_steps: 0, eval_every: 100, save_every: 100, "
                 "data: {max_blocks: 8, eval_blocks: 2}, deepspeed: {zero_stage: 1}")
        recipe.write_text(f"name: device_check\nteacher: {teacher}\nout: {work / 'run'}\n"
                          "data: {source: demo, seq_len: 32}\nimportance: {samples: 4, batch_size: 4}\n"
                          'prune: {target: "hidden=48,ffn=64,layers=3"}\n'
                          f"distill: {{steps: 2, {train}}}\nevaluate: {{eval_blocks: 2, batch_size: 2}}\n")
        t0 = time.perf_counter()
        rep = run_recipe(load_recipe(recipe), progress=False, log=lambda m: None)["report"]
        dt = time.perf_counter() - t0
        keys = ("teacher_ppl", "pruned_ppl", "distilled_ppl")
        vals = {k: rep.get(k) for k in keys}
        ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals.values())
        return [_row("recipe", case, "pipeline", median_s=dt, p20_s=dt, p80_s=dt, ok=ok, **vals,
                     tokens=rep.get("tokens"))]
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- 6. the GPU-only branches (issue 23) -----------------------------------------------------------

def check_gpu_paths(dev: Device, s: Shapes) -> list[dict[str, Any]]:
    import torch

    from minitron_fast.artifacts import teacher_logits as tl
    from minitron_fast.ops.kd_loss import fused_linear_kd_loss
    from minitron_fast.ops.kd_loss.reference import kd_loss_reference

    rows = []
    # fp16 gradients under gradient accumulation's divisor and a GradScaler-like loss scale
    N, H, V = 64, 128, 4096 if dev.cuda else 257
    g = _gen(dev, 3)
    h = (torch.randn(N, H, generator=g, device=dev.dev) * 0.5).half().requires_grad_()
    W = (torch.randn(V, H, generator=g, device=dev.dev) * 0.3).half().requires_grad_()
    th = torch.randn(N, H, generator=g, device=dev.dev).half()
    tw = (torch.randn(V, H, generator=g, device=dev.dev) * 0.3).half()
    loss = fused_linear_kd_loss(h, W, th, tw, num_items=10**6) * 65536.0
    gh, gw = torch.autograd.grad(loss, (h, W))
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = kd_loss_reference(h64 @ W64.t(), th.double() @ tw.double().t(), num_items=10**6) * 65536.0
    rh, rw = torch.autograd.grad(ref, (h64, W64))
    err = max(_rel(gh.double(), rh), _rel(gw.double(), rw))
    rows.append(_row("gpu_paths", f"fp16 head N={N} H={H} V={V}, num_items=1e6, loss scale 65536", "minitron_fast",
                     ok=bool(gh.abs().max() > 0 and err < 8e-3), err_grad_vs_fp64=err))
    # the live top-k teacher's stored rounding, at a 17-bit vocabulary, on the device
    k, vocab = 16, 128_256
    idx = torch.randint(0, vocab, (4, 8, k), generator=g, device=dev.dev)
    vals, tail = torch.randn(4, 8, k, generator=g, device=dev.dev), torch.randn(4, 8, generator=g, device=dev.dev)
    try:
        v, i, t = tl.decode(tl.encode(vals, idx, tail, vocab), k)
        ok, err_txt = bool(torch.equal(i, idx) and i.device == idx.device), None
    except Exception as exc:  # the defect this row exists for raised here
        ok, err_txt = False, f"{type(exc).__name__}: {exc}"[:200]
    rows.append(_row("gpu_paths", f"live top-k teacher rows, V={vocab}, k={k}", "minitron_fast", ok=ok,
                     **({"error": err_txt} if err_txt else {})))
    # what the pipeline process keeps reserved after evaluating a model (before a trainer starts)
    if dev.cuda:
        from minitron_fast.evaluate.perplexity import lm_loss
        from minitron_fast.models.loading import free_device_memory

        dev.free()
        before = torch.cuda.memory_reserved() / 2**20
        m = _random_model(dev, s.model)
        ids = torch.randint(0, s.model["vocab_size"], (2, 64), generator=g, device=dev.dev)
        with torch.no_grad():
            lm_loss(m, ids, batch_size=2, progress=False)
        held = torch.cuda.memory_reserved() / 2**20
        del m
        free_device_memory()
        after = torch.cuda.memory_reserved() / 2**20
        rows.append(_row("gpu_paths", "memory_reserved after evaluate + free_device_memory", "pipeline",
                         ok=after - before < 64, reserved_mb_before=before, reserved_mb_during=held,
                         reserved_mb_after=after))
    else:
        rows.append(_skipped("gpu_paths", "memory_reserved after evaluate + free_device_memory", "pipeline",
                             "needs CUDA"))
    # several GPUs: every kernel on cuda:1 (a launch on the current device would fail there)
    n_gpu = torch.cuda.device_count() if dev.cuda else 0
    if n_gpu >= 2:
        from minitron_fast.kernels import importance as ik
        from minitron_fast.ops.compact import compact_

        d1 = torch.device("cuda", 1)
        x, y = torch.randn(2, 37, 96, device=d1), torch.randn(2, 37, 96, device=d1)
        out = torch.zeros(2, device=d1)
        ik.block_cos(x, y, None, out)
        s2 = torch.zeros(2, 4, device=d1)
        ik.head_stats(x, 4, None, None, s2)
        w = torch.arange(96 * 8, dtype=torch.float32, device=d1).view(96, 8)
        keep = torch.tensor([1, 5, 90], device=d1)
        want = w.index_select(0, keep)
        compact_(w, keep, 0, impl="triton")
        cos_ref = torch.nn.functional.cosine_similarity(x, y, dim=-1).sum(1)
        ok = torch.allclose(out, cos_ref, atol=1e-3) and torch.equal(w, want)
        rows.append(_row("gpu_paths", "Triton kernels on cuda:1 (cuda:0 current)", "triton", ok=bool(ok)))
        rows.append(check_zero3_two_ranks())
    else:
        for case, impl in (("Triton kernels on cuda:1 (cuda:0 current)", "triton"),
                           ("2-rank ZeRO-3 torchrun step vs 1 rank", "distill")):
            rows.append(_skipped("gpu_paths", case, impl, f"needs 2 GPUs ({n_gpu} visible)"))
    return rows


def check_zero3_two_ranks(accelerator: str = "cuda", timeout: float = 300) -> dict[str, Any]:
    """``torchrun`` with 2 ranks (NCCL on cuda:0 and cuda:1) distilling a tiny student under
    DeepSpeed ZeRO-3 with the fused loss, through the integration, the functional API and the TRL
    divergence with the teacher partitioned too (``bench/zero3_worker.py``), against the same run in
    one process without DeepSpeed on cuda:0. tests/integrations/test_zero3.py runs the same worker on
    2 CPU ranks."""
    from bench import zero3_worker as worker

    case = "2-rank ZeRO-3 torchrun step vs 1 rank"
    with tempfile.TemporaryDirectory(prefix="z3-") as d:
        out = Path(d) / "z3.json"
        t0 = time.perf_counter()
        run = worker.launch(out, accelerator, timeout=timeout)
        dt = time.perf_counter() - t0
        if run["res"] is None:
            return _row("gpu_paths", case, "distill", ok=False, median_s=dt,
                        error=f"rc {run['rc']}: {_last_lines(run['stderr'])}")
        ref_device = "cuda:0" if accelerator == "cuda" else "cpu"
        found = worker.compare(run["res"], str(out), device=ref_device, rtol=1e-3 if accelerator == "cuda" else 1e-4)
    ok = all(f["partitioned"] and f["losses_match"] and f["head_matches"] and f["trained"] for f in found.values())
    return _row("gpu_paths", case, "distill", ok=ok, median_s=dt, world=run["res"]["world"],
                loss_rel_err=max(f["loss_rel_err"] for f in found.values()),
                modes={m: {k: v for k, v in f.items() if k != "loss_rel_err"} for m, f in found.items()})


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-n:])[:400]


# -- the driver -----------------------------------------------------------------------------------

def _environment(dev: Device) -> dict[str, Any]:
    import torch

    from bench.common import meta

    m = meta()
    driver = None
    if dev.cuda and shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        driver = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    return {"device": dev.name, "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__,
            "triton": m["versions"].get("triton"), "liger": m["versions"].get("liger-kernel"),
            "commit": m["commit"], "time": m["time"], "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.tiny:
        # before any @triton.jit function is defined (minitron_fast.kernels is imported lazily)
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("error: bench device_check needs a CUDA GPU (none is visible); pass --tiny for the CPU rehearsal",
              file=sys.stderr)
        raise SystemExit(2)
    only = [x for x in args.only.split(",") if x]
    unknown = [x for x in only if x not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        raise SystemExit(2)
    if args.tiny:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    dev, s, budget = Device(args.tiny), (TINY if args.tiny else REAL), Budget(args.budget_s)
    env = _environment(dev)
    print(f"[device_check] {env['device']}, torch {env['torch']}, triton {env['triton']}, budget {args.budget_s:.0f} s",
          flush=True)
    steps: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("correctness", lambda: check_kd_rows(dev, s) + check_importance_kernels(dev, s) + check_compaction(dev, s)),
        ("kd_loss", lambda: bench_kd_loss(dev, s, budget)),
        ("importance", lambda: bench_importance(dev, s, budget)),
        ("compaction", lambda: bench_compaction(dev, s, budget)),
        ("recipe", lambda: bench_recipe(dev, s, budget)),
        ("gpu_paths", lambda: check_gpu_paths(dev, s)),
    ]
    rows: list[dict[str, Any]] = []
    for name, fn in steps:
        if only and name not in only:
            continue
        if not budget.fits(s.est_s[name]):
            rows.append(_skipped(name, "(whole section)", "-", f"budget ({budget.left():.0f} s left, "
                                                                 f"needs ~{s.est_s[name]:.0f} s)"))
            print(f"[device_check] {name}: skipped, {budget.left():.0f} s left", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"[device_check] {name} ...", flush=True)
        try:
            got = fn()
        except Exception as exc:  # one broken section must not hide the others' results
            got = [_row(name, "(whole section)", "-", ok=False, error=f"{type(exc).__name__}: {exc}"[:500])]
        for r in got:
            r.setdefault("ok", True)
            flag = "" if r["ok"] else "  FAILED " + str(r.get("error", ""))
            print(f"    {r['case']} [{r['impl']}] {r['status']}{flag}", flush=True)
        rows += got
        dev.free()
        print(f"[device_check] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    for r in rows:
        r["device"] = env["device"]
    if getattr(args, "json", None):
        summary_path = Path(args.json).with_suffix(".md")
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(summary_markdown(rows, env, args.budget_s, budget))
        print(f"wrote {summary_path}")
    return rows


def _goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["section"], r["impl"]): r for r in rows if r.get("status") == "ran" and r.get("ok")}

    def get(sec: str, impl: str, key: str) -> float | None:
        v = by.get((sec, impl), {}).get(key)
        return v if isinstance(v, (int, float)) else None

    out = []
    floor = get("kd_loss", "minitron_fast", "vs_floor")
    liger = [v for v in (get("kd_loss", "minitron_fast", "vs_liger_fused"),
                         get("kd_loss", "minitron_fast", "vs_liger_chunked")) if v is not None]
    out.append(f"- KD loss within 1.3x the GEMM floor: {'not measured' if floor is None else f'{floor:.2f}x'}"
               f"; faster than Liger's fastest: {'not measured' if not liger else f'{min(liger):.2f}x of it'}")
    imp = get("importance", "minitron_fast", "vs_plain")
    out.append(f"- importance collection at most 1.05x a plain forward: {'not measured' if imp is None else f'{imp:.3f}x'}")
    comp = get("compaction", "index_select", "median_s")
    ours = get("compaction", "minitron_fast_triton", "median_s")
    out.append("- compaction at least 5x index_select's speed: "
               + ("not measured" if comp is None or ours is None else f"{comp / ours:.2f}x"))
    return out


def summary_markdown(rows: list[dict[str, Any]], env: dict[str, Any], budget_s: float, budget: Budget) -> str:
    from bench.suite import rows_markdown

    lines = ["# device_check", "",
             f"- device: {env['device']}" + (f", driver {env['driver']}, CUDA {env['cuda']}" if env["driver"] else ""),
             f"- torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger']}; commit {env['commit']}; "
             f"{env['time']}",
             f"- budget {budget_s:.0f} s, used {budget_s - budget.left():.0f} s"
             + ("; **CPU rehearsal under TRITON_INTERPRET=1: timings mean nothing**" if env["interpreter"] else ""),
             "", "## Goals (issue 13)", "", *_goal_lines(rows)]
    for sec in SECTIONS:
        sec_rows = [{k: v for k, v in r.items() if k not in ("section", "device")} for r in rows if r["section"] == sec]
        if sec_rows:
            lines += ["", f"## {sec}", "", rows_markdown(sec_rows)]
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        lines += ["", "## Failed", ""] + [f"- {r['section']} / {r['case']} [{r['impl']}]: {r.get('error', 'check failed')}"
                                          for r in failed]
    return "\n".join(lines) + "\n"
