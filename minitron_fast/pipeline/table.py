"""The pipeline's stages, in one table.

Every consumer walks :data:`STAGE_TABLE`, in its order: the runner (``runner.PipelineRunner``
runs row ``name`` with its method ``stage_<name>``, cache-keyed by the row's ``inputs``),
``run --check`` (``check.py``: the dtype, attention and device of every row that loads a model),
``run --dry-run`` (:func:`describe`: what runs, what is skipped and why, what each stage loads),
the memory plan (``distill.memory.plan_recipe``: one plan per row that loads a model, in this
order) and ``--redo`` (:data:`STAGES`). A new stage is one row here and one ``stage_<name>``
method on the runner; ``tests/pipeline/test_table.py`` holds the two together.

Torch-free: reading the table imports no torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from minitron_fast.pipeline.recipe import (Recipe, offline_teacher, stage_enabled, teacher_logits_config,
                                            training_config)

# what a row's ``kind`` means
KINDS = {
    "load": "loads a model in the pipeline process (the section's dtype, device and device_map)",
    "train": "the trainer, under the DeepSpeed launcher (launch.num_procs ranks)",
    "files": "reads and writes files only",
}
# identities a row's ``inputs`` may name besides an upstream stage's key (resolved by the runner)
IDENTITIES = {
    "config": "the stage's config (its row's ``config``, as a dict)",
    "heldout": "the held-out evaluation it reports (the data and the evaluate section's held-out options)",
    "data": "the recipe's data section",
    "procs": "launch.num_procs (the trainer's ranks)",
    "prune_depth": "prune.depth_metric and prune.depth_mode (search prunes candidates with them)",
    "distill_loss": "the distill section's loss keys that make search's retraining objective (search.config.RETRAIN_LOSS_KEYS)",
    "teacher": "the content fingerprint of the recipe's teacher checkpoint",
    "corrected": "the corrected teacher's identity (correct_teacher's key; the teacher's fingerprint when disabled)",
    "seed": "the recipe's seed",
    "evaluated": "the models evaluate scores: the corrected teacher and the final student",
    "task_files": "a hash of the lm-evaluation-harness task YAML files",
    "stored_logits": "the manifest of distill.stored_logits (its write's run id and time; left out when unset)",
}

# the identities read from the recipe alone (the rest identify artifacts of a run)
RECIPE_IDENTITIES = ("config", "heldout", "data", "procs", "prune_depth", "distill_loss", "seed")


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline.

    ``section``: the recipe section that configures it; ``config(recipe, target)``: the config it
    runs with (that section with the recipe-wide values filled in; ``target`` is the search
    winner, for prune); ``kind``: one of :data:`KINDS`;
    ``loads``: the model(s) it loads (for ``--dry-run``); ``inputs``: ``(cache key, identity)``
    pairs, an identity being an upstream stage's name (its cache key; left out when that stage
    was skipped) or one of :data:`IDENTITIES`; ``outputs``: the keys of what it returns (recorded
    in ``stage.json``); ``skip``: why it does not run for a recipe (None: it runs);
    ``summary``: a line logged after it runs or is reused, formatted with its outputs;
    ``loads_nothing``: true where a recipe makes a loading stage read files only."""

    name: str
    section: str
    config: Callable[[Recipe, str | None], Any]
    kind: str
    loads: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...]
    skip: Callable[[Recipe], str | None]
    doc: str
    summary: str | None = None
    loads_nothing: Callable[[Recipe], bool] = lambda r: False   # True: this recipe's run of it reads files only


def _training(section: str) -> Callable[[Recipe], str | None]:
    return lambda r: None if stage_enabled(r, section) else f"disabled in the recipe ({section}.enabled: false)"


def _search_skip(r: Recipe) -> str | None:
    if r.search.enabled:
        return None
    return "disabled in the recipe" + (f"; pruning to {r.prune.target}" if r.prune.target else "")


def _evaluate_skip(r: Recipe) -> str | None:
    return None if r.evaluate.tasks else ("no lm-evaluation-harness tasks in the recipe (evaluate.tasks); held-out "
                                          "perplexity is measured by every stage")


def _export_skip(r: Recipe) -> str | None:
    if not r.export.enabled:
        return "disabled in the recipe"
    return None if stage_enabled(r, "distill") else "nothing to export (distill did not run)"


def _config(section: str) -> Callable[[Recipe, str | None], Any]:
    return lambda r, target: getattr(r, section)


def _importance_config(r: Recipe, target: str | None) -> Any:
    return dataclasses.replace(r.importance, seq_len=r.importance.seq_len or r.data.seq_len)


def _search_config(r: Recipe, target: str | None) -> Any:
    return dataclasses.replace(r.search, seed=r.seed if r.search.seed is None else r.search.seed)


def _prune_config(r: Recipe, target: str | None) -> Any:
    return dataclasses.replace(r.prune, target=target if target is not None else r.prune.target)


def _trainer_config(section: str) -> Callable[[Recipe, str | None], Any]:
    """The trainer's config (a DistillConfig dict, the paths as placeholders)."""
    def config(r: Recipe, target: str | None) -> dict[str, Any]:
        logits = "<teacher_logits>" if section == "distill" and offline_teacher(r) else None
        return training_config(r, section, teacher="<teacher>", student="<student>", out="<out>", validate=False,
                               teacher_logits=logits)
    return config


def _teacher_logits_config(r: Recipe, target: str | None) -> Any:
    return teacher_logits_config(r, check=False)


