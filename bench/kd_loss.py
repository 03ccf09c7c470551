"""KD loss forward+backward: minitron_fast vs naive torch vs Liger's and TRL's chunked losses vs the GEMM floor.

``python -m bench kd_loss [--quick] [--json FILE] [--cases a,b] [--impls a,b] [--divergences a,b] [--reps R]``

``--divergences`` (default ``forward_kl``): ``forward_kl``, ``reverse_kl``, ``jsd`` (beta 0.5) and
``topk`` (forward KL against the teacher's top-64 logits plus the tail bucket, the offline-teacher
form). Every row is tagged with its divergence and, for minitron_fast, the row implementation that
actually ran (``rows_impl``, resolved once per call); ratios are within one divergence, plus
``vs_forward_kl`` (the same impl's forward-KL row of the same run).

Each (case, impl) runs in a fresh Python process (``bench.common.run_in_subprocess``) so its peak
RSS is its own. Impls:

- ``minitron_fast``: ``fused_linear_kd_loss`` (forward KL, T=1) as users get it (``impl="auto"``:
  on the CPU the C++ row kernel of ``minitron_fast._C``, three passes per row).
- ``minitron_fast_torch``: the same with ``impl="torch"`` (the chunk math as torch ops, ~20
  elementwise passes per chunk): the C++ kernel's baseline.
- ``torch_naive``: fp32 logits ``[N, V]`` for both models, ``log_softmax``, ``kl_div``, autograd.
- ``liger_chunked``: ``LigerFusedLinearJSDLoss(beta=0)`` (forward KL), pure torch (``compiled=False``),
  its default chunk of 1024 tokens.
- ``trl_chunked``: TRL's ``ChunkedDivergenceFunction`` (``trl/kernels/chunked_divergence.py``, the loss
  of TRL's ``DistillationTrainer``), called as the trainer calls it: ``_chunked_divergence_loss(
  student_hidden [1, N, Hs], teacher_hidden, student_weight, teacher_weight, completion_mask, beta,
  temperature=1.0)`` with the valid tokens as the completion mask and ``beta`` 0 / 1 / 0.5 for forward
  KL / reverse KL / JSD (TRL's meaning of ``beta`` is ours and Liger's). On the CPU it runs its torch
  tiles of 4096 tokens x 32,768 vocabulary entries, projecting every position and masking after; without
  ``trl`` installed the row says ``not installed: pip install minitron_fast[trl]``.
- ``gemm_floor``: the four GEMMs the loss cannot avoid (teacher logits, student logits, dX, dW)
  into preallocated, already-touched outputs, nothing else.

Every row: forward+backward time (median, p20, p80; ``cpu_median_s``: the process's CPU seconds per
step over all its threads, which other jobs on a shared machine disturb less), ``peak_mb`` (peak
RSS of the process), ``workspace_mb`` (peak RSS minus the RSS after building the inputs and minus the dX/dW gradients
every implementation owes), ratios to naive, Liger, TRL and the floor measured in the same run, and a
correctness check against a float64 reference on the first ``check_tokens`` tokens (a failed
check blanks the row's numbers).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

HELP = ("fused KD loss fwd+bwd: minitron_fast vs torch_naive vs liger_chunked vs trl_chunked vs gemm_floor "
        "(fresh process each)")

# name -> (N, Hs, Ht, V); shapes from real model configs
CASES = {
    # the PEERS.md case the goals are stated for: N=2048, V=128,256 (Hs=Ht=512 keeps it minutes)
    "v128k_h512_n2048": (2048, 512, 512, 128256),
    # Llama-3.1-8B (Ht=4096) -> Minitron 4B-Width (Hs=3072), V=128,256; N limited by CPU time
    # (0.44 TFLOP per step at N=128: about a minute per step on the shared, loaded 2-core machine)
    "llama8b_to_4b_n128": (128, 3072, 4096, 128256),
    # SmolLM2-135M teacher and student (H=576, V=49,152)
    "smollm2_n1024": (1024, 576, 576, 49152),
}
QUICK_CASES = {
    "v128k_h512_n256": (256, 512, 512, 128256),
    "llama8b_to_4b_n64": (64, 3072, 4096, 128256),
    "smollm2_n256": (256, 576, 576, 49152),
}
# a test-only shape (tests/bench: a second per process), never run unless named with --cases
TEST_CASES = {"tiny_n64": (64, 32, 48, 1000)}
IMPLS = ("minitron_fast", "minitron_fast_torch", "torch_naive", "liger_chunked", "trl_chunked", "gemm_floor")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "topk")
TOPK = 64
# Liger's beta for each divergence (LigerFusedLinearJSDLoss: beta=0 forward KL, 1 reverse KL)
_LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}
# TRL's beta means the same (ChunkedDivergenceFunction: "0.0 is the forward KL(teacher || student),
# 1.0 the reverse KL(student || teacher)", else the JSD with mixture (1 - beta) p_s + beta p_t)
_TRL_BETA = _LIGER_BETA
TRL_MISSING = "not installed: pip install minitron_fast[trl]"
# impls that have no top-k teacher: topk is compared with forward_kl for them
_NO_TOPK = ("torch_naive", "liger_chunked", "trl_chunked")


def trl_loss_fn():
    """``(TRL's _chunked_divergence_loss, None)`` (what ``DistillationTrainer._compute_loss`` calls), or
    ``(None, note)`` when ``trl`` cannot be imported (the note says how to install it)."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError as exc:
        if (getattr(exc, "name", None) or "").split(".")[0] == "trl":
            return None, TRL_MISSING
        return None, f"{TRL_MISSING} (importing trl failed: {str(exc).splitlines()[0][:200]})"
    return _chunked_divergence_loss, None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all of the mode)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated impls")
    p.add_argument("--divergences", default="forward_kl", help=f"comma-separated, of {DIVERGENCES}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per (case, impl) process")


