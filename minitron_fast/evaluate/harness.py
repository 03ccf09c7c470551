"""Evaluating a checkpoint: held-out perplexity, and lm-evaluation-harness tasks when available.

``evaluate_model`` is the Python side of ``minitron-fast eval``. Tasks run through
lm-evaluation-harness's HF model class (``lm_eval.models.huggingface.HFLM``) on the already loaded
model, with the ``datasets`` library forced offline: a task whose data is not in the local cache is
a clear error, never a download attempt.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Any

from minitron_fast.errors import MinitronError

LM_EVAL_MISSING = ("lm-evaluation-harness is not installed, so --tasks cannot run here; install it with "
                   "`pip install lm_eval` and make the task data available locally (HF datasets cache), "
                   "or drop --tasks to get held-out perplexity only")


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def evaluate_model(model: str, *, data: str = "demo", split: str = "heldout", seq_len: int = 256,
                   eval_blocks: int = 8, batch_size: int = 8, tasks: list[str] | None = None,
                   limit: int | None = None, text_field: str = "text", progress: bool = True) -> dict[str, Any]:
    """Held-out LM loss and perplexity of ``model`` (a checkpoint directory or ``demo``) over
    ``eval_blocks`` blocks of ``seq_len`` tokens of ``data``'s ``split``; with ``tasks``, also
    lm-evaluation-harness metrics (raises MinitronError up front when ``lm_eval`` is missing).

    Returns ``{"model", "params", "tokens", "loss", "ppl", "seconds", "tasks": {...}}``.

    Example:
        >>> r = evaluate_model("runs/demo/student", eval_blocks=4)
        >>> r["ppl"]
    """
    if tasks and not lm_eval_available():
        raise MinitronError(LM_EVAL_MISSING)
    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.models import get_view
    from minitron_fast.models.loading import load_model, load_tokenizer

    if eval_blocks < 1 or seq_len < 2 or batch_size < 1:
        raise MinitronError(f"eval_blocks and batch_size must be >= 1 and seq_len >= 2 "
                            f"(got {eval_blocks}, {batch_size}, {seq_len})")
    t0 = time.perf_counter()
    m = load_model(model)
    tok = load_tokenizer(model)
    max_pos = getattr(m.config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise MinitronError(f"seq_len {seq_len} is beyond the model's max_position_embeddings {max_pos}")
    blocks = token_blocks(tok, data, split, seq_len, max_blocks=eval_blocks, text_field=text_field)
    loss = lm_loss(m, blocks, batch_size=batch_size, progress=progress, desc="held-out loss")
    out: dict[str, Any] = {"model": str(model), "params": get_view(m).param_counts()["total"],
                           "tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)), "blocks": int(blocks.shape[0]),
                           "seq_len": int(blocks.shape[1]), "loss": loss, "ppl": math.exp(loss), "tasks": {}}
    if tasks:
        out["tasks"] = run_lm_eval(m, tok, tasks, batch_size=batch_size, limit=limit)
    out["seconds"] = time.perf_counter() - t0
    return out


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], *, batch_size: int = 8,
                limit: int | None = None) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness ``simple_evaluate`` on an in-memory HF model, offline.
    Returns ``{task: {metric: value}}`` (numeric metrics only)."""
    if not lm_eval_available():
        raise MinitronError(LM_EVAL_MISSING)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except Exception as exc:  # lm_eval raises many types for missing tasks/data
        raise MinitronError(f"lm-evaluation-harness could not run tasks {tasks}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''} (is the task data in the local "
                            f"datasets cache? this machine has no hub access)") from None
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def format_eval(r: dict[str, Any]) -> str:
    rows = [("model", r["model"]), ("parameters", f"{r['params']:,}"),
            ("held-out tokens", f"{r['tokens']:,} ({r['blocks']} x {r['seq_len']})"),
            ("held-out loss", f"{r['loss']:.4f} nats/token"), ("perplexity", f"{r['ppl']:.3f}")]
    for task, metrics in r.get("tasks", {}).items():
        for k, v in metrics.items():
            rows.append((f"{task} {k}", f"{v:.4f}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
