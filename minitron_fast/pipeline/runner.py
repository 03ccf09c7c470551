"""The stage runner: a recipe in, a distilled student and a report out.

The stages are the rows of ``table.STAGE_TABLE``, run in its order (``minitron-fast run RECIPE
--dry-run`` lists them for a recipe): teacher_eval, correct_teacher, teacher_logits (offline
teacher), importance, search (optional), prune, distill, scratch (the from-scratch baseline),
evaluate (lm-evaluation-harness tasks) and export. Each is cached in ``<out>/<stage>/`` by a hash
of its row's inputs (``stages.py``), and runs as the method ``stage_<name>`` here.

then ``report.md``, ``report.json`` and PNGs in ``<out>`` (``report.py``).
Stages meet only through files: checkpoint directories, the scores file and the plan JSON.
"""
from __future__ import annotations

import dataclasses
import json
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
from minitron_fast.pipeline.recipe import Recipe, check_against_teacher, stage_enabled, training_config
from minitron_fast.pipeline.stages import StageCache, model_fingerprint, stable_hash
from minitron_fast.pipeline.table import BY_NAME, RECIPE_IDENTITIES, STAGE_TABLE

log_ = logging.getLogger(__name__)


# EvaluateConfig fields that only the lm-evaluation-harness stage reads (not held-out perplexity)
TASK_FIELDS = ("tasks", "include_path", "limit")