def _inputs(N, Hs, Ht, V, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, Hs, generator=g)
    W = torch.randn(V, Hs, generator=g) * (1.0 / Hs ** 0.5)
    th = torch.randn(N, Ht, generator=g)
    tW = torch.randn(V, Ht, generator=g) * (1.5 / Ht ** 0.5)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::17] = -100
    return h, W, th, tW, labels


def _topk_teacher(th, tW, k=TOPK, chunk=256):
    """The teacher's top-k logits and the log-sum-exp of the rest, chunk by chunk (setup, untimed)."""
    import torch

    vals, idx, tail = [], [], []
    for c0 in range(0, th.shape[0], chunk):
        zt = th[c0:c0 + chunk] @ tW.T
        v, i = zt.topk(k, 1)
        vals.append(v)
        idx.append(i)
        tail.append(torch.logsumexp(zt.scatter_(1, i, -float("inf")), 1))
    return torch.cat(vals), torch.cat(idx), torch.cat(tail)


def _kd_kwargs(divergence, th, tW):
    """fused_linear_kd_loss's teacher and divergence arguments for a bench divergence."""
    if divergence == "topk":
        vals, idx, tail = _topk_teacher(th, tW)
        return dict(teacher_topk=(vals, idx), teacher_topk_tail_lse=tail, divergence="forward_kl")
    return dict(teacher_hidden=th, teacher_weight=tW, divergence=divergence, beta=0.5)


def rows_impl_of(impl, divergence, h):
    """The row implementation fused_linear_kd_loss resolves for this bench impl (what actually runs)."""
    from minitron_fast.ops.kd_loss import resolve_rows_impl

    return resolve_rows_impl("torch" if impl == "minitron_fast_torch" else "auto", h, op="fused_linear_kd_loss",
                             divergence="forward_kl" if divergence == "topk" else divergence,
                             teacher_kind="topk" if divergence == "topk" else "hidden")


