"""The stage runner: a recipe in, a distilled student and a report out.

Stages, each cached in ``<out>/<stage>/`` by a hash of its inputs (``stages.py``):

1. ``teacher_eval``     held-out perplexity of the teacher
2. ``correct_teacher``  LM-loss fine-tune of the teacher on the distillation data (the trainer,
                        ``python -m minitron_fast.distill``, on DeepSpeed), then its perplexity
   ``teacher_logits``   with ``distill.teacher: offline``: the (corrected) teacher's top-k logits
                        over the train blocks distill reads (``minitron_fast.teacher_logits``)
3. ``importance``       activation scores of the (corrected) teacher (``minitron_fast.importance``)
4. ``search``           optional: candidate shapes at a budget, briefly retrained, best kept
5. ``prune``            plan from the scores + target, checkpoint-to-checkpoint prune, perplexity
6. ``distill``          logit KD from the corrected teacher (the trainer on DeepSpeed), perplexity
7. ``scratch``          baseline: a random student of the pruned shape trained with the LM loss
                        on the same number of tokens, perplexity
8. ``export``           the distilled student copied to ``<out>/student`` (stock HF checkpoint)

then ``report.md``, ``report.json`` and PNGs in ``<out>`` (``report.py``).
Stages meet only through files: checkpoint directories, the scores file and the plan JSON.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from minitron_fast.artifacts.targets import parse_budget
from minitron_fast.configtools import DeviceConfig
from minitron_fast.distill.launch import launcher_env, trainer_command
from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_write_text, same_or_inside
from minitron_fast.pipeline.recipe import (Recipe, check_against_teacher, offline_teacher, stage_enabled,
                                            teacher_logits_config, training_config)
from minitron_fast.pipeline.stages import StageCache, model_fingerprint, stable_hash

log_ = logging.getLogger(__name__)


# EvaluateConfig fields that only the lm-evaluation-harness stage reads (not held-out perplexity)
TASK_FIELDS = ("tasks", "include_path", "limit")


class StageFailed(MinitronError):
    """A stage's subprocess failed; its message says which stage and how to resume."""


def trainer_tokens(cfg: dict[str, Any], num_procs: int) -> int:
    """Training tokens a trainer config consumes: steps x global batch x sequence length."""
    return int(cfg.get("steps", 100) * cfg.get("micro_batch_size", 4) * cfg.get("grad_accum", 1) * num_procs
               * cfg["data"]["seq_len"])