_SKIPPED = object()  # identity() of a stage that did not run: left out of the cache inputs


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
        """The config a stage runs with (its row's ``config`` in ``table.STAGE_TABLE``): its recipe
        section with the recipe-wide values filled in (the data's seq_len, the recipe's seed; for
        ``prune`` the search winner's ``target``); the training stages' is the trainer's (a
        DistillConfig dict, paths as placeholders)."""
        return BY_NAME[stage].config(self.recipe, target)

    def heldout_id(self) -> dict[str, Any]:
        """What every stage's held-out perplexity depends on: the data and the evaluate section's
        held-out options (blocks, batch, device, dtype, attention, device_map)."""
        r, ev = self.recipe, dataclasses.asdict(self.recipe.evaluate)
        return {"data": dataclasses.asdict(r.data),
                "evaluate": {k: v for k, v in ev.items() if k not in TASK_FIELDS}}

    def identity(self, ident: str, *, stage: str, target: str | None = None) -> Any:
        """The value of one of a row's inputs (``table.IDENTITIES``, or an upstream stage's cache
        key); ``_SKIPPED`` for a stage that did not run."""
        r = self.recipe
        if ident in BY_NAME:
            res = self.cache.results.get(ident)
            return _SKIPPED if res is None or res.status == "skipped" else res.key
        if ident == "config":
            cfg = self.stage_config(stage, target=target)
            return cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
        if ident == "heldout":
            return self.heldout_id()
        if ident == "data":
            return dataclasses.asdict(r.data)
        if ident == "procs":
            return r.launch.num_procs
        if ident == "prune_depth":
            return {k: dataclasses.asdict(r.prune)[k] for k in ("depth_metric", "depth_mode")}
        if ident == "distill_loss":
            from minitron_fast.search.config import RETRAIN_LOSS_KEYS

            return {k: getattr(r.distill.loss, k) for k in RETRAIN_LOSS_KEYS}
        if ident == "teacher":
            return self.teacher_id
        if ident == "corrected":
            return self.corrected()[1]
        if ident == "seed":
            return r.seed
        if ident == "evaluated":
            return {k: v[1] for k, v in self.evaluated_models().items()}
        if ident == "stored_logits":
            d = r.distill.stored_logits
            if not d:
                return _SKIPPED
            m = json.loads((Path(d).expanduser() / "manifest.json").read_text())
            return {"run": m.get("run"), "written": m.get("written")}
        if ident == "task_files":
            return task_files_digest(r.evaluate.tasks, r.evaluate.include_path)
        raise KeyError(f"stage {stage}: unknown input identity {ident!r}")

    def stage_inputs(self, stage: str, *, target: str | None = None,
                     upstream: dict[str, Any] | None = None) -> dict[str, Any]:
        """The cache inputs of ``stage``: its row's ``inputs``, resolved (an upstream stage that was
        skipped is left out). ``upstream``: given, it stands in for the inputs that identify
        artifacts (upstream stages, models, task files), so that the recipe's part of the key can
        be computed without running anything."""
        out: dict[str, Any] = {}
        for key, ident in BY_NAME[stage].inputs:
            if upstream is not None and ident not in RECIPE_IDENTITIES:
                continue
            out[key] = self.identity(ident, stage=stage, target=target)
        out.update(upstream or {})
        return {k: v for k, v in out.items() if v is not _SKIPPED}

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

    # -- what earlier stages produced -----------------------------------------------------------------
    def output(self, stage: str, key: str) -> Any:
        """``key`` of ``stage``'s outputs; None when it was skipped."""
        res = self.cache.results.get(stage)
        return None if res is None or res.status == "skipped" else res.outputs.get(key)

    def corrected(self) -> tuple[Path, Any]:
        """The distillation teacher: (path, identity): correct_teacher's model, else the teacher."""
        model = self.output("correct_teacher", "model")
        if model is None:
            return self.teacher_path, self.teacher_id
        return Path(model), {"stage": "correct_teacher", "key": self.cache.results["correct_teacher"].key}

    def target(self) -> str | None:
        """The prune target: the search winner's, else the recipe's."""
        return self.output("search", "target") or self.recipe.prune.target

    def evaluated_models(self) -> dict[str, tuple[str, Any]]:
        """label -> (path, identity) of what ``evaluate`` scores: the corrected teacher and the
        final student (distilled, else pruned)."""
        path, ident = self.corrected()
        if self.output("distill", "model") is not None:
            student = (self.output("distill", "model"), {"stage": "distill", "key": self.cache.results["distill"].key})
        else:
            student = (self.output("prune", "model"), {"stage": "prune", "key": self.cache.results["prune"].key})
        return {"teacher": (str(path), ident), "student": student}

    # -- the stages (one method per row of table.STAGE_TABLE: stage_<name>(stage_dir, resume)) -------
    def stage_teacher_eval(self, d: Path, resume: bool) -> dict[str, Any]:
        return self.evaluate(self.teacher_path, "teacher")

    def stage_correct_teacher(self, d: Path, resume: bool) -> dict[str, Any]:
        out = self.train("correct_teacher", d, resume, teacher=str(self.teacher_path), student=None)
        return dict(out, **self.evaluate(out["model"], "corrected teacher"))

    def stage_teacher_logits(self, d: Path, resume: bool) -> dict[str, Any]:
        """The (corrected) teacher's top-k logits over the blocks distill reads, written once (or
        ``distill.stored_logits``, checked against this run and read); the distill stage then loads
        no teacher."""
        r = self.recipe
        if r.distill.stored_logits:
            from minitron_fast.artifacts.teacher_logits import TeacherLogits
            from minitron_fast.data.shards import open_corpus
            from minitron_fast.models.loading import load_config
            from minitron_fast.pipeline.check import stored_logits_problems

            corpus = open_corpus(self.tokenizer, r.data.source, text_field=r.data.text_field, progress=self.progress)
            problems = stored_logits_problems(r, load_config(self.teacher_path), self.tokenizer, corpus,
                                              teacher_dir=self.teacher_path)
            if problems:
                raise MinitronError(problems[0].removeprefix("error: "))
            path = Path(r.distill.stored_logits).expanduser().resolve()
            m = TeacherLogits(path).manifest
            self.log(f"    reading the stored teacher logits in {path} ({m['n_blocks']} blocks, top {m['top_k']})")
            return {"dir": str(path), "top_k": m["top_k"], "tokens": m["n_blocks"] * m["rows_per_block"],
                    "bytes_per_token": m["bytes_per_token"], "write_seconds": m["write_seconds"]}
        from minitron_fast.teacher_logits import write_teacher_logits

        m = write_teacher_logits(str(self.corrected()[0]), r.data.source, out=d / "logits",
                                 config=self.stage_config("teacher_logits"), text_field=r.data.text_field,
                                 progress=self.progress, log=self.log)
        return {"dir": str(d / "logits"), "top_k": m["top_k"], "tokens": m["n_blocks"] * m["rows_per_block"],
                "bytes_per_token": m["bytes_per_token"], "write_seconds": m["write_seconds"]}

    def stage_importance(self, d: Path, resume: bool) -> dict[str, Any]:
        from minitron_fast.importance import run_importance

        r = self.recipe
        _, paths = run_importance(str(self.corrected()[0]), r.data.source, out=d / "scores.safetensors",
                                  config=self.stage_config("importance"), text_field=r.data.text_field,
                                  heatmap_png=True, progress=self.progress, overwrite=True)
        return {k: str(v) for k, v in paths.items()}

    def stage_search(self, d: Path, resume: bool) -> dict[str, Any]:
        from minitron_fast.search import run_search
        from minitron_fast.search.config import retrain_spec

        r = self.recipe
        res = run_search(str(self.corrected()[0]), self.output("importance", "scores"), self.stage_config("search"),
                         budget=parse_budget(r.search.params, self.output("teacher_eval", "params")), prune=r.prune,
                         out_dir=d, data=r.data.source, seq_len=r.data.seq_len, text_field=r.data.text_field,
                         progress=self.progress, log=self.log, kd=retrain_spec(r.distill.loss))
        return {"target": res["winner"]["target"], "plan": res["plan"], "table": res["table"]}

    def stage_prune(self, d: Path, resume: bool) -> dict[str, Any]:
        from minitron_fast.prune import run_prune

        model_dir = d / "model"
        if model_dir.exists():  # an interrupted earlier attempt
            shutil.rmtree(model_dir)
        plan, _ = run_prune(str(self.corrected()[0]), self.output("importance", "scores"), model_dir,
                            self.stage_config("prune", target=self.target()), progress=self.progress)
        plan.save(d / "plan.json")
        self.log(f"    plan: {plan.summary()}")
        return dict(model=str(model_dir), plan=str(d / "plan.json"), summary=plan.summary(),
                    **self.evaluate(model_dir, "pruned student (no retraining)"))

    def stage_distill(self, d: Path, resume: bool) -> dict[str, Any]:
        out = self.train("distill", d, resume, teacher=str(self.corrected()[0]), student=self.output("prune", "model"),
                         teacher_logits=self.output("teacher_logits", "dir"))
        return dict(out, **self.evaluate(out["model"], "distilled student"))

    def stage_scratch(self, d: Path, resume: bool) -> dict[str, Any]:
        init = d / "init"
        if not (init / "config.json").is_file():
            self._random_init(self.output("prune", "model"), init)
        out = self.train("scratch", d, resume, teacher=str(init), student=None)
        return dict(out, **self.evaluate(out["model"], "student trained from scratch"))

    def stage_evaluate(self, d: Path, resume: bool) -> dict[str, Any]:
        """lm-evaluation-harness tasks on the distillation teacher and the final student."""
        return {"tasks": {label: self.run_tasks(path, label) for label, (path, _) in self.evaluated_models().items()}}

    def stage_export(self, d: Path, resume: bool) -> dict[str, Any]:
        from minitron_fast.export import export_checkpoint

        return {"model": str(export_checkpoint(self.output("distill", "model"), self.out / "student",
                                               self.recipe.export))}

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
        self.teacher_path, self.teacher_id = teacher_path, model_fingerprint(teacher_path)
        self.log(f"== minitron-fast run {r.name}: teacher {r.teacher}, out {self.out} ==")
        for stage in STAGE_TABLE:  # every stage is a row of the table, run in its order
            why = stage.skip(r)
            if why is not None:
                self.cache.skip(stage.name, why)
                continue
            target = self.target() if stage.name == "prune" else None
            res = self.cache.run(stage.name, self.stage_inputs(stage.name, target=target),
                                 getattr(self, f"stage_{stage.name}"))
            if stage.summary:
                self.log("    " + stage.summary.format(**res.outputs))

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
