"""Architecture search: enumerate candidate shapes at a budget, prune each from the teacher,
retrain each briefly by logit distillation, rank by held-out LM loss, keep the winner's plan.

Model-Optimizer's search ranks candidates right after pruning; its users found that unreliable,
and the Minitron papers retrain each candidate briefly before choosing (the ranking after a
little retraining is what predicts the ranking after full distillation). Here the teacher's final
hidden states for the retraining batches are computed once and shared by every candidate, and each
step is the package's one KD step (``ops.kd_step``, the fused loss), so no ``[N, V]`` logits are
built. Its objective is a ``KDSpec``: forward KL at temperature 1 by default; in a recipe, the
distill stage's ``loss`` section, so candidates are ranked by the objective that distils the winner.
Retraining is full fine-tuning, or LoRA through ``peft`` (``lora_rank > 0``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from minitron_fast.artifacts.targets import parse_budget
from minitron_fast.errors import MinitronError
from minitron_fast.ops.kd_step import KDSpec, TeacherHidden, head_options, kd_step, teacher_hidden
from minitron_fast.io import atomic_write_json
from minitron_fast.models import get_view
from minitron_fast.prune.config import PruneConfig
from minitron_fast.search.candidates import Candidate, enumerate_candidates, format_candidates
from minitron_fast.search.config import RETRAIN_LOSS_KEYS, SearchConfig, SearchError


@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, batches: list[torch.Tensor], progress: bool = False) -> list[TeacherHidden]:
    """The teacher's final hidden states (next-token rows ``[B*(T-1), H]``) and lm_head for each
    retraining batch, computed once for all candidates."""
    from tqdm.auto import tqdm

    return [teacher_hidden(teacher, ids) for ids in tqdm(batches, desc="teacher targets", disable=not progress,
                                                         leave=False)]


def _check_kd(kd: KDSpec | None) -> KDSpec:
    """The retraining objective (default forward KL at T=1), refused in one line where search
    cannot run it."""
    kd = kd or KDSpec()
    if kd.inter_weight:
        raise SearchError("search retrains from the teacher's final hidden states only: inter_weight must be 0")
    return kd


def retrain(student: torch.nn.Module, batches: list[torch.Tensor], targets: list[TeacherHidden], *, lr: float,
            lora_rank: int = 0, progress: bool = False, desc: str = "retrain",
            kd: KDSpec | None = None) -> tuple[torch.nn.Module, list[float]]:
    """Brief logit-KD retraining of ``student`` (the package's one KD step, objective ``kd``;
    default forward KL at T=1) on ``batches`` against the cached teacher ``targets``; returns the
    (possibly LoRA-merged) model and the loss per step."""
    from tqdm.auto import tqdm

    model = student
    if lora_rank > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MinitronError("lora_rank > 0 needs peft: pip install 'minitron_fast[search]'") from None
        model = get_peft_model(student, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                   target_modules=get_view(student).lora_targets()))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    kd = _check_kd(kd)
    spec = dataclasses.replace(kd, loss=dataclasses.replace(kd.loss, **head_options(student)))
    model.train()
    losses = []
    for ids, target in tqdm(list(zip(batches, targets)), desc=desc, disable=not progress, leave=False):
        loss = kd_step(model, target, ids, spec=spec)["loss"]
        if not torch.isfinite(loss):
            raise MinitronError(f"{desc}: the KD loss became {float(loss)} at step {len(losses)}; lower the search lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    if lora_rank > 0:
        model = model.merge_and_unload()
    return model, losses


def run_search(model: str | os.PathLike, scores: str | os.PathLike, config: SearchConfig | None = None, *,
               budget: int | None = None, prune: PruneConfig | None = None, out_dir: str | os.PathLike | None = None,
               data: str = "demo", seq_len: int = 256, text_field: str = "text", progress: bool = True,
               log: Callable[[str], None] = print, kd: KDSpec | None = None) -> dict[str, Any]:
    """Searches student shapes of ``model`` at a parameter budget (see the module docstring).

    ``config`` holds the search's options (:class:`SearchConfig`); the budget is ``budget``
    parameters, else ``config.params`` resolved against the teacher. ``prune`` says how each
    candidate is pruned (its ``depth_metric`` and ``depth_mode``; default :class:`PruneConfig`).
    Every candidate is pruned from the teacher with ``scores``, evaluated (held-out LM loss on
    ``eval_blocks`` blocks of ``seq_len`` tokens of ``data``), retrained ``retrain_steps`` steps of
    ``micro_batch_size`` blocks by KD (the objective ``kd``, default forward KL at T=1; the pipeline
    passes the distill stage's), and evaluated again; the lowest loss after retraining wins.
    Writes ``plan.json`` (the winner's prune plan) and ``search.json`` (every candidate's numbers)
    into ``out_dir`` when given. Returns ``{"candidates": [...], "winner": {...}, "plan": path,
    "table": str}``. Raises SearchError when no candidate meets the budget.

    Example:
        >>> res = run_search("demo", "scores.safetensors", SearchConfig(params="0.7x", retrain_steps=10),
        ...                  out_dir="runs/search")
        >>> res["winner"]["target"]
    """
    cfg = (config or SearchConfig()).validate()
    prune = prune or PruneConfig()
    kd = _check_kd(kd)   # before anything loads
    load_kw = cfg.load_kwargs()  # device: cuda without CUDA fails here, before anything loads
    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.models.loading import free_device_memory, load_model, load_tokenizer
    from minitron_fast.ops.compact import shrink_storage_
    from minitron_fast.prune import apply_plan, make_plan

    from minitron_fast.models import view_class_for_config
    from minitron_fast.models.loading import load_config

    t0 = time.perf_counter()
    seed = cfg.seed or 0
    retrain_steps, micro_batch_size, tolerance = cfg.retrain_steps, cfg.micro_batch_size, cfg.tolerance
    teacher_config = load_config(model)
    if budget is None:
        if cfg.params is None:
            raise SearchError("the search has no budget: set params (e.g. 90M, 4.5e9 or 0.7x)")
        budget = parse_budget(cfg.params, view_class_for_config(teacher_config).count_params(teacher_config)["total"])
    cands = enumerate_candidates(teacher_config, budget, tolerance=tolerance, kinds=cfg.kinds, multiple=cfg.multiple,
                                 max_per_kind=cfg.max_candidates, prune_heads=cfg.prune_heads)
    log(f"search: {len(cands)} candidates within {tolerance:.0%} below {budget:,} parameters")
    log(format_candidates(cands))
    teacher = load_model(model, **load_kw)
    device = load_kw["device"]
    tok = load_tokenizer(model)
    heldout = token_blocks(tok, data, "heldout", seq_len, max_blocks=cfg.eval_blocks, text_field=text_field)
    need = retrain_steps * micro_batch_size
    batches: list[torch.Tensor] = []
    if need:
        train = token_blocks(tok, data, "train", seq_len, text_field=text_field)
        g = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(train.shape[0], generator=g) for _ in range(math.ceil(need / train.shape[0]))])
        batches = [train[order[i * micro_batch_size:(i + 1) * micro_batch_size]].to(device)
                   for i in range(retrain_steps)]
    targets = teacher_targets(teacher, batches, progress=progress)

    results: list[dict[str, Any]] = []
    plans = {}
    for i, c in enumerate(cands, 1):
        plan = make_plan(teacher.config, scores, c.geometry, depth_metric=prune.depth_metric,
                         depth_mode=prune.depth_mode)
        plans[c.name] = plan
        # a student of its own size: compaction leaves the deepcopy's teacher-sized storages behind
        student = shrink_storage_(apply_plan(copy.deepcopy(teacher), plan))
        torch.manual_seed(seed)
        before = lm_loss(student, heldout, progress=False)
        student, curve = retrain(student, batches, targets, lr=cfg.lr, lora_rank=cfg.lora_rank, progress=progress,
                                 desc=f"candidate {i}/{len(cands)}", kd=kd)
        after = lm_loss(student, heldout, progress=False) if batches else before
        results.append(dict(c.as_dict(), loss_pruned=before, loss=after, ppl=math.exp(after),
                            retrain_loss_first=curve[0] if curve else None,
                            retrain_loss_last=curve[-1] if curve else None))
        log(f"  [{i}/{len(cands)}] {c.name}: held-out loss {before:.4f} pruned -> {after:.4f} after "
            f"{len(curve)} KD steps")
        del student
        free_device_memory()

    order = sorted(range(len(cands)), key=lambda j: results[j]["loss"])
    ranked = [cands[j] for j in order]
    for rank, j in enumerate(order, 1):
        results[j]["rank"] = rank
    extra = {r["name"]: {"loss pruned": r["loss_pruned"], "loss retrained": r["loss"]} for r in results}
    table = format_candidates(ranked, extra)
    winner = results[order[0]]
    log("search ranking (held-out LM loss after brief KD retraining, lower is better):")
    log(table)
    log(f"winner: {winner['name']} ({winner['target']})")
    out: dict[str, Any] = {"budget": budget, "tolerance": tolerance, "retrain_steps": retrain_steps,
                           "retrain_tokens": retrain_steps * micro_batch_size * seq_len, "lora_rank": cfg.lora_rank,
                           "retrain_objective": _objective(kd),
                           "candidates": [results[j] for j in order], "winner": winner, "table": table,
                           "plan": None, "seconds": time.perf_counter() - t0}
    if out_dir is not None:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        plans[winner["name"]].save(d / "plan.json")
        out["plan"] = str(d / "plan.json")
        atomic_write_json(d / "search.json", {k: v for k, v in out.items() if k != "table"})
        (d / "table.txt").write_text(table + "\n")
    return out


def _objective(kd: KDSpec) -> dict[str, Any]:
    """What search.json records of the retraining objective (``RETRAIN_LOSS_KEYS``)."""
    return {k: getattr(kd if k in ("kd_weight", "lm_weight") else kd.loss, k) for k in RETRAIN_LOSS_KEYS}


__all__ = ["run_search", "retrain", "teacher_targets", "Candidate", "SearchError"]