class PipelineRunner:
    """Runs a validated :class:`Recipe`. ``out`` overrides ``recipe.out``; ``redo`` names
    stages to rerun even when cached; ``log`` receives one-line progress messages."""

    def __init__(self, recipe: Recipe, *, out: str | os.PathLike | None = None, redo: tuple[str, ...] = (),
                 progress: bool = True, log: Callable[[str], None] | None = None):
        self.recipe = recipe
        self.out = Path(out or recipe.out)
        self.progress = progress
        self.log = log or (lambda s: print(s, flush=True))
        self.cache = StageCache(self.out, log=self.log, force=tuple(redo))
        self.t0 = time.perf_counter()

    # -- helpers ------------------------------------------------------------------------------------
    def _eval_blocks(self):
        from minitron_fast.data import token_blocks

        r = self.recipe
        return token_blocks(self.tokenizer, r.data.source, "heldout", r.data.seq_len,
                            max_blocks=r.evaluate.eval_blocks, text_field=r.data.text_field)

    def evaluate(self, path: str | os.PathLike, desc: str) -> dict[str, Any]:
        """Held-out loss/perplexity and parameter count of a checkpoint (freed afterwards)."""
        import torch

        from minitron_fast.evaluate.perplexity import lm_loss
        from minitron_fast.models import get_view
        from minitron_fast.models.loading import load_model

        m = load_model(path, **self.recipe.evaluate.load_kwargs("evaluate."))
        try:
            with torch.no_grad():
                loss = lm_loss(m, self.heldout, batch_size=self.recipe.evaluate.batch_size, progress=self.progress,
                               desc=desc)
            params = get_view(m).param_counts()["total"]
        finally:
            del m
            _free_device_memory()
        self.log(f"    {desc}: held-out loss {loss:.4f}, perplexity {math.exp(loss):.3f}, {params:,} parameters")
        return {"loss": loss, "ppl": math.exp(loss), "params": params}

    def run_tasks(self, path: str | os.PathLike, desc: str) -> dict[str, dict[str, float]]:
        """lm-evaluation-harness metrics of a checkpoint on the recipe's ``evaluate.tasks``."""
        from minitron_fast.evaluate.harness import run_lm_eval
        from minitron_fast.models.loading import load_model, load_tokenizer

        ev = self.recipe.evaluate
        m = load_model(path, **ev.load_kwargs("evaluate."))
        try:
            res = run_lm_eval(m, load_tokenizer(path), ev.tasks, batch_size=ev.batch_size, limit=ev.limit,
                              include_path=ev.include_path)
        finally:
            del m
            _free_device_memory()
        for task, metrics in res.items():
            self.log(f"    {desc} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return res

    def train(self, section: str, d: Path, resume: bool, *, teacher: str, student: str | None,
              teacher_logits: str | None = None) -> dict[str, Any]:
        """Writes the trainer recipe for ``section`` into ``d`` and runs the trainer there."""
        cfg = training_config(self.recipe, section, teacher=teacher, student=student, out=str(d / "run"),
                              teacher_logits=teacher_logits)
        cfg_path = d / "trainer.yaml"
        atomic_write_text(cfg_path, yaml.safe_dump(cfg, sort_keys=False))
        launch = self.recipe.launch
        cmd = trainer_command(cfg_path, num_procs=launch.num_procs, launcher=launch.launcher,
                              resume=resume and (d / "run").exists(), hostfile=launch.hostfile)
        self.log(f"    $ {' '.join(cmd)}")
        _free_device_memory()  # the trainer's rank 0 shares this process's GPU: nothing stays reserved here
        rc = subprocess.run(cmd, env=launcher_env(cfg["device"])).returncode
        if rc != 0:
            raise StageFailed(f"stage {section}: the trainer exited with status {rc} (its output is above); "
                              f"rerun the same command to resume from its last checkpoint in {d / 'run'}")
        final = d / "run" / "final"
        if not (final / "config.json").is_file():
            raise StageFailed(f"stage {section}: the trainer finished but wrote no checkpoint in {final}")
        return {"model": str(final), "metrics": str(d / "run" / "metrics.jsonl"),
                "tokens": trainer_tokens(cfg, launch.num_procs), "steps": cfg.get("steps")}

    # -- stage configs and cache keys -----------------------------------------------------------------
    def stage_config(self, stage: str, *, target: str | None = None) -> Any:
        """The config a stage runs with: its recipe section with the recipe-wide values filled in
        (the data's seq_len, the recipe's seed; for ``prune`` the search winner's ``target``).
        The training stages' config is the trainer's (a DistillConfig dict, paths as placeholders)."""
        r = self.recipe
        if stage in ("teacher_eval", "evaluate"):
            return r.evaluate
        if stage == "importance":
            return dataclasses.replace(r.importance, seq_len=r.importance.seq_len or r.data.seq_len)
        if stage == "search":
            return dataclasses.replace(r.search, seed=r.seed if r.search.seed is None else r.search.seed)
        if stage == "prune":
            return dataclasses.replace(r.prune, target=target if target is not None else r.prune.target)
        if stage in ("correct_teacher", "distill", "scratch"):
            logits = "<teacher_logits>" if stage == "distill" and offline_teacher(r) else None
            return training_config(r, stage, teacher="<teacher>", student="<student>", out="<out>", validate=False,
                                   teacher_logits=logits)
        if stage == "export":
            return r.export
        if stage == "teacher_logits":
            return teacher_logits_config(r, check=False)
        raise KeyError(stage)

    def heldout_id(self) -> dict[str, Any]:
        """What every stage's held-out perplexity depends on: the data and the evaluate section's
        held-out options (blocks, batch, device, dtype, attention, device_map)."""
        r, ev = self.recipe, dataclasses.asdict(self.recipe.evaluate)
        return {"data": dataclasses.asdict(r.data),
                "evaluate": {k: v for k, v in ev.items() if k not in TASK_FIELDS}}

    def stage_inputs(self, stage: str, upstream: dict[str, Any], *, target: str | None = None) -> dict[str, Any]:
        """The cache inputs of ``stage``: its config (``stage_config``, as a dict), the held-out
        evaluation it reports, and ``upstream`` (the identities of the artifacts it reads: a model
        fingerprint or an upstream stage's key)."""
        if stage == "teacher_eval":  # the held-out perplexity only: lm-eval tasks do not reach it
            return {"eval": self.heldout_id(), **upstream}
        cfg = self.stage_config(stage, target=target)
        cfg = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
        inputs: dict[str, Any] = {"config": cfg, **upstream}
        if stage == "search":
            inputs["prune"] = {k: dataclasses.asdict(self.recipe.prune)[k] for k in ("depth_metric", "depth_mode")}
            inputs["data"] = dataclasses.asdict(self.recipe.data)
        elif stage in ("importance", "teacher_logits"):
            inputs["data"] = dataclasses.asdict(self.recipe.data)
        elif stage in ("evaluate", "export"):
            pass
        else:
            inputs["eval"] = self.heldout_id()
        if stage in ("correct_teacher", "distill", "scratch"):
            inputs["procs"] = self.recipe.launch.num_procs
        return inputs

    def check_devices(self) -> None:
        """Every stage's ``device`` resolved, and the ``impl`` of importance and prune checked
        against it, before anything runs: ``cuda`` on a machine without CUDA, or an ``impl`` that
        cannot run there, is a one-line error here, not after hours of earlier stages."""
        r = self.recipe
        for section in ("importance", "search", "prune", "evaluate"):
            device = getattr(r, section).resolved_device(f"{section}.")
            if section in ("importance", "prune"):
                getattr(r, section).check_impl(device, f"{section}.")
        for section in ("correct_teacher", "distill", "scratch"):
            if stage_enabled(r, section):
                DeviceConfig(device=getattr(r, section).device).resolved_device(f"{section}.")

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import torch

        from minitron_fast.models.loading import check_seq_len, load_config, load_tokenizer, resolve_model_path

        r = self.recipe
        if r.threads:
            torch.set_num_threads(r.threads)
        self.check_devices()
        teacher_path = resolve_model_path(r.teacher)
        check_against_teacher(r, load_config(teacher_path))  # unsupported families and bad targets fail here
        if r.evaluate.tasks:
            from minitron_fast.evaluate.harness import LM_EVAL_MISSING, lm_eval_available

            if not lm_eval_available():
                raise MinitronError(f"the recipe sets evaluate.tasks but {LM_EVAL_MISSING}, or set evaluate.tasks: []")
        if same_or_inside(self.out, teacher_path):
            raise MinitronError(f"out {self.out} lies inside the teacher's directory {teacher_path}; choose another out")
        check_seq_len(load_config(teacher_path), r.data.seq_len, what="data.seq_len")
        if self.out.exists() and not self.out.is_dir():
            raise MinitronError(f"out {self.out} is a file; choose a directory")
        self.cache.acquire()  # the run lock, held until run_recipe returns
        atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(r.to_dict(), sort_keys=False))
        self.tokenizer = load_tokenizer(teacher_path)
        self.heldout = self._eval_blocks()
        teacher_id = model_fingerprint(teacher_path)
        c = self.cache
        self.log(f"== minitron-fast run {r.name}: teacher {r.teacher}, out {self.out} ==")

        # 1. teacher
        t_eval = c.run("teacher_eval", self.stage_inputs("teacher_eval", {"teacher": teacher_id}),
                       lambda d, resume: self.evaluate(teacher_path, "teacher"))

        # 2. teacher correction
        if stage_enabled(r, "correct_teacher"):
            def correct(d: Path, resume: bool) -> dict[str, Any]:
                out = self.train("correct_teacher", d, resume, teacher=str(teacher_path), student=None)
                return dict(out, **self.evaluate(out["model"], "corrected teacher"))

            ct = c.run("correct_teacher", self.stage_inputs("correct_teacher", {"teacher": teacher_id}), correct)
            corrected_path, corrected_id = Path(ct.outputs["model"]), {"stage": "correct_teacher", "key": ct.key}
        else:
            ct = c.skip("correct_teacher", "disabled in the recipe (correct_teacher.enabled: false)")
            corrected_path, corrected_id = teacher_path, teacher_id

        # 2b. offline teacher (distill.teacher: offline): the (corrected) teacher's top-k logits over
        # the blocks distill reads, written once; the distill stage then loads no teacher.
        tl_stage = None
        if offline_teacher(r):
            def write_logits(d: Path, resume: bool) -> dict[str, Any]:
                from minitron_fast.teacher_logits import write_teacher_logits

                m = write_teacher_logits(str(corrected_path), r.data.source, out=d / "logits",
                                         config=self.stage_config("teacher_logits"), text_field=r.data.text_field,
                                         progress=self.progress, log=self.log)
                return {"dir": str(d / "logits"), "top_k": m["top_k"], "tokens": m["n_blocks"] * m["rows_per_block"],
                        "bytes_per_token": m["bytes_per_token"], "write_seconds": m["write_seconds"]}

            tl_stage = c.run("teacher_logits", self.stage_inputs("teacher_logits", {"model": corrected_id}),
                             write_logits)

        # 3. importance
        def importance(d: Path, resume: bool) -> dict[str, Any]:
            from minitron_fast.importance import run_importance

            _, paths = run_importance(str(corrected_path), r.data.source, out=d / "scores.safetensors",
                                      config=self.stage_config("importance"), text_field=r.data.text_field,
                                      heatmap_png=True, progress=self.progress, overwrite=True)
            return {k: str(v) for k, v in paths.items()}

        im = c.run("importance", self.stage_inputs("importance", {"model": corrected_id}), importance)
        scores_path = im.outputs["scores"]

        # 4. search (optional)
        target = r.prune.target
        if r.search.enabled:
            def search(d: Path, resume: bool) -> dict[str, Any]:
                from minitron_fast.search import run_search

                res = run_search(str(corrected_path), scores_path, self.stage_config("search"),
                                 budget=parse_budget(r.search.params, t_eval.outputs["params"]), prune=r.prune,
                                 out_dir=d, data=r.data.source, seq_len=r.data.seq_len, text_field=r.data.text_field,
                                 progress=self.progress, log=self.log)
                return {"target": res["winner"]["target"], "plan": res["plan"], "table": res["table"]}

            se = c.run("search", self.stage_inputs("search", {"importance": im.key, "model": corrected_id}), search)
            target = se.outputs["target"]
            self.log(f"    search winner: {target}")
        else:
            c.skip("search", "disabled in the recipe" + (f"; pruning to {target}" if target else ""))

        # 5. prune
        def prune(d: Path, resume: bool) -> dict[str, Any]:
            from minitron_fast.prune import run_prune

            model_dir = d / "model"
            if model_dir.exists():  # an interrupted earlier attempt
                shutil.rmtree(model_dir)
            plan, _ = run_prune(str(corrected_path), scores_path, model_dir, self.stage_config("prune", target=target),
                                progress=self.progress)
            plan.save(d / "plan.json")
            self.log(f"    plan: {plan.summary()}")
            return dict(model=str(model_dir), plan=str(d / "plan.json"), summary=plan.summary(),
                        **self.evaluate(model_dir, "pruned student (no retraining)"))

        pr = c.run("prune", self.stage_inputs("prune", {"importance": im.key, "model": corrected_id}, target=target),
                   prune)
        student_path = pr.outputs["model"]

        # 6. distill
        if stage_enabled(r, "distill"):
            logits_dir = tl_stage.outputs["dir"] if tl_stage is not None else None

            def distill(d: Path, resume: bool) -> dict[str, Any]:
                out = self.train("distill", d, resume, teacher=str(corrected_path), student=student_path,
                                 teacher_logits=logits_dir)
                return dict(out, **self.evaluate(out["model"], "distilled student"))

            upstream = {"prune": pr.key, "teacher": corrected_id}
            if tl_stage is not None:
                upstream["teacher_logits"] = tl_stage.key
            di = c.run("distill", self.stage_inputs("distill", upstream), distill)
        else:
            di = c.skip("distill", "disabled in the recipe (distill.enabled: false)")

        # 7. from-scratch baseline
        if stage_enabled(r, "scratch"):
            def scratch(d: Path, resume: bool) -> dict[str, Any]:
                init = d / "init"
                if not (init / "config.json").is_file():
                    self._random_init(student_path, init)
                out = self.train("scratch", d, resume, teacher=str(init), student=None)
                return dict(out, **self.evaluate(out["model"], "student trained from scratch"))

            sc = c.run("scratch", self.stage_inputs("scratch", {"prune": pr.key, "seed": r.seed}), scratch)
        else:
            sc = c.skip("scratch", "disabled in the recipe (scratch.enabled: false)")

        # 8. lm-evaluation-harness tasks on the distillation teacher and the final student
        ev = r.evaluate
        if ev.tasks:
            student_final = di.outputs.get("model") if di.status != "skipped" else student_path
            student_id = {"stage": "distill", "key": di.key} if di.status != "skipped" else {"stage": "prune",
                                                                                           "key": pr.key}
            models = {"teacher": (str(corrected_path), corrected_id), "student": (student_final, student_id)}

            def evaluate(d: Path, resume: bool) -> dict[str, Any]:
                return {"tasks": {label: self.run_tasks(path, label) for label, (path, _) in models.items()}}

            c.run("evaluate", self.stage_inputs("evaluate", {"models": {k: v[1] for k, v in models.items()},
                                                             "task_files": task_files_digest(ev.tasks, ev.include_path)}),
                  evaluate)
        else:
            c.skip("evaluate", "no lm-evaluation-harness tasks in the recipe (evaluate.tasks); "
                               "held-out perplexity is measured by every stage")

        # 9. export
        final_student = di.outputs.get("model") if di.status != "skipped" else None
        if r.export.enabled and final_student:
            def export(d: Path, resume: bool) -> dict[str, Any]:
                from minitron_fast.export import export_checkpoint

                return {"model": str(export_checkpoint(final_student, self.out / "student", r.export))}

            c.run("export", self.stage_inputs("export", {"distill": di.key}), export)
        else:
            c.skip("export", "nothing to export (distill did not run)" if r.export.enabled else "disabled in the recipe")

        from minitron_fast.pipeline.report import write_report

        return write_report(self, wall_s=time.perf_counter() - self.t0)

    def _random_init(self, like: str | os.PathLike, dst: Path) -> None:
        """A randomly initialized model of ``like``'s shape (seeded), saved with its tokenizer."""
        import torch
        from transformers import AutoModelForCausalLM

        from minitron_fast.models.export import export_hf
        from minitron_fast.models.loading import load_config

        config = load_config(like)
        torch.manual_seed(self.recipe.seed)
        m = AutoModelForCausalLM.from_config(config)
        export_hf(m, dst, tokenizer_from=like, record={"stage": "scratch", "init": "random", "seed": self.recipe.seed,
                                                       "shape_of": str(like)}, overwrite=True)
        del m
        _free_device_memory()


