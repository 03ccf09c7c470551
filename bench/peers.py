"""``python -m bench peers [--model M] [--data D]``: minitron_fast side by side with the pruning
tools a user would pick instead, at the same parameter budgets, on the same data.

Budgets (``budget``; exact parameter counts, tied embeddings counted once; for SmolLM2-135M):

- ``W``: FFN halved in every layer (1536 -> 768: 94,701,888).
- ``D``: the fewest layers at or above W's count (30 -> 19: 95,573,952).
- ``W2``: hidden and FFN together: hidden 5/6 rounded down to a size the family's config can
  express, FFN whose count is nearest D's (SmolLM2: hidden 477 + FFN 1168, 95,597,001; the 480
  first asked is not a multiple of its 9 heads, which transformers' ``LlamaConfig`` refuses).

Rows (``impl``): ours start with ``minitron_fast``. In D, ``minitron_fast_bi`` drops the contiguous
block of lowest Block Importance (the second Minitron paper's choice, the pipeline's default),
``minitron_fast_bi_top`` the layers of lowest Block Importance wherever they are
(``prune.depth_mode: top``, the first paper's), ``minitron_fast_lm_loss`` the layers whose removal
alone raises the LM loss least (the first paper's other metric) and ``minitron_fast_lm_loss_block``
the contiguous block whose removal raises it least. ``torch_pruning_l2`` / ``torch_pruning_taylor``
run Torch-Pruning's ``BasePruner`` with ``GroupMagnitudeImportance(p=2)`` /
``GroupTaylorImportance()`` through its documented API (the driver is ours: its LLM example is not
in the wheel); ``shortgpt_bi`` (Block Influence 1 - cos(layer input, output), mean over tokens;
the n lowest dropped), ``angular_block`` (Gromov et al.: arccos(cos(x_l, x_l+n))/pi at the last
token; the best contiguous block dropped) and ``deepest_but_last`` are the depth papers'
formulas, written here from the papers; ``random_*`` are controls; ``model_optimizer`` says why
NVIDIA Model-Optimizer cannot run here. ``torch_pruning_l2_heads`` asks Torch-Pruning to prune
query heads (9 -> 6, as its LLM example does) at the W2 shape: it crashes on 9/3 GQA today, and
the row carries its one-line error.

Each row runs in a fresh process: load + calibration + prune are timed there (``prune_s``) and its
peak RSS read right after (``peak_mb``, the process's ``VmHWM``); the pruned model is saved, reloaded
with stock ``transformers`` (``params``: unique parameters after reload; ``reload_max_diff``: the
largest logit difference to the in-memory pruned model, which must be 0), evaluated one-shot
(``oneshot_ppl``) and distilled: the real trainer (``minitron_fast.distill.train``), one recipe for
every row, from the corrected teacher's stored top-k logits (forward KL, T = 1, the same steps,
blocks, learning-rate schedule and seeds), once per ``--seeds`` data order; ``kd_ppl`` is
exp(mean held-out loss over the seeds), ``kd_ppl_seeds`` per seed.

Data: calibration = the first blocks of the ``calib`` split (every method that reads data reads
these), held-out = the ``heldout`` split, distillation = the first train blocks, teacher correction
= the train blocks after those; the bench checks the four token ranges are disjoint in the corpus
(``meta.data``). A peer that is not installed gives a row ``note: "not installed: pip install ..."``,
a peer that crashes a row with its one-line error; neither stops the bench.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = ("minitron_fast vs Torch-Pruning and the depth papers' formulas at equal parameter budgets: one-shot and "
        "equal-token-KD held-out perplexity, prune time, peak RSS")

BUDGETS = ("W", "D", "W2")


@dataclass(frozen=True)
class Impl:
    """One row kind: the budget it serves, the prune function in this module, the package it needs
    (``pip`` name; None: ours or a paper's formula), and where it comes from."""

    budget: str
    fn: str
    pip: str | None = None
    source: str = "minitron_fast"
    kwargs: tuple[tuple[str, Any], ...] = ()
    attempt: bool = False       # prune only (another shape than the budget): shows whether the peer runs
    timeout_s: float | None = None  # a tighter limit for a peer known to crash or hang here


IMPLS: dict[tuple[str, str], Impl] = {
    ("W", "minitron_fast"): Impl("W", "prune_ours"),
    ("W", "torch_pruning_l2"): Impl("W", "prune_torch_pruning", "torch-pruning", "Torch-Pruning",
                                    (("importance", "l2"),)),
    ("W", "torch_pruning_taylor"): Impl("W", "prune_torch_pruning", "torch-pruning", "Torch-Pruning",
                                        (("importance", "taylor"),)),
    ("W", "random_neurons"): Impl("W", "prune_random", source="control"),
    ("W", "model_optimizer"): Impl("W", "prune_model_optimizer", "nvidia-modelopt", "NVIDIA Model-Optimizer"),
    ("D", "minitron_fast_bi"): Impl("D", "prune_ours", kwargs=(("depth_metric", "block_importance"),)),
    ("D", "minitron_fast_bi_top"): Impl("D", "prune_ours", kwargs=(("depth_metric", "block_importance"),
                                                                  ("depth_mode", "top"))),
    ("D", "minitron_fast_lm_loss"): Impl("D", "prune_ours", kwargs=(("depth_metric", "lm_loss"),
                                                                   ("depth_mode", "top"))),
    ("D", "minitron_fast_lm_loss_block"): Impl("D", "prune_ours", kwargs=(("depth_metric", "lm_loss_block"),)),
    ("D", "shortgpt_bi"): Impl("D", "prune_depth_formula", source="ShortGPT (arXiv 2403.03853), formula",
                               kwargs=(("formula", "shortgpt"),)),
    ("D", "angular_block"): Impl("D", "prune_depth_formula", source="Gromov et al. (arXiv 2403.17887), formula",
                                 kwargs=(("formula", "angular"),)),
    ("D", "deepest_but_last"): Impl("D", "prune_depth_formula", source="drop the deepest n but the last",
                                    kwargs=(("formula", "deepest"),)),
    ("D", "random_layers"): Impl("D", "prune_random", source="control"),
    ("W2", "minitron_fast"): Impl("W2", "prune_ours"),
    ("W2", "torch_pruning_l2"): Impl("W2", "prune_torch_pruning", "torch-pruning", "Torch-Pruning",
                                     (("importance", "l2"),)),
    ("W2", "torch_pruning_taylor"): Impl("W2", "prune_torch_pruning", "torch-pruning", "Torch-Pruning",
                                         (("importance", "taylor"),)),
    ("W2", "torch_pruning_l2_heads"): Impl("W2", "prune_torch_pruning", "torch-pruning", "Torch-Pruning",
                                           (("importance", "l2"), ("heads", True)), attempt=True, timeout_s=180),
}
# Where a missing package's import name differs from its pip name.
IMPORT_NAMES = {"torch-pruning": "torch_pruning", "nvidia-modelopt": "modelopt"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="teacher (default demo: the embedded SmolLM2-135M-Instruct; "
                                                 "--quick: a tiny Llama built on the spot)")
    p.add_argument("--data", default="demo", help="any source the pipeline takes (default demo: the embedded text)")
    p.add_argument("--budgets", default="W,D,W2", help="budgets to run (default W,D,W2)")
    p.add_argument("--impls", default="", help="only these impl names (comma-separated; default all)")
    p.add_argument("--targets", default="",
                   help="override budget shapes: 'W=ffn=768;D=layers=19;W2=hidden=477,ffn=1168' (default: from the model)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration blocks (default 64)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration block (default 256)")
    p.add_argument("--lm-loss-samples", type=int, default=4,
                   help="calibration blocks our LM-loss depth metrics evaluate each skipped layer on (default 4)")
    p.add_argument("--heldout-samples", type=int, default=32,
                   help="held-out blocks (default 32, capped at what the heldout split holds: 13 on the demo text)")
    p.add_argument("--heldout-seq-len", type=int, default=512, help="tokens per held-out block (default 512)")
    p.add_argument("--kd-steps", type=int, default=8,
                   help="distillation steps per row and seed (default 8: 8,192 tokens with the defaults, half the demo's)")
    p.add_argument("--kd-batch", type=int, default=4, help="blocks per distillation step (default 4)")
    p.add_argument("--kd-seq-len", type=int, default=256, help="tokens per distillation block (default 256)")
    p.add_argument("--kd-lr", type=float, default=3e-4, help="peak learning rate (default 3e-4, cosine to 1/10)")
    p.add_argument("--kd-warmup", type=int, default=2, help="warm-up steps (default 2)")
    p.add_argument("--top-k", type=int, default=64, help="stored teacher logits per token (default 64, plus the tail)")
    p.add_argument("--correct-steps", type=int, default=4, help="teacher-correction steps (default 4; 0: none)")
    p.add_argument("--correct-batch", type=int, default=4, help="blocks per correction step (default 4)")
    p.add_argument("--correct-lr", type=float, default=2e-5, help="correction learning rate (default 2e-5)")
    p.add_argument("--seeds", default="0,1", help="distillation data orders (default 0,1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random controls (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every process")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per row process (default 3600)")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoints, logits, runs (default: a temp dir)")


