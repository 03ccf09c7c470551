"""Evaluating a checkpoint: held-out perplexity, and lm-evaluation-harness tasks when available.

``evaluate_model`` is the Python side of ``minitron-fast eval``. Tasks run through
lm-evaluation-harness's HF model class (``lm_eval.models.huggingface.HFLM``) on the already loaded
model, with the ``datasets`` library forced offline: a task whose data is not in the local cache is
a clear error, never a download attempt. Besides registered task names, ``tasks`` may name task
YAML files (lm-evaluation-harness's own format, e.g. ``dataset_path: json`` over local files), and
``include_path`` adds directories of them, as lm_eval's ``--include_path`` does.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

from minitron_fast.errors import MinitronError
from minitron_fast.evaluate.config import EvaluateConfig

LM_EVAL_MISSING = ("lm-evaluation-harness is not installed, so --tasks cannot run here; install it with "
                   "`pip install lm_eval` and make the task data available locally (HF datasets cache), "
                   "or drop --tasks to get held-out perplexity only")


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def evaluate_model(model: str, config: EvaluateConfig | None = None, *, data: str = "demo", split: str = "heldout",
                   seq_len: int = 256, text_field: str = "text", progress: bool = True) -> dict[str, Any]:
    """Held-out LM loss and perplexity of ``model`` (a checkpoint directory or ``demo``) over
    ``config.eval_blocks`` blocks of ``seq_len`` tokens of ``data``'s ``split``; with
    ``config.tasks``, also lm-evaluation-harness metrics (raises MinitronError up front when
    ``lm_eval`` is missing; see :func:`run_lm_eval` for ``tasks``, ``limit`` and ``include_path``).
    ``config`` (:class:`EvaluateConfig`) also says where the model runs (device, dtype, device_map).

    Returns ``{"model", "params", "tokens", "loss", "ppl", "seconds", "tasks": {...}}``.

    Example:
        >>> r = evaluate_model("runs/demo/student", EvaluateConfig(eval_blocks=4))
        >>> r["ppl"]
    """
    cfg = (config or EvaluateConfig()).validate()
    tasks, eval_blocks, batch_size = cfg.tasks, cfg.eval_blocks, cfg.batch_size
    if tasks and not lm_eval_available():
        raise MinitronError(LM_EVAL_MISSING)
    if tasks:
        resolve_tasks(tasks, cfg.include_path)  # bad task files fail before the model loads
    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.models import get_view
    from minitron_fast.models.loading import load_model, load_tokenizer

    if seq_len < 2:
        raise MinitronError(f"seq_len must be at least 2, got {seq_len}")
    load_kw = cfg.load_kwargs()  # device: cuda without CUDA fails here, before the model loads
    t0 = time.perf_counter()
    m = load_model(model, **load_kw)
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
        out["tasks"] = run_lm_eval(m, tok, tasks, batch_size=batch_size, limit=cfg.limit, include_path=cfg.include_path)
    out["seconds"] = time.perf_counter() - t0
    return out


def resolve_tasks(tasks: list[str], include_path: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Task names and include directories for lm_eval: an entry that is an existing ``.yaml``/``.yml``
    file becomes its ``task:`` name with its directory included; other entries are task names."""
    import yaml

    names: list[str] = []
    dirs = [str(Path(d).resolve()) for d in include_path or []]
    for d in dirs:
        if not Path(d).is_dir():
            raise MinitronError(f"include path {d} is not a directory of lm-evaluation-harness task YAML files")
    for t in tasks:
        p = Path(t)
        if p.suffix in (".yaml", ".yml") and not p.is_file():
            raise MinitronError(f"task file {t} does not exist")
        if p.suffix in (".yaml", ".yml"):
            try:
                cfg = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise MinitronError(f"task file {t} is not valid YAML: {exc}") from None
            name = cfg.get("task") if isinstance(cfg, dict) else None
            if not isinstance(name, str):
                raise MinitronError(f"task file {t} has no `task: NAME` key (lm-evaluation-harness task format)")
            names.append(name)
            if str(p.parent.resolve()) not in dirs:
                dirs.append(str(p.parent.resolve()))
        else:
            names.append(t)
    return names, dirs


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "alias": ..}`` -> ``{"acc": 0.5}``: numeric metrics, lm_eval's default
    filter suffix dropped (other filters keep theirs)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len":
            out[k[: -len(",none")] if k.endswith(",none") else k] = float(v)
    return out


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], *, batch_size: int = 8,
                limit: int | None = None, include_path: list[str] | None = None) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness ``simple_evaluate`` on an in-memory HF model, offline.

    ``tasks``: registered task names and/or task YAML files; ``include_path``: more task
    directories; ``limit``: examples per task (smoke runs). Returns ``{task: {metric: value}}``
    (numeric metrics only, e.g. ``{"acc": .., "acc_stderr": ..}``)."""
    if not lm_eval_available():
        raise MinitronError(LM_EVAL_MISSING)
    names, dirs = resolve_tasks(tasks, include_path)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=dirs or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        import difflib

        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        hint = "; ".join(f"{n}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
        raise MinitronError(f"lm-evaluation-harness knows no task {', '.join(unknown)}"
                            + (f" ({hint})" if hint else "")
                            + "; give a registered task name, a task YAML file, or --include-path DIR")
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager)
    except Exception as exc:  # lm_eval raises many types for missing tasks/data
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise MinitronError(f"lm-evaluation-harness could not run tasks {names}: {type(exc).__name__}: {msg} "
                            "(is the task registered or given as a YAML file, and its data local? this machine "
                            "may have no hub access)") from None
    finally:
        model.train(was_training)
    return {task: _clean_metrics(m) for task, m in (res or {}).get("results", {}).items()}


def format_eval(r: dict[str, Any]) -> str:
    rows = [("model", r["model"]), ("parameters", f"{r['params']:,}"),
            ("held-out tokens", f"{r['tokens']:,} ({r['blocks']} x {r['seq_len']})"),
            ("held-out loss", f"{r['loss']:.4f} nats/token"), ("perplexity", f"{r['ppl']:.3f}")]
    for task, metrics in r.get("tasks", {}).items():
        for k, v in metrics.items():
            rows.append((f"{task} {k}", f"{v:.4f}"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