def task_files_digest(tasks: list[str], include_path: list[str]) -> str:
    """A hash of the task YAML files a recipe's ``evaluate`` stage reads (files named in ``tasks``
    and every YAML under ``include_path``), so that editing one reruns the stage."""
    files = [Path(t) for t in tasks if Path(t).suffix in (".yaml", ".yml")]
    for d in include_path:
        files += sorted(p for p in Path(d).rglob("*") if p.suffix in (".yaml", ".yml"))
    return stable_hash({str(f.resolve()): f.read_text() for f in files if f.is_file()})


def _free_device_memory() -> None:
    from minitron_fast.models.loading import free_device_memory  # torch is imported only when a stage runs

    free_device_memory()


def run_recipe(recipe: Recipe, **kw: Any) -> dict[str, Any]:
    """Runs every stage of ``recipe`` (see :class:`PipelineRunner`) and returns the report dict.

    Example:
        >>> from minitron_fast.pipeline import load_recipe
        >>> report = run_recipe(load_recipe("demo", ["distill.steps=4"]), out="runs/smoke")
    """
    runner = PipelineRunner(recipe, **kw)
    try:
        return runner.run()
    finally:
        runner.cache.release()


__all__ = ["PipelineRunner", "run_recipe", "trainer_tokens", "stable_hash"]
