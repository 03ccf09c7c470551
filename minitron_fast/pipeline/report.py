"""The run's report: ``report.json`` (the headline numbers), ``report.md`` (the table, the
stages, the PNGs) and the plots, written atomically into the run's directory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from minitron_fast.io import atomic_write_text, save_figure

REPORT_KEYS = ("teacher_params", "student_params", "teacher_ppl", "corrected_teacher_ppl", "pruned_ppl",
               "distilled_ppl", "scratch_ppl", "tokens", "wall_s")


def _out(results: dict, name: str, key: str) -> Any:
    r = results.get(name)
    if r is None or r.status == "skipped":
        return None
    return r.outputs.get(key)


def headline(results: dict, wall_s: float) -> dict[str, Any]:
    """The ``report.json`` record: exactly :data:`REPORT_KEYS` (None where a stage was skipped).
    ``tokens`` counts the distillation's training tokens (the scratch baseline sees as many)."""
    student_params = _out(results, "prune", "params")
    return {
        "teacher_params": _out(results, "teacher_eval", "params"),
        "student_params": student_params,
        "teacher_ppl": _out(results, "teacher_eval", "ppl"),
        "corrected_teacher_ppl": _out(results, "correct_teacher", "ppl"),
        "pruned_ppl": _out(results, "prune", "ppl"),
        "distilled_ppl": _out(results, "distill", "ppl"),
        "scratch_ppl": _out(results, "scratch", "ppl"),
        "tokens": _out(results, "distill", "tokens"),
        "wall_s": round(wall_s, 1),
    }


def gap_closed(results: dict) -> float | None:
    """The fraction of the pruning's held-out loss increase that distillation recovered:
    (pruned - distilled) / (pruned - reference), reference the corrected teacher (the distillation
    teacher) or the teacher. In loss (log-perplexity) space, where the gap is additive."""
    ref = _out(results, "correct_teacher", "loss") or _out(results, "teacher_eval", "loss")
    pruned, distilled = _out(results, "prune", "loss"), _out(results, "distill", "loss")
    if None in (ref, pruned, distilled) or pruned - ref <= 0:
        return None
    return (pruned - distilled) / (pruned - ref)


def _fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}M"


def _fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    tp, sp = _out(results, "teacher_eval", "params"), _out(results, "prune", "params")
    tok = _out(results, "distill", "tokens")
    ct_tok = _out(results, "correct_teacher", "tokens")
    rows = [
        ("teacher", _fmt_params(tp), _fmt(_out(results, "teacher_eval", "ppl")), "-"),
        ("corrected teacher", _fmt_params(tp), _fmt(_out(results, "correct_teacher", "ppl")),
         f"{ct_tok:,}" if ct_tok else "-"),
        ("pruned student (no retraining)", _fmt_params(sp), _fmt(_out(results, "prune", "ppl")), "-"),
        ("distilled student", _fmt_params(sp), _fmt(_out(results, "distill", "ppl")), f"{tok:,}" if tok else "-"),
        ("same shape from scratch", _fmt_params(sp), _fmt(_out(results, "scratch", "ppl")),
         f"{_out(results, 'scratch', 'tokens'):,}" if _out(results, "scratch", "tokens") else "-"),
    ]
    return rows


def tasks_table_rows(tasks: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, str, str, str]]:
    """``{"teacher": {task: {metric: v}}, "student": {...}}`` -> rows (task, metric, teacher, student);
    stderr metrics are shown as ``± x`` beside their metric."""
    t, s = tasks.get("teacher", {}), tasks.get("student", {})
    rows = []
    for task in dict.fromkeys([*t, *s]):
        metrics = dict.fromkeys([*t.get(task, {}), *s.get(task, {})])
        for m in metrics:
            if m.endswith("_stderr"):
                continue

            def cell(side: dict) -> str:
                v = side.get(task, {}).get(m)
                e = side.get(task, {}).get(f"{m}_stderr")
                return "-" if v is None else f"{v:.4f}" + (f" ± {e:.4f}" if e is not None else "")

            rows.append((task, m, cell(t), cell(s)))
    return rows


def markdown_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(wi) for c, wi in zip(r, w)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (wi + 2) for wi in w) + "|", *map(line, rows)])