def make_step(impl, h, W, th, tW, labels, divergence="forward_kl", *, liger_compiled=False):
    """Returns ``step() -> loss`` doing forward+backward (grads land in h.grad / W.grad), on the
    inputs' device and dtype (``bench device_check`` times the same steps on a GPU in bf16; there
    Liger's chunked loss runs compiled, as its users get it)."""
    import torch

    if impl in ("minitron_fast", "minitron_fast_torch"):
        from minitron_fast import fused_linear_kd_loss

        which = "torch" if impl == "minitron_fast_torch" else "auto"
        kw = _kd_kwargs(divergence, th, tW)

        def step():
            h.grad = W.grad = None
            loss = fused_linear_kd_loss(h, W, labels=labels, impl=which, **kw)
            loss.backward()
            return loss
    elif impl == "torch_naive":
        from minitron_fast.ops.kd_loss import REGISTRY

        if divergence == "topk":
            raise ValueError("torch_naive has no top-k row (compare topk with forward_kl)")
        formula = REGISTRY[divergence].reference  # the plain formula, autograd in fp32

        def step():
            h.grad = W.grad = None
            zs = (h @ W.T).float()  # fp32 softmax math whatever the inputs' dtype
            zt = (th @ tW.T).float()
            valid = labels != -100
            kl = formula(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), 0.5)
            loss = (kl * valid).sum() / valid.sum().clamp_min(1)
            loss.backward()
            return loss
    elif impl == "liger_chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        if divergence == "topk":
            raise ValueError("liger_chunked has no top-k teacher (compare topk with forward_kl)")
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=_LIGER_BETA[divergence],
                                     temperature=1.0, compiled=liger_compiled)

        def step():
            h.grad = W.grad = None
            loss = fn(h, W, th, tW, labels)
            loss.backward()
            return loss
    elif impl == "trl_chunked":
        if divergence == "topk":
            raise ValueError("trl_chunked has no top-k teacher (compare topk with forward_kl)")
        loss_fn, missing = trl_loss_fn()
        if loss_fn is None:
            raise ImportError(missing)
        beta = _TRL_BETA[divergence]

        def step():
            h.grad = W.grad = None
            # as DistillationTrainer._compute_loss calls it: [B, K, H] hidden states aligned to the
            # completion tokens, a [B, K] completion mask (1 = in the loss), mean over those tokens
            mask = (labels != -100)[None]
            loss, _, _ = loss_fn(h[None], th[None], W, tW, mask, beta, temperature=1.0)
            loss.backward()
            return loss
    elif impl == "liger_fused_jsd":  # Liger's Triton fused linear JSD (CUDA only)
        from liger_kernel.transformers import LigerFusedLinearJSD

        if divergence == "topk":
            raise ValueError("liger_fused_jsd has no top-k teacher (compare topk with forward_kl)")
        fn = LigerFusedLinearJSD(jsd_beta=_LIGER_BETA[divergence], temperature=1.0)

        def step():
            h.grad = W.grad = None
            loss = fn(h, W, th, tW, labels)
            loss.backward()
            return loss
    elif impl == "gemm_floor":
        N, V = h.shape[0], W.shape[0]
        zs = torch.ones(N, V, device=h.device, dtype=h.dtype)
        zt = torch.ones_like(zs)
        dh = torch.ones_like(h)
        dW = torch.ones_like(W)
        hd, Wd = h.detach(), W.detach()

        def step():
            torch.mm(hd, Wd.T, out=zs)
            torch.mm(th, tW.T, out=zt)
            torch.mm(zs, Wd, out=dh)
            torch.mm(zs.T, hd, out=dW)
            return None
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return step