# -- budgets ---------------------------------------------------------------------------------------

def default_targets(config: Any) -> dict[str, str]:
    """The three budgets' target strings for ``config`` (module doc)."""
    from minitron_fast.artifacts.targets import TargetError, target_geometry
    from minitron_fast.models import view_class_for_config

    vc = view_class_for_config(config)
    src = vc.geometry_of(config)

    def count(g) -> int:
        return vc.count_params(config, g)["total"]

    ffn_w = src.intermediate_size // 2
    n_w = count(src.replace(intermediate_size=ffn_w))
    layers = next(n for n in range(1, src.num_hidden_layers + 1)
                  if count(src.replace(num_hidden_layers=n)) >= n_w)
    n_d = count(src.replace(num_hidden_layers=layers))
    hidden = None
    for h in range(round(src.hidden_size * 5 / 6), 0, -1):
        try:
            target_geometry(config, f"hidden={h}")
        except TargetError:
            continue
        hidden = h
        break
    step = 8 if src.intermediate_size >= 256 else 1
    ffn2 = min(range(step, src.intermediate_size + 1, step),
               key=lambda f: abs(count(src.replace(hidden_size=hidden, intermediate_size=f)) - n_d))
    return {"W": f"ffn={ffn_w}", "D": f"layers={layers}", "W2": f"hidden={hidden},ffn={ffn2}"}


def parse_targets(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (s.strip() for s in text.split(";"))):
        name, _, target = part.partition("=")
        if name not in BUDGETS or not target:
            raise SystemExit(f"--targets {part!r}: expected BUDGET=target with BUDGET one of {', '.join(BUDGETS)}")
        out[name] = target
    return out


# -- data ------------------------------------------------------------------------------------------

def _intervals(blocks: Any, b0: int, b1: int) -> list[tuple[int, int]]:
    """Corpus token ranges ``[start, end)`` holding blocks ``b0 .. b1-1`` of a ``TokenBlocks`` split."""
    import numpy as np

    starts, lens = blocks.corpus.spans(blocks.split, blocks.seq_len)
    cum = np.concatenate([[0], np.cumsum(lens)])
    p0, p1 = b0 * blocks.seq_len, b1 * blocks.seq_len
    out = []
    for s in range(int(np.searchsorted(cum, p0, side="right")) - 1, len(lens)):
        lo, hi = max(p0, int(cum[s])), min(p1, int(cum[s + 1]))
        if lo >= p1:
            break
        if hi > lo:
            out.append((int(starts[s]) + lo - int(cum[s]), int(starts[s]) + hi - int(cum[s])))
    return out