def _read_metrics(path: str | None) -> list[dict[str, Any]]:
    if not path or not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_losses(results: dict, png: Path) -> Path | None:
    """Training loss per step of teacher correction, distillation (KD loss) and the scratch
    baseline (LM loss), each with its held-out LM loss points."""
    series = [(name, _read_metrics(_out(results, name, "metrics"))) for name in ("correct_teacher", "distill", "scratch")]
    series = [(n, m) for n, m in series if m]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), squeeze=False)
    labels = {"correct_teacher": "teacher correction (LM loss)", "distill": "distillation (KD loss)",
              "scratch": "from scratch (LM loss)"}
    for ax, (name, recs) in zip(axes[0], series):
        tr = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
        if tr:
            ax.plot(*zip(*tr), label="train loss")
        ev = [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
        if ev:
            ax.plot(*zip(*ev), "o-", label="held-out LM loss")
        ax.set_title(labels[name], fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats/token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, png)


def plot_perplexity(head: dict[str, Any], png: Path) -> Path | None:
    items = [(k, head[k]) for k in ("teacher_ppl", "corrected_teacher_ppl", "pruned_ppl", "distilled_ppl",
                                   "scratch_ppl") if head.get(k) is not None]
    if not items:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"teacher_ppl": "teacher", "corrected_teacher_ppl": "corrected\nteacher", "pruned_ppl": "pruned",
             "distilled_ppl": "distilled", "scratch_ppl": "scratch"}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar([names[k] for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    for b, (_, v) in zip(bars, items):
        ax.annotate(f"{v:,.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)


def write_report(runner: Any, *, wall_s: float) -> dict[str, Any]:
    """Writes report.json, report.md and the PNGs into ``runner.out``; returns
    ``{"report": headline dict, "table": markdown table, "paths": {...}}``."""
    out: Path = runner.out
    res = runner.cache.results
    head = headline(res, wall_s)
    atomic_write_text(out / "report.json", json.dumps(head, indent=2) + "\n")  # keys in REPORT_KEYS order
    pngs: dict[str, Path] = {}
    hm = _out(res, "importance", "heatmap")
    if hm and Path(hm).is_file():
        shutil.copy2(hm, out / "importance_heatmap.png")
        pngs["importance heatmap (per layer: heads and neurons)"] = out / "importance_heatmap.png"
    try:
        p = plot_losses(res, out / "loss_curves.png")
        if p:
            pngs["loss curves"] = p
        p = plot_perplexity(head, out / "perplexity.png")
        if p:
            pngs["held-out perplexity"] = p
    except ImportError:  # matplotlib is an optional extra
        runner.log("    (matplotlib is not installed: no loss/perplexity PNGs)")

    table = markdown_table(table_rows(res), ("model", "parameters", "held-out perplexity", "training tokens"))
    r = runner.recipe
    lines = [f"# minitron-fast run: {r.name}", "",
             f"Teacher `{r.teacher}`, data `{r.data.source}`; held-out perplexity over "
             f"{int(runner.heldout.numel()):,} tokens ({runner.heldout.shape[0]} x {runner.heldout.shape[1]}) of the "
             "held-out split.", "", table, ""]
    gc_ = gap_closed(res)
    if gc_ is not None:
        lines += [f"Distillation closed **{gc_:.0%}** of the held-out loss gap that pruning opened "
                  "(in nats/token, relative to the distillation teacher).", ""]
    sc, di = head["scratch_ppl"], head["distilled_ppl"]
    if sc is not None and di is not None:
        lines += [f"The distilled student's perplexity is {sc / di:.1f}x lower than the same shape trained from "
                  f"scratch on the same {head['tokens']:,} tokens.", ""]
    pr = res.get("prune")
    if pr is not None and pr.status != "skipped":
        lines += [f"Pruning: {pr.outputs.get('summary', '')}.", ""]
    task_rows = tasks_table_rows(_out(res, "evaluate", "tasks") or {})
    if task_rows:
        lines += ["## lm-evaluation-harness tasks", "",
                  markdown_table(task_rows, ("task", "metric", "teacher", "student")), ""]
    stage_rows = [(s.name, s.status, f"{s.seconds:.1f}", s.message or "") for s in res.values()]
    lines += ["## Stages", "", markdown_table(stage_rows, ("stage", "this run", "seconds", "note")), "",
              f"Wall time of this invocation: {wall_s:.1f} s (cached stages cost nothing).", ""]
    if pngs:
        lines += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in pngs.items()] + [""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return {"report": head, "table": table, "gap_closed": gc_, "paths": {"report.md": out / "report.md",
                                                                         "report.json": out / "report.json", **pngs}}


__all__ = ["REPORT_KEYS", "headline", "gap_closed", "write_report", "markdown_table", "tasks_table_rows"]