def _check(impl, h, W, th, tW, labels, n, divergence="forward_kl"):
    """Loss and grads of ``impl`` on the first n tokens vs the float64 reference; max rel errors."""
    import torch

    from minitron_fast.ops.kd_loss import kd_loss_reference

    if impl == "gemm_floor":
        return True, {}
    hs = h.detach()[:n].clone().requires_grad_()
    Ws = W  # the timed leaf itself (each step resets its grad): no second copy of a 128k-row head
    step = make_step(impl, hs, Ws, th[:n], tW, labels[:n], divergence)
    loss = step()
    # float64 throughout when the heads are small; at Llama shapes a float64 copy of both heads
    # (7+ GB) does not fit beside the other agents' jobs, so the GEMMs stay fp32 there and the
    # softmax/KL math of the reference is still float64
    ref_dtype = torch.float64 if W.numel() + tW.numel() <= 2e8 else torch.float32
    h64 = hs.detach().to(ref_dtype).requires_grad_()
    W64 = Ws.detach().to(ref_dtype).requires_grad_()  # shares storage when ref_dtype is fp32
    if divergence == "topk":
        vals, idx, tail = _topk_teacher(th[:n], tW)
        ref = kd_loss_reference(h64 @ W64.T, teacher_topk=(vals, idx), teacher_topk_tail_lse=tail, labels=labels[:n])
    else:
        ref = kd_loss_reference(h64 @ W64.T, th[:n].to(ref_dtype) @ tW.to(ref_dtype).T, labels=labels[:n],
                                divergence=divergence, beta=0.5)
    rh, rW = torch.autograd.grad(ref, (h64, W64))

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))

    errs = {"err_loss": abs(float(loss.detach()) - float(ref.detach())) / max(abs(float(ref.detach())), 1e-12),
            "err_dh": rel(hs.grad, rh), "err_dw": rel(Ws.grad, rW)}
    # check_loss: the loss on the check tokens (the same inputs for every impl of a case, so rows compare)
    return all(v < 1e-3 for v in errs.values()), dict(errs, check_loss=float(loss.detach()))


def worker(case, impl, N, Hs, Ht, V, reps, warmup, check_tokens, divergence="forward_kl"):
    """Runs in a fresh process: builds inputs, times fwd+bwd, records peak RSS, then checks."""
    import torch

    from bench.common import peak_rss_mb, rss_mb, time_fn

    if impl == "trl_chunked" and trl_loss_fn()[0] is None:
        # a peer that is not installed: the row says so (it ran nothing; no failed check)
        return {"case": case, "impl": impl, "divergence": divergence, "ok": False, "ran": False,
                "note": trl_loss_fn()[1]}
    torch.manual_seed(0)
    h, W, th, tW, labels = _inputs(N, Hs, Ht, V)
    h.requires_grad_()
    W.requires_grad_()
    gc.collect()
    base_mb = rss_mb()
    owed_mb = (h.numel() + W.numel()) * 4 / 2**20  # dX and dW, every implementation returns them
    step = make_step(impl, h, W, th, tW, labels, divergence)
    cpu = []  # the process's CPU seconds per step (all threads): steadier than wall time beside other jobs

    def cpu_timed_step():
        c0 = time.process_time()
        out = step()
        cpu.append(time.process_time() - c0)
        return out

    t0 = time.perf_counter()
    timing = time_fn(cpu_timed_step, warmup=warmup, reps=reps)
    total_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    ok, errs = _check(impl, h, W, th, tW, labels, check_tokens, divergence)
    ran = rows_impl_of(impl, divergence, h) if impl.startswith("minitron_fast") else None
    flops = 2.0 * N * V * (Ht + 3 * Hs)
    return {"case": case, "impl": impl, "divergence": divergence, "rows_impl": ran, "N": N, "Hs": Hs, "Ht": Ht,
            "V": V, **timing, "peak_mb": peak,
            "inputs_mb": base_mb, "workspace_mb": (peak - base_mb - (0 if impl == "gemm_floor" else owed_mb)),
            "cpu_median_s": statistics.median(cpu[warmup:]),
            "gflops": flops / timing["median_s"] / 1e9, "bench_total_s": total_s, "ok": ok, **errs,
            "torch_threads": torch.get_num_threads()}