def disjoint(sets: dict[str, list[tuple[int, int]]]) -> bool:
    """Whether no two sets of ``[start, end)`` ranges share a token."""
    tagged = sorted((a, b, name) for name, ivs in sets.items() for a, b in ivs)
    return all(tagged[i][1] <= tagged[i + 1][0] for i in range(len(tagged) - 1))


def prepare_data(tok: Any, data: str, work: Path, *, n_cal: int, t_cal: int, n_ho: int, t_ho: int, n_kd: int,
                 t_kd: int, n_corr: int) -> dict[str, Any]:
    """Cuts the four sets, saves calibration / held-out / correction blocks as tensors in ``work``
    (the distillation blocks are read by the trainer itself: the first ``n_kd`` train blocks), and
    returns their description, with ``disjoint`` checked on corpus token ranges."""
    import torch

    from minitron_fast.data import TokenBlocks

    cal = TokenBlocks.open(tok, data, "calib", t_cal, progress=False).require_one()
    ho = TokenBlocks.open(tok, data, "heldout", t_ho, progress=False).require_one()
    tr = TokenBlocks.open(tok, data, "train", t_kd, progress=False).require_one()
    if len(cal) < n_cal:
        print(f"   note: the calib split holds {len(cal)} blocks of {t_cal} tokens; using {len(cal)} (asked {n_cal})")
        n_cal = len(cal)
    if len(ho) < n_ho:
        print(f"   note: the heldout split holds {len(ho)} blocks of {t_ho} tokens; using {len(ho)} (asked {n_ho})")
        n_ho = len(ho)
    if len(tr) < n_kd + n_corr:
        raise SystemExit(f"the train split of {data} holds {len(tr)} blocks of {t_kd} tokens; distillation and "
                         f"teacher correction need {n_kd} + {n_corr}")
    torch.save(cal[list(range(n_cal))], work / "calib.pt")
    torch.save(ho[list(range(n_ho))], work / "heldout.pt")
    if n_corr:
        torch.save(tr[list(range(n_kd, n_kd + n_corr))], work / "correct.pt")
    ranges = {"calib": _intervals(cal, 0, n_cal), "heldout": _intervals(ho, 0, n_ho),
              "distill": _intervals(tr, 0, n_kd), "correct": _intervals(tr, n_kd, n_kd + n_corr)}
    return {"source": str(data),
            "calib": {"split": "calib", "blocks": [0, n_cal], "seq_len": t_cal, "tokens": n_cal * t_cal},
            "heldout": {"split": "heldout", "blocks": [0, n_ho], "seq_len": t_ho, "tokens": n_ho * t_ho},
            "distill": {"split": "train", "blocks": [0, n_kd], "seq_len": t_kd, "tokens": n_kd * t_kd},
            "correct": {"split": "train", "blocks": [n_kd, n_kd + n_corr], "seq_len": t_kd, "tokens": n_corr * t_kd},
            "disjoint": disjoint(ranges)}


# -- the teacher: correction and stored top-k logits (one fresh process) -----------------------------

def teacher_case(model: str, data: str, work: str, steps: int, lr: float, t_kd: int, n_kd: int, top_k: int,
                 threads: int | None) -> dict[str, Any]:
    """Held-out loss of the teacher; teacher correction (LM loss on the correction blocks: AdamW,
    one warm-up step, cosine to lr/10); its held-out loss; its top-k logits for the distillation
    blocks (``minitron_fast.teacher_logits``)."""
    import torch

    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.ops.kd_step import KDSpec, kd_step
    from minitron_fast.models.loading import load_model, load_tokenizer
    from minitron_fast.teacher_logits import TeacherLogitsConfig, write_teacher_logits

    if threads:
        torch.set_num_threads(threads)
    w = Path(work)
    heldout = torch.load(w / "heldout.pt")
    teacher = load_model(model)
    out: dict[str, Any] = {"ok": True, "teacher_loss": lm_loss(teacher, heldout, batch_size=4, progress=False)}
    t0 = time.perf_counter()
    if steps:
        batches = torch.load(w / "correct.pt").chunk(steps)
        opt = torch.optim.AdamW(teacher.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i, steps, 1, 0.1))
        torch.manual_seed(0)
        teacher.train()
        for ids in batches:
            loss = kd_step(teacher, None, ids, spec=KDSpec(kd_weight=0.0, lm_weight=1.0))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
            opt.step()
            sched.step()
        teacher.eval()
    out["correct_s"] = time.perf_counter() - t0
    out["corrected_loss"] = lm_loss(teacher, heldout, batch_size=4, progress=False)
    corrected = w / "teacher_corrected"
    teacher.save_pretrained(corrected)
    load_tokenizer(model).save_pretrained(corrected)
    del teacher
    gc.collect()
    m = write_teacher_logits(str(corrected), data, out=w / "logits", progress=False,
                             config=TeacherLogitsConfig(top_k=top_k, seq_len=t_kd, samples=n_kd, device="cpu"))
    out.update(logits_s=m["write_seconds"], bytes_per_token=m["bytes_per_token"])
    return out