EVAL = ("loss", "ppl", "params")
TRAINED = ("model", "metrics", "tokens", "steps") + EVAL
TRAINER_INPUTS = (("config", "config"), ("eval", "heldout"), ("procs", "procs"))

STAGE_TABLE: tuple[Stage, ...] = (
    Stage("teacher_eval", "evaluate", lambda r, t: None, "load", "the teacher",
          (("eval", "heldout"), ("teacher", "teacher")), EVAL, lambda r: None,
          "held-out perplexity of the teacher"),
    Stage("correct_teacher", "correct_teacher", _trainer_config("correct_teacher"), "train", "the teacher (trained)",
          TRAINER_INPUTS + (("teacher", "teacher"),), TRAINED, _training("correct_teacher"),
          "LM-loss fine-tune of the teacher on the distillation data, then its perplexity"),
    Stage("teacher_logits", "teacher_logits", _teacher_logits_config, "load", "the corrected teacher",
          (("config", "config"), ("data", "data"), ("model", "corrected"), ("stored", "stored_logits")),
          ("dir", "top_k", "tokens", "bytes_per_token", "write_seconds"),
          lambda r: None if offline_teacher(r) else "distill.teacher is online: the teacher runs beside the student",
          "the corrected teacher's top-k logits over the train blocks distill reads (distill.teacher: offline), "
          "or distill.stored_logits checked and read", loads_nothing=lambda r: bool(r.distill.stored_logits)),
    Stage("importance", "importance", _importance_config, "load", "the corrected teacher",
          (("config", "config"), ("data", "data"), ("model", "corrected")), ("scores", "heatmap"), lambda r: None,
          "activation importance scores of the corrected teacher"),
    Stage("search", "search", _search_config, "load", "the corrected teacher, then each candidate (trained)",
          (("config", "config"), ("data", "data"), ("prune", "prune_depth"), ("kd", "distill_loss"),
           ("importance", "importance"), ("model", "corrected")), ("target", "plan", "table"), _search_skip,
          "candidate shapes at the budget, each briefly retrained, the best kept", summary="search winner: {target}"),
    Stage("prune", "prune", _prune_config, "files",
          "the corrected teacher, streamed (streaming: false loads it whole), then the student",
          (("config", "config"), ("eval", "heldout"), ("importance", "importance"), ("model", "corrected")),
          ("model", "plan", "summary") + EVAL, lambda r: None,
          "plan from the scores and the target, checkpoint-to-checkpoint prune, perplexity"),
    Stage("distill", "distill", _trainer_config("distill"), "train",
          "the student (trained) and the corrected teacher (or its stored logits)",
          TRAINER_INPUTS + (("prune", "prune"), ("teacher", "corrected"), ("teacher_logits", "teacher_logits")),
          TRAINED, _training("distill"), "logit KD from the corrected teacher, then perplexity"),
    Stage("scratch", "scratch", _trainer_config("scratch"), "train", "a random student of the pruned shape (trained)",
          TRAINER_INPUTS + (("prune", "prune"), ("seed", "seed")), TRAINED, _training("scratch"),
          "baseline: a random student of the pruned shape, LM loss on the same tokens, perplexity"),
    Stage("evaluate", "evaluate", _config("evaluate"), "load", "the corrected teacher, then the final student",
          (("config", "config"), ("models", "evaluated"), ("task_files", "task_files")), ("tasks",), _evaluate_skip,
          "lm-evaluation-harness tasks on the corrected teacher and the final student"),
    Stage("export", "export", _config("export"), "files", "", (("config", "config"), ("distill", "distill")),
          ("model",), _export_skip, "the distilled student copied to <out>/student (a stock HF checkpoint)"),
)

STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGE_TABLE}


def running(recipe: Recipe) -> list[Stage]:
    """The rows that run for ``recipe``, in order."""
    return [s for s in STAGE_TABLE if s.skip(recipe) is None]


def model_sections(recipe: Recipe) -> list[str]:
    """The recipe sections whose ``dtype``/``device``/``attn_implementation`` load a model in a
    stage that runs (a section shared by two stages, ``evaluate``, once), in pipeline order."""
    out: list[str] = []
    for s in running(recipe):
        if s.kind in ("load", "train") and not s.loads_nothing(recipe) and s.section not in out:
            out.append(s.section)
    return out


def describe(recipe: Recipe) -> str:
    """The stages of ``recipe`` as ``--dry-run`` prints them: each with what it does and loads,
    or why it is skipped."""
    lines = [f"stages of {recipe.name} (teacher {recipe.teacher}):"]
    for i, s in enumerate(STAGE_TABLE, 1):
        why = s.skip(recipe)
        if why is not None:
            lines.append(f"  {i:>2}. {s.name:<16} skipped: {why}")
            continue
        sec: Any = getattr(recipe, s.section)
        how = ""
        if s.loads_nothing(recipe):
            how = " [reads files only]"
        elif s.kind == "load":
            how = f" [{getattr(sec, 'dtype', None) or 'float32'} on {getattr(sec, 'device', None) or 'auto'}]"
        elif s.kind == "train":
            how = f" [trainer, {recipe.launch.num_procs} rank{'s' if recipe.launch.num_procs > 1 else ''}]"
        loads = f"; loads {s.loads}" if s.loads and not s.loads_nothing(recipe) else ""
        lines.append(f"  {i:>2}. {s.name:<16} {s.doc}{loads}{how}")
    return "\n".join(lines)


__all__ = ["BY_NAME", "IDENTITIES", "KINDS", "RECIPE_IDENTITIES", "STAGES", "STAGE_TABLE", "Stage", "describe", "model_sections",
           "running"]
