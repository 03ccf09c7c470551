"""Architecture search: enumerate candidate shapes at a budget, prune each from the teacher,
retrain each briefly by logit distillation, rank by held-out LM loss, keep the winner's plan.

Model-Optimizer's search ranks candidates right after pruning; its users found that unreliable,
and the Minitron papers retrain each candidate briefly before choosing (the ranking after a
little retraining is what predicts the ranking after full distillation). Here the teacher's final
hidden states for the retraining batches are computed once and shared by every candidate, and each
step is the package's one KD step (``integrations.kd_step``: fused forward KL, temperature 1), so no
``[N, V]`` logits are built.
Retraining is full fine-tuning, or LoRA through ``peft`` (``lora_rank > 0``).
"""
from __future__ import annotations

import copy
import gc
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from minitron_fast.errors import MinitronError
from minitron_fast.integrations.kd_step import KDSpec, TeacherHidden, head_options, kd_step, teacher_hidden
from minitron_fast.io import atomic_write_json
from minitron_fast.search.candidates import Candidate, SearchError, enumerate_candidates, format_candidates

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, batches: list[torch.Tensor], progress: bool = False) -> list[TeacherHidden]:
    """The teacher's final hidden states (next-token rows ``[B*(T-1), H]``) and lm_head for each
    retraining batch, computed once for all candidates."""
    from tqdm.auto import tqdm

    return [teacher_hidden(teacher, ids) for ids in tqdm(batches, desc="teacher targets", disable=not progress,
                                                         leave=False)]


def retrain(student: torch.nn.Module, batches: list[torch.Tensor], targets: list[TeacherHidden], *, lr: float,
            lora_rank: int = 0, progress: bool = False, desc: str = "retrain") -> tuple[torch.nn.Module, list[float]]:
    """Brief logit-KD retraining of ``student`` (forward KL, T=1, the package's one KD step) on
    ``batches`` against the cached teacher ``targets``; returns the (possibly LoRA-merged) model
    and the loss per step."""
    from tqdm.auto import tqdm

    model = student
    if lora_rank > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MinitronError("lora_rank > 0 needs peft: pip install 'minitron_fast[search]'") from None
        model = get_peft_model(student, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                   target_modules=LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    spec = KDSpec(**head_options(student))
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


def run_search(model: str | os.PathLike, scores: str | os.PathLike, budget: int, *,
               out_dir: str | os.PathLike | None = None, tolerance: float = 0.05,
               kinds: list[str] | tuple[str, ...] = ("width", "depth", "mixed"), multiple: int | None = None,
               max_per_kind: int = 3, retrain_steps: int = 20, micro_batch_size: int = 4, lr: float = 2e-4,
               lora_rank: int = 0, data: str = "demo", seq_len: int = 256, eval_blocks: int = 4,
               text_field: str = "text", seed: int = 0, depth_metric: str = "block_importance",
               depth_mode: str = "contiguous", prune_heads: bool = True, progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Searches student shapes of ``model`` at ``budget`` parameters (see the module docstring).

    Every candidate is pruned from the teacher with ``scores`` (``minitron_fast.prune``),
    evaluated (held-out LM loss), retrained ``retrain_steps`` steps of ``micro_batch_size`` blocks
    of ``seq_len`` tokens by KD, and evaluated again; the lowest loss after retraining wins.
    Writes ``plan.json`` (the winner's prune plan) and ``search.json`` (every candidate's numbers)
    into ``out_dir`` when given. Returns ``{"candidates": [...], "winner": {...}, "plan": path,
    "table": str}``. Raises SearchError when no candidate meets the budget.

    Example:
        >>> res = run_search("demo", "scores.safetensors", 94_000_000, out_dir="runs/search", retrain_steps=10)
        >>> res["winner"]["target"]
    """
    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.models.loading import load_model, load_tokenizer
    from minitron_fast.prune import apply_plan, make_plan

    if retrain_steps < 0 or micro_batch_size < 1 or eval_blocks < 1:
        raise SearchError("retrain_steps must be >= 0, micro_batch_size and eval_blocks >= 1")
    t0 = time.perf_counter()
    from minitron_fast.models.loading import load_config

    cands = enumerate_candidates(load_config(model), budget, tolerance=tolerance, kinds=kinds, multiple=multiple,
                                 max_per_kind=max_per_kind, prune_heads=prune_heads)
    log(f"search: {len(cands)} candidates within {tolerance:.0%} below {budget:,} parameters")
    log(format_candidates(cands))
    teacher = load_model(model)
    tok = load_tokenizer(model)
    heldout = token_blocks(tok, data, "heldout", seq_len, max_blocks=eval_blocks, text_field=text_field)
    need = retrain_steps * micro_batch_size
    batches: list[torch.Tensor] = []
    if need:
        train = token_blocks(tok, data, "train", seq_len, text_field=text_field)
        g = torch.Generator().manual_seed(seed)
        order = torch.cat([torch.randperm(train.shape[0], generator=g) for _ in range(math.ceil(need / train.shape[0]))])
        batches = [train[order[i * micro_batch_size:(i + 1) * micro_batch_size]] for i in range(retrain_steps)]
    targets = teacher_targets(teacher, batches, progress=progress)

    results: list[dict[str, Any]] = []
    plans = {}
    for i, c in enumerate(cands, 1):
        plan = make_plan(teacher.config, scores, c.geometry, depth_metric=depth_metric, depth_mode=depth_mode)
        plans[c.name] = plan
        student = apply_plan(copy.deepcopy(teacher), plan)
        torch.manual_seed(seed)
        before = lm_loss(student, heldout, progress=False)
        student, curve = retrain(student, batches, targets, lr=lr, lora_rank=lora_rank, progress=progress,
                                 desc=f"candidate {i}/{len(cands)}")
        after = lm_loss(student, heldout, progress=False) if batches else before
        results.append(dict(c.as_dict(), loss_pruned=before, loss=after, ppl=math.exp(after),
                            retrain_loss_first=curve[0] if curve else None,
                            retrain_loss_last=curve[-1] if curve else None))
        log(f"  [{i}/{len(cands)}] {c.name}: held-out loss {before:.4f} pruned -> {after:.4f} after "
            f"{len(curve)} KD steps")
        del student
        gc.collect()

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
                           "retrain_tokens": retrain_steps * micro_batch_size * seq_len, "lora_rank": lora_rank,
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


__all__ = ["run_search", "retrain", "teacher_targets", "Candidate", "SearchError"]