def _cosine(i: int, steps: int, warmup: int, floor: float) -> float:
    """Learning-rate factor at step ``i``: linear warm-up, then cosine from 1 to ``floor``."""
    if i < warmup:
        return (i + 1) / warmup
    t = (i - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# -- the prune functions (each: load + calibration + prune, timed by the caller) -------------------

@dataclass
class Ctx:
    model: str            # a checkpoint directory
    target: str           # our target grammar, e.g. "ffn=768"
    calib: Any            # [n, T] calibration blocks
    lm_blocks: int        # calibration blocks the LM-loss depth metrics use
    seed: int


def _geometry(ctx: Ctx):
    from minitron_fast.artifacts.targets import target_geometry
    from minitron_fast.models import view_class_for_config
    from minitron_fast.models.loading import load_config

    config = load_config(ctx.model)
    return view_class_for_config(config).geometry_of(config), target_geometry(config, ctx.target)


def prune_ours(ctx: Ctx, depth_metric: str = "block_importance", depth_mode: str = "contiguous") -> Any:
    """minitron_fast's public stages: importance (one forward pass over the calibration blocks; for
    the LM-loss depth metrics, each skipped layer / block evaluated on the first ``lm_blocks`` of
    them), the prune plan (defaults: contiguous depth blocks), in-place surgery."""
    from minitron_fast.importance import compute_importance, depth_lm_loss
    from minitron_fast.models.loading import load_model
    from minitron_fast.prune import apply_plan, make_plan

    src, geo = _geometry(ctx)
    model = load_model(ctx.model)
    if depth_metric in ("lm_loss", "lm_loss_block"):
        n_drop = src.num_hidden_layers - geo.num_hidden_layers
        d = depth_lm_loss(model, ctx.calib[:ctx.lm_blocks], block_size=n_drop if depth_metric == "lm_loss_block" else None,
                          batch_size=8, progress=False)
        scores = {"depth.lm_loss": d["per_layer"]} if depth_metric == "lm_loss" else {"depth.lm_loss_block": d["block"]}
    else:
        scores = compute_importance(model, ctx.calib, batch_size=8, progress=False)
    return apply_plan(model, make_plan(model, scores, ctx.target, depth_metric=depth_metric, depth_mode=depth_mode))


def prune_random(ctx: Ctx) -> Any:
    """Control: random neurons (W) or random layers (D), seeded; our surgery."""
    import torch

    from minitron_fast.models.loading import load_model
    from minitron_fast.prune import apply_plan, make_plan

    src, geo = _geometry(ctx)
    g = torch.Generator().manual_seed(ctx.seed)
    model = load_model(ctx.model)
    scores: dict[str, Any] = {f"layers.{i}.neurons": torch.rand(src.intermediate_size, generator=g)
                              for i in range(src.num_hidden_layers)}
    scores["depth.block_importance"] = torch.rand(src.num_hidden_layers, generator=g)
    scores["channels"] = torch.rand(src.hidden_size, generator=g)
    return apply_plan(model, make_plan(model, scores, ctx.target, depth_mode="top"))


def _layer_states(model: Any, calib: Any, batch_size: int = 8) -> tuple[Any, Any]:
    """From forward hooks on the decoder layers, over the calibration blocks: ``bi [L]``, the mean
    over tokens of 1 - cos(layer input, layer output) (ShortGPT's Block Influence), and ``last
    [n, L+1, H]``, the residual stream at the last token entering each layer and leaving the last."""
    import torch
    import torch.nn.functional as F

    from minitron_fast.models import get_view

    mods = list(get_view(model).decoder_layers)
    L = len(mods)
    cur: dict[int, Any] = {}
    bi = torch.zeros(L, dtype=torch.float64)
    lasts, n_tok = [], 0

    def first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def pre(i):
        def hook(mod, args, kwargs):
            cur[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def post(i):
        def hook(mod, args, kwargs, out):
            y = first(out).detach()
            bi[i] += (1 - F.cosine_similarity(cur[i].double(), y.double(), dim=-1)).sum()
            if i == L - 1:
                cur[L] = y
        return hook

    handles = [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, m in enumerate(mods)]
    handles += [m.register_forward_hook(post(i), with_kwargs=True) for i, m in enumerate(mods)]
    try:
        with torch.no_grad():
            for s in range(0, calib.shape[0], batch_size):
                ids = calib[s:s + batch_size]
                model.base_model(input_ids=ids, use_cache=False)
                lasts.append(torch.stack([cur[i][:, -1].double() for i in range(L + 1)], dim=1))
                n_tok += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return bi / n_tok, torch.cat(lasts)


def prune_depth_formula(ctx: Ctx, formula: str) -> Any:
    """The depth papers' rules, from their formulas: ``shortgpt`` drops the n layers of lowest
    Block Influence; ``angular`` the block of n layers starting at the l minimizing the mean over
    calibration blocks of arccos(cos(x_l, x_l+n))/pi at the last token; ``deepest`` layers
    L-1-n .. L-2. Layers are removed by our surgery (a plan keeping the chosen layers)."""
    import torch

    from minitron_fast.models.loading import load_model
    from minitron_fast.prune import apply_plan, make_plan

    src, geo = _geometry(ctx)
    L, n = src.num_hidden_layers, src.num_hidden_layers - geo.num_hidden_layers
    model = load_model(ctx.model)
    if formula == "deepest":
        drop = list(range(L - 1 - n, L - 1))
    else:
        bi, last = _layer_states(model, ctx.calib)
        if formula == "shortgpt":
            drop = sorted(torch.sort(bi, stable=True).indices[:n].tolist())
        else:
            a, b = last[:, :L - n + 1], last[:, n:]
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)   # [samples, L-n+1]
            d = (torch.arccos(cos) / math.pi).mean(0)
            s0 = int(torch.argmin(d))
            drop = list(range(s0, s0 + n))
    keep = torch.ones(L)
    keep[drop] = 0.0
    return apply_plan(model, make_plan(model, {"depth.block_importance": keep}, ctx.target, depth_mode="top"))


def prune_torch_pruning(ctx: Ctx, importance: str = "l2", heads: bool = False) -> Any:
    """Torch-Pruning 1.6's documented LLM use: ``tp.pruner.BasePruner`` over the HF model
    (``output_transform=lambda o: o.logits``), ``GroupMagnitudeImportance(p=2)`` or
    ``GroupTaylorImportance()`` (gradients of the LM loss over the calibration blocks), local
    per-layer ratios: FFN groups at the target FFN and, for a hidden target, the residual-stream
    group at the target hidden size (attention projections' outputs and the LM head ignored), then
    the config fixed by hand and a tied embedding re-tied (its hidden pruning unties it in memory).
    ``heads``: also query heads 9 -> 6 per layer (``num_heads``, ``prune_num_heads=True``)."""
    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    from minitron_fast.models import get_view

    src, geo = _geometry(ctx)
    model = AutoModelForCausalLM.from_pretrained(ctx.model, dtype=torch.float32)
    model.config.use_cache = False
    view = get_view(model)
    layers = view.layers
    if importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
        model.zero_grad()
        for s in range(0, ctx.calib.shape[0], 4):
            ids = ctx.calib[s:s + 4]
            model(input_ids=ids, labels=ids).loss.backward()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    ignored = [view.lm_head]
    ratios: dict[Any, float] = {}

    def cut(keep: int, n: int) -> float:  # TP keeps int(n * (1 - ratio)) channels: aim between integers
        return 1 - (keep + 0.5) / n

    for lay in layers:
        ignored += [lay.q_proj, lay.k_proj, lay.v_proj]
        if geo.hidden_size == src.hidden_size:
            ignored += [lay.o_proj, lay.down_proj]
        if geo.intermediate_size < src.intermediate_size:
            ratios[lay.gate_proj] = cut(geo.intermediate_size, src.intermediate_size)
        else:
            ignored += [lay.gate_proj, lay.up_proj]
    if geo.hidden_size < src.hidden_size:
        ratios[layers[0].down_proj] = cut(geo.hidden_size, src.hidden_size)
    kw: dict[str, Any] = {}
    if heads:
        kw = dict(num_heads={m: n for lay in layers for m, n in ((lay.q_proj, src.num_attention_heads),
                                                                  (lay.k_proj, src.num_key_value_heads),
                                                                  (lay.v_proj, src.num_key_value_heads))},
                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=1 / 3)
        ignored = [m for m in ignored if not any(m is lay.q_proj or m is lay.k_proj or m is lay.v_proj
                                                 for lay in layers)]
    pruner = tp.pruner.BasePruner(model, ctx.calib[:1, :8], importance=imp, pruning_ratio=0.0,
                                  pruning_ratio_dict=ratios, ignored_layers=ignored,
                                  output_transform=lambda o: o.logits, **kw)
    for group in pruner.step(interactive=True):
        group.prune()
    model.zero_grad(set_to_none=True)
    # the config, by hand (Torch-Pruning changes tensors only)
    lay0 = layers[0]
    model.config.intermediate_size = lay0.gate_proj.out_features
    model.config.hidden_size = view.embed_tokens.weight.shape[1]
    if heads:
        model.config.num_attention_heads = lay0.q_proj.out_features // src.head_dim
        model.config.num_key_value_heads = lay0.k_proj.out_features // src.head_dim
    if getattr(model.config, "tie_word_embeddings", False):
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head.weight is not emb.weight:
            if not torch.equal(head.weight, emb.weight):
                raise RuntimeError("pruned embedding and LM head differ; cannot re-tie them")
            head.weight = emb.weight
    return model.eval()


def prune_model_optimizer(ctx: Ctx) -> Any:
    """NVIDIA Model-Optimizer's Minitron pruning (``mtp.prune(mode="mcore_minitron")``) takes a
    Megatron-Core model; an HF model needs a Megatron-Bridge round trip. Where it is installed,
    this says which part is missing."""
    import importlib.util

    import modelopt  # noqa: F401  (ImportError: the "not installed" row)

    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise CannotRun("Minitron pruning (mode mcore_minitron) prunes Megatron-Core models only; megatron-core is "
                        "not installed here (an HF model needs a Megatron-Bridge round trip, GPU containers)")
    raise CannotRun("Minitron pruning (mode mcore_minitron) prunes Megatron-Core models only; this bench's rows are "
                    "HF checkpoints")


class CannotRun(RuntimeError):
    """A peer that is installed but cannot run on this model or machine (the row's note says why)."""


# -- one row, in a fresh process -------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"[:300]


def row_case(budget: str, impl: str, model: str, target: str, work: str, data: str, lm_blocks: int, seed: int,
             seeds: list[int], kd: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Prunes (timed, peak RSS), saves, reloads with stock transformers (params, logits), evaluates
    one-shot and after the distillation recipe for each seed. Returns the row's numbers."""
    import importlib
    import importlib.metadata

    import torch

    from minitron_fast.io import peak_rss_mb

    if threads:
        torch.set_num_threads(threads)
    spec = IMPLS[(budget, impl)]
    w = Path(work)
    out: dict[str, Any] = {"ok": True}
    if spec.pip:
        try:
            importlib.import_module(IMPORT_NAMES.get(spec.pip, spec.pip))
            out["version"] = importlib.metadata.version(spec.pip)
        except ImportError:
            return {"ok": False, "note": f"not installed: pip install {spec.pip}"}
    elif spec.source == "minitron_fast":
        out["version"] = importlib.metadata.version("minitron_fast")
    calib = torch.load(w / "calib.pt")
    heldout = torch.load(w / "heldout.pt")
    ctx = Ctx(model=model, target=target, calib=calib, lm_blocks=lm_blocks, seed=seed)
    out["rss_before_mb"] = peak_rss_mb()
    t0 = time.perf_counter()
    try:
        pruned = globals()[spec.fn](ctx, **dict(spec.kwargs))
    except CannotRun as exc:
        return dict(out, ok=False, note=f"cannot run here: {exc}")
    except Exception as exc:  # noqa: BLE001  a peer's crash is the row's result
        return dict(out, ok=False, note=f"crashed: {_one_line(exc)}")
    out["prune_s"] = time.perf_counter() - t0
    out["peak_mb"] = peak_rss_mb()
    if spec.attempt:
        c = pruned.config
        return dict(out, params=sum(p.numel() for p in pruned.parameters()),
                    note=f"prune only, not evaluated: another shape than the budget (hidden {c.hidden_size}, FFN "
                         f"{c.intermediate_size}, heads {c.num_attention_heads}/{c.num_key_value_heads})")

    # save, reload with stock transformers, compare logits and count
    from transformers import AutoModelForCausalLM

    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.models.loading import load_tokenizer

    ckpt = w / f"ckpt-{budget}-{impl}"
    shutil.rmtree(ckpt, ignore_errors=True)
    probe = calib[:2, :64]
    pruned.eval()
    with torch.no_grad():
        ref = pruned(input_ids=probe, use_cache=False).logits
    attn = pruned.config._attn_implementation
    digest = weights_digest(pruned)
    pruned.save_pretrained(ckpt)
    load_tokenizer(model).save_pretrained(ckpt)
    del pruned
    gc.collect()
    re = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation=attn).eval()
    with torch.no_grad():
        out["reload_max_diff"] = float((re(input_ids=probe, use_cache=False).logits - ref).abs().max())
    out["params"] = sum(p.numel() for p in re.parameters())   # shared (tied) tensors once
    out["oneshot_loss"] = lm_loss(re, heldout, batch_size=4, progress=False)
    del re
    gc.collect()

    # the one distillation recipe, once per data order
    from minitron_fast.distill import load_config, train

    # two methods that pick the same layers (or neurons) give the same weights, and the recipe is
    # deterministic (one seed, one data order, fixed threads): their distillation runs are run once
    cache = w / "kd-cache" / f"{digest}.json"
    key = {"seeds": list(seeds), "kd": kd, "data": data, "threads": threads}
    if cache.is_file():
        hit = json.loads(cache.read_text())
        if hit["key"] == key:
            shutil.rmtree(ckpt, ignore_errors=True)
            return dict(out, kd_s=0.0, kd_losses=hit["kd_losses"], kd_reused_from=hit["impl"])
    losses = []
    t_kd = time.perf_counter()
    for s in seeds:
        run = w / f"run-{budget}-{impl}-s{s}"
        shutil.rmtree(run, ignore_errors=True)
        ov = [f"student={ckpt}", f"out={run}", f"teacher_logits={w / 'logits'}", f"steps={kd['steps']}",
              f"micro_batch_size={kd['batch']}", "grad_accum=1", f"data.source={data}", f"data.seq_len={kd['seq_len']}",
              f"data.max_blocks={kd['steps'] * kd['batch']}", "data.eval_blocks=0", f"data.seed={s}", f"seed={s}",
              f"lr={kd['lr']}", f"min_lr={kd['lr'] / 10}", f"warmup_steps={kd['warmup']}", "schedule=cosine",
              "loss.kd_weight=1.0", "loss.lm_weight=0.0", "loss.temperature=1.0", "loss.divergence=forward_kl",
              "loss.topk_semantics=tail", f"save_every={10**6}", f"eval_every={10**6}", "export=true",
              "deepspeed.zero_stage=1"]
        if threads:
            ov.append(f"threads={threads}")
        train(load_config(None, ov), progress=False)
        st = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
        losses.append(lm_loss(st, heldout, batch_size=4, progress=False))
        del st
        gc.collect()
        shutil.rmtree(run, ignore_errors=True)
    out["kd_s"] = time.perf_counter() - t_kd
    out["kd_losses"] = losses
    cache.parent.mkdir(exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"impl": impl, "key": key, "kd_losses": losses}))
    tmp.replace(cache)
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def weights_digest(model: Any) -> str:
    """SHA-256 of a model's tensors (names, dtypes, shapes, bytes; tied tensors once)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# -- the driver ------------------------------------------------------------------------------------

def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    s = dict(n_cal=args.calib_samples, t_cal=args.calib_seq_len, lm=args.lm_loss_samples, n_ho=args.heldout_samples,
             t_ho=args.heldout_seq_len, kd_steps=args.kd_steps, kd_batch=args.kd_batch, t_kd=args.kd_seq_len,
             top_k=args.top_k, c_steps=args.correct_steps, c_batch=args.correct_batch)
    if args.quick:  # tiny sizes: the whole bench in about two minutes on 2 cores with the tiny model
        s.update(n_cal=8, t_cal=32, lm=2, n_ho=4, t_ho=64, kd_steps=2, kd_batch=2, t_kd=32, top_k=16, c_steps=1,
                 c_batch=2)
    return s


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.common import work_dir

    saved = os.environ.get("MINITRON_FAST_TOKEN_CACHE")
    try:
        with work_dir(args.workdir, "peers-") as work:
            rows, info = _run(args, work)
    finally:
        if saved is None:
            os.environ.pop("MINITRON_FAST_TOKEN_CACHE", None)
        else:
            os.environ["MINITRON_FAST_TOKEN_CACHE"] = saved
    if getattr(args, "json", None):
        write_markdown(rows, info, Path(args.json).with_suffix(".md"))
    return rows


def _run(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import importlib.util

    from bench.common import make_tiny_teacher, run_in_subprocess
    from minitron_fast.models import view_class_for_config
    from minitron_fast.models.loading import load_config, load_tokenizer, resolve_model_path
    from minitron_fast.artifacts.targets import target_geometry

    t_start = time.perf_counter()
    z = _sizes(args)
    model = args.model or ("tiny" if args.quick else "demo")
    if model == "tiny":
        model = str(make_tiny_teacher(work / "tiny_teacher"))
        # its own token cache: the shared one is keyed by the corpus, and a second tokenizer would
        # make every later SmolLM2 run re-tokenize the demo text
        os.environ["MINITRON_FAST_TOKEN_CACHE"] = str(work / "tokens")
    model_dir = str(resolve_model_path(model))
    config = load_config(model_dir)
    vc = view_class_for_config(config)
    src = vc.geometry_of(config)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    bad = [b for b in budgets if b not in BUDGETS]
    if bad:
        raise SystemExit(f"--budgets {','.join(bad)}: unknown; budgets are {', '.join(BUDGETS)}")
    targets = dict(default_targets(config), **parse_targets(args.targets))
    only = {s.strip() for s in args.impls.split(",") if s.strip()}
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    n_kd = z["kd_steps"] * z["kd_batch"]
    n_corr = z["c_steps"] * z["c_batch"]
    tok = load_tokenizer(model_dir)
    data = prepare_data(tok, args.data, work, n_cal=z["n_cal"], t_cal=z["t_cal"], n_ho=z["n_ho"], t_ho=z["t_ho"],
                        n_kd=n_kd, t_kd=z["t_kd"], n_corr=n_corr)
    if not data["disjoint"]:
        raise SystemExit("calibration, held-out, distillation and correction data overlap; refusing to run")
    geos = {b: target_geometry(config, targets[b]) for b in budgets}
    budget_params = {b: vc.count_params(config, g)["total"] for b, g in geos.items()}
    print(f"== bench peers: {model} ({vc.count_params(config, src)['total']:,} parameters), data {args.data}: "
          f"calib {data['calib']['tokens']:,} tokens, held-out {data['heldout']['tokens']:,}, "
          f"distill {n_kd * z['t_kd']:,} per row and seed (seeds {seeds})", flush=True)
    for b in budgets:
        print(f"   {b}: {targets[b]} -> {budget_params[b]:,} parameters", flush=True)

    t0 = time.perf_counter()
    teach = run_in_subprocess("bench.peers:teacher_case", dict(
        model=model_dir, data=str(args.data), work=str(work), steps=z["c_steps"], lr=args.correct_lr, t_kd=z["t_kd"],
        n_kd=n_kd, top_k=z["top_k"], threads=args.threads), timeout=args.timeout)
    if not teach.get("ok"):
        raise SystemExit(f"teacher correction / teacher logits failed: {teach.get('error', '')[-1500:]}")
    teach["seconds"] = time.perf_counter() - t0
    print(f"   teacher held-out ppl {math.exp(teach['teacher_loss']):.2f}, corrected {math.exp(teach['corrected_loss']):.2f} "
          f"({teach['seconds']:.0f} s with the top-{z['top_k']} logits)", flush=True)

    kd = dict(steps=z["kd_steps"], batch=z["kd_batch"], seq_len=z["t_kd"], lr=args.kd_lr, warmup=args.kd_warmup)
    rows: list[dict[str, Any]] = []
    for (budget, impl), spec in IMPLS.items():
        if budget not in budgets or (only and impl not in only):
            continue
        t0 = time.perf_counter()
        timeout = args.timeout if spec.timeout_s is None else min(args.timeout, spec.timeout_s / (6 if args.quick else 1))
        if spec.pip and importlib.util.find_spec(IMPORT_NAMES.get(spec.pip, spec.pip)) is None:
            r = {"ok": False, "note": f"not installed: pip install {spec.pip}"}
        else:
            r = run_in_subprocess("bench.peers:row_case", dict(
                budget=budget, impl=impl, model=model_dir, target=targets[budget], work=str(work), data=str(args.data),
                lm_blocks=z["lm"], seed=args.seed, seeds=seeds, kd=kd, threads=args.threads), timeout=timeout)
        row = _row(budget, impl, spec, r, targets[budget], budget_params[budget], teach["teacher_loss"])
        row["median_s"] = row.get("prune_s")
        rows.append(row)
        print(f"   {budget:3s} {impl:28s} " + (f"one-shot ppl {row['oneshot_ppl']:10.2f}  KD ppl {row['kd_ppl']:8.2f}  "
                                               f"prune {row['prune_s']:6.1f} s  {row['peak_mb']:6.0f} MB  "
                                               f"{row['params']:,}" if row.get("kd_ppl") else f"{row.get('note')}")
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    info = {"model": str(args.model or ("tiny" if args.quick else "demo")), "data": data, "targets": targets,
            "budget_params": budget_params, "teacher": teach, "sizes": z, "kd": kd, "seeds": seeds,
            "seconds": time.perf_counter() - t_start}
    for r in rows:
        r["data_disjoint"] = data["disjoint"]
    _mark_best(rows)
    print(f"   bench peers took {info['seconds']:.0f} s", flush=True)
    args.bench_meta = {"peers": info}  # the driver adds it to the JSON's meta
    return rows, info


def _row(budget: str, impl: str, spec: Impl, r: dict[str, Any], target: str, budget_params: int,
         teacher_loss: float) -> dict[str, Any]:
    row: dict[str, Any] = {"case": f"{budget}: {target}", "budget": budget, "impl": impl, "source": spec.source,
                           "version": r.get("version"), "oneshot_ppl": None, "kd_ppl": None, "prune_s": None,
                           "peak_mb": None, "params": None, "budget_params": budget_params, "ok": False}
    if spec.attempt and r.get("ok"):
        return dict(row, ok=True, ran=True, note=r["note"], params=r["params"], prune_s=r["prune_s"],
                    peak_mb=r["peak_mb"], version=r.get("version"))
    if "note" in r or not r.get("ok"):
        err = r.get("error", "")
        note = r.get("note") or (f"timed out: no result in {err.split()[-1]} (hung?)" if err.startswith("timed out") else
                                 "process failed: " + _last_line(err))
        return dict(row, note=note, ran=False)
    kd = r["kd_losses"]
    row.update(oneshot_ppl=math.exp(r["oneshot_loss"]), kd_ppl=math.exp(sum(kd) / len(kd)),
               kd_ppl_seeds=[math.exp(x) for x in kd], prune_s=r["prune_s"], peak_mb=r["peak_mb"],
               params=r["params"], reload_max_diff=r["reload_max_diff"], oneshot_loss=r["oneshot_loss"],
               kd_loss=sum(kd) / len(kd), kd_s=r["kd_s"])
    if r.get("kd_reused_from"):
        row["kd_reused_from"] = r["kd_reused_from"]
    if r["oneshot_loss"] - teacher_loss > 1e-3:  # the share of the one-shot loss gap the recipe closed
        row["gap_closed"] = (r["oneshot_loss"] - row["kd_loss"]) / (r["oneshot_loss"] - teacher_loss)
    problems = []
    if r["params"] != budget_params:
        problems.append(f"{r['params']:,} parameters, not the budget's {budget_params:,}")
    if r["reload_max_diff"] != 0.0:
        problems.append(f"reloaded logits differ by {r['reload_max_diff']:.3g}")
    if not all(math.isfinite(x) for x in [r["oneshot_loss"], *kd]):
        problems.append("non-finite loss")
    row["ok"], row["ran"] = not problems, True
    if problems:
        row["note"] = "; ".join(problems)
    elif r.get("kd_reused_from"):
        row["note"] = f"the same weights as {r['kd_reused_from']}: its distillation runs, not run again"
    return row


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _mark_best(rows: list[dict[str, Any]]) -> None:
    """Per budget: ``best_oneshot`` / ``best_kd`` ("yes"/"no") on the rows that ran."""
    for b in BUDGETS:
        rs = [r for r in rows if r["budget"] == b and r.get("ok") and r.get("kd_ppl") is not None]
        for key, flag in (("oneshot_ppl", "best_oneshot"), ("kd_ppl", "best_kd")):
            if rs:
                best = min(r[key] for r in rs)
                for r in rs:
                    r[flag] = "yes" if r[key] == best else "no"


# -- report ----------------------------------------------------------------------------------------

def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table of every row, the best number of each budget in bold."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| budget | impl | version | one-shot ppl | KD ppl (seeds) | prune s | peak MB | params | ok | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = num(r.get("oneshot_ppl"), ".2f")
        kd = num(r.get("kd_ppl"), ".2f")
        if r.get("best_oneshot") == "yes":
            one = f"**{one}**"
        if r.get("best_kd") == "yes":
            kd = f"**{kd}**"
        if r.get("kd_ppl_seeds"):
            kd += " (" + ", ".join(f"{x:.2f}" for x in r["kd_ppl_seeds"]) + ")"
        params = f"{r['params']:,}" if r.get("params") else "-"
        note = (r.get("note") or "").replace("|", "/")
        lines.append(f"| {r['budget']} | {r['impl']} | {r.get('version') or '-'} | {one} | {kd} | "
                     f"{num(r.get('prune_s'), '.1f')} | {num(r.get('peak_mb'), '.0f')} | {params} | "
                     f"{'yes' if r.get('ok') else 'no'} | {note} |")
    return "\n".join(lines)


def write_markdown(rows: list[dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    from bench.common import meta
    from bench.suite import machine_line

    t, d, z = info["teacher"], info["data"], info["sizes"]
    lines = ["# bench peers", "", f"Machine: {machine_line(meta())}.", "",
             f"Teacher {info['model']}: held-out perplexity {math.exp(t['teacher_loss']):.2f}; corrected "
             f"({z['c_steps'] * z['c_batch'] * z['t_kd']:,} tokens of LM loss) {math.exp(t['corrected_loss']):.2f}. "
             f"Data {d['source']}: calibration {d['calib']['tokens']:,} tokens, held-out {d['heldout']['tokens']:,}, "
             f"distillation {d['distill']['tokens']:,} per row and seed (seeds {info['seeds']}), disjoint: "
             f"{d['disjoint']}. Whole run {info['seconds']:.0f} s.", "",
             "Budgets: " + "; ".join(f"{b} {info['targets'][b]} = {info['budget_params'][b]:,}"
                                     for b in info["budget_params"]), "", markdown_table(rows), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [b for b in BUDGETS if any(r["budget"] == b and r.get("oneshot_ppl") for r in rows)]
    if not budgets:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.6 * len(budgets), 4.2), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        rs = [r for r in rows if r["budget"] == b and r.get("oneshot_ppl")]
        x = range(len(rs))
        colors = ["tab:green" if r["impl"].startswith("minitron_fast") else "tab:gray" for r in rs]
        ax.bar([i - 0.2 for i in x], [r["oneshot_ppl"] for r in rs], 0.4, color=colors, alpha=0.45, label="one-shot")
        ax.bar([i + 0.2 for i in x], [r["kd_ppl"] for r in rs], 0.4, color=colors, label="after KD")
        ax.set_xticks(list(x), [r["impl"] for r in rs], rotation=40, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{b}: {rs[0]['case'].split(': ', 1)[1]} ({rs[0]['budget_params'] / 1e6:.2f}M)", fontsize=9)
        ax.set_ylabel("held-out perplexity (log)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