def run(args) -> list[dict]:
    from bench.common import run_in_subprocess

    cases = QUICK_CASES if args.quick else CASES
    if args.cases:
        want = args.cases.split(",")
        allc = {**CASES, **QUICK_CASES, **TEST_CASES}
        unknown = [c for c in want if c not in allc]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(allc)}")
        cases = {c: allc[c] for c in want}
    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown impl {i!r}; known: {IMPLS}")
    divs = [d for d in getattr(args, "divergences", "forward_kl").split(",") if d]
    for d in divs:
        if d not in DIVERGENCES:
            raise SystemExit(f"unknown divergence {d!r}; known: {DIVERGENCES}")
    reps = args.reps or 2
    rows = []
    for case, (N, Hs, Ht, V) in cases.items():
        for div in divs:
            case_rows = []
            for impl in impls:
                if div == "topk" and impl in _NO_TOPK:
                    continue  # no top-k teacher there: topk is compared with forward_kl
                print(f"[kd_loss] {case} {div} {impl} ...", flush=True)
                r = run_in_subprocess("bench.kd_loss:worker",
                                      dict(case=case, impl=impl, N=N, Hs=Hs, Ht=Ht, V=V, reps=reps, warmup=1,
                                           check_tokens=min(N, 32), divergence=div), timeout=args.timeout)
                r.setdefault("case", case)
                r.setdefault("impl", impl)
                r.setdefault("divergence", div)
                if r.get("median_s") is not None:
                    print(f"    median {r['median_s']:.3f}s  peak {r['peak_mb']:.0f} MB  workspace "
                          f"{r['workspace_mb']:.0f} MB  ok={r.get('ok')}", flush=True)
                elif r.get("note"):
                    print(f"    {r['note']}", flush=True)
                else:
                    print(f"    failed: {r.get('error', '')[-300:]}", flush=True)
                print("    row " + json.dumps(r), flush=True)  # partial results survive an interrupted run
                case_rows.append(r)
            by = {r["impl"]: r for r in case_rows if r.get("ok") and r.get("median_s")}
            for r in case_rows:
                if not (r.get("ok") and r.get("median_s")):
                    continue
                for base, key in (("torch_naive", "vs_naive"), ("liger_chunked", "vs_liger"),
                                  ("trl_chunked", "vs_trl"), ("gemm_floor", "vs_floor"),
                                  ("minitron_fast_torch", "vs_torch_path")):
                    if base in by:
                        r[key] = r["median_s"] / by[base]["median_s"]
                for base, key in (("torch_naive", "workspace_vs_naive"), ("trl_chunked", "workspace_vs_trl")):
                    if base in by and by[base].get("workspace_mb", 0) > 0:
                        r[key] = r["workspace_mb"] / by[base]["workspace_mb"]
                if "trl_chunked" in by and by["trl_chunked"].get("peak_mb"):
                    r["peak_vs_trl"] = r["peak_mb"] / by["trl_chunked"]["peak_mb"]
                if "trl_chunked" in by and by["trl_chunked"].get("cpu_median_s"):
                    r["cpu_vs_trl"] = r["cpu_median_s"] / by["trl_chunked"]["cpu_median_s"]
            rows.extend(case_rows)
    # each impl's time relative to its own forward-KL row of the same run and case
    fkl = {(r["case"], r["impl"]): r["median_s"] for r in rows
           if r.get("divergence") == "forward_kl" and r.get("ok") and r.get("median_s")}
    for r in rows:
        base = fkl.get((r["case"], r["impl"]))
        if base and r.get("ok") and r.get("median_s") and r.get("divergence") != "forward_kl":
            r["vs_forward_kl"] = r["median_s"] / base
    return rows


def plot(rows, png_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for r in rows:  # one group of bars per (case, divergence)
        div = r.get("divergence", "forward_kl")
        r["_group"] = r["case"] if div == "forward_kl" else f"{r['case']} {div}"
    cases = list(dict.fromkeys(r["_group"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(IMPLS)
    for j, impl in enumerate(IMPLS):
        t = [next((r["median_s"] for r in rows if r["_group"] == c and r["impl"] == impl and r.get("median_s")), 0)
             for c in cases]
        m = [next((r.get("workspace_mb") or 0 for r in rows if r["_group"] == c and r["impl"] == impl
                   and r.get("median_s")), 0) for c in cases]
        xs = [i + j * width for i in range(len(cases))]
        axes[0].bar(xs, t, width, label=impl)
        axes[1].bar(xs, [max(x, 0) for x in m], width, label=impl)
    for ax, title in ((axes[0], "forward+backward time (s)"), (axes[1], "workspace beyond inputs and dX/dW (MB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=7)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.suptitle("KD loss (fp32, CPU)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    for r in rows:
        r.pop("_group", None)
