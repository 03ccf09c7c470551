"""Pipeline recipes: one YAML file describing a whole Minitron run, validated into dataclasses.

A recipe names the teacher, the data, and one section per stage. Each stage section IS that
stage's config dataclass (no second list of options): ``importance`` is
:class:`~minitron_fast.importance.config.ImportanceConfig`, ``search``
:class:`~minitron_fast.search.config.SearchConfig`, ``prune``
:class:`~minitron_fast.prune.config.PruneConfig`, ``evaluate``
:class:`~minitron_fast.evaluate.config.EvaluateConfig`, ``export``
:class:`~minitron_fast.export.config.ExportConfig`. The training sections (``correct_teacher``,
``distill``, ``scratch``) are typed from the trainer's own schema,
:class:`~minitron_fast.distill.config.DistillConfig`, minus the keys the pipeline sets (``mode``,
``teacher``, ``student``, ``out`` and ``data.source/text_field/seq_len``, which come from the
recipe's ``data`` section); see :data:`TrainingSection`.

Every key is checked when the recipe loads, before any stage runs: an unknown key or a value of
the wrong type is a one-line ``RecipeError`` naming the dotted key and the known keys; so is a
prune target or a search budget the stages would reject (one grammar:
``minitron_fast.artifacts.targets``). ``key=value`` overrides (values parsed as YAML, dotted keys
for nested sections: ``distill.steps=50``, ``prune.target=hidden=512,ffn=1024``) are applied
before validation.

Example::

    >>> r = load_recipe("demo", ["distill.steps=4"])
    >>> r.prune.target, r.distill.steps
    ('ffn=768', 4)
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minitron_fast import configtools
from minitron_fast.artifacts.targets import TargetError, parse_budget_spec
from minitron_fast.distill.config import DataConfig, DistillConfig
from minitron_fast.errors import MinitronError
from minitron_fast.evaluate.config import EvaluateConfig
from minitron_fast.export.config import ExportConfig
from minitron_fast.importance.config import ImportanceConfig
from minitron_fast.prune.config import PruneConfig
from minitron_fast.search.config import SearchConfig
from minitron_fast.teacher_logits.config import TeacherLogitsConfig


class RecipeError(MinitronError, ValueError):
    """A recipe that does not validate (unknown key, wrong type, impossible value)."""


# -- sections -------------------------------------------------------------------------------------

@dataclass
class DataSection:
    """The text every stage reads: its ``train`` split trains, ``calib`` calibrates importance,
    ``heldout`` evaluates (splits by document hash, see ``minitron_fast.data``)."""

    source: str = "demo"          # "demo" (pydoc_data), a .txt/.jsonl file, a directory, a saved HF dataset
    text_field: str = "text"
    seq_len: int = 256            # tokens per block for training and evaluation


@dataclass
class LaunchSection:
    num_procs: int = 1            # processes for the DeepSpeed stages (1: single process, no launcher)
    launcher: str = "auto"        # auto | deepspeed | torchrun | none
    hostfile: str | None = None   # DeepSpeed hostfile ("host slots=N" lines): multi-node, num_procs ranks per host


# Keys of a training section that the pipeline sets itself (never the user).
_RESERVED = ("mode", "label", "teacher", "student", "out", "teacher_logits")
TEACHER_KINDS = ("online", "offline")
# Keys of a training section's ``data`` that come from the recipe's ``data`` section.
_DATA_FROM_RECIPE = ("source", "text_field", "seq_len")
# Keys the ``scratch`` baseline takes from ``distill`` unless it sets them (the same token count).
_SCRATCH_INHERITS = ("steps", "micro_batch_size", "grad_accum", "warmup_steps", "schedule", "deepspeed", "threads",
                     "eval_every", "save_every", "data")


def _typed_section(name: str, cls: type, *, drop: tuple[str, ...], none: tuple[str, ...] = (),
                   types: dict[str, Any] | None = None, enabled: bool = False, doc: str = "") -> type:
    """A dataclass with ``cls``'s fields (same types and defaults) minus ``drop``; fields in
    ``none`` become optional with default None (filled by the pipeline); ``types`` replaces a
    field's type (its default becomes that type's default)."""
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, Any, Any]] = [("enabled", bool, field(default=True))] if enabled else []
    for f in dataclasses.fields(cls):
        if f.name in drop:
            continue
        tp = (types or {}).get(f.name, hints[f.name])
        if f.name in none:
            specs.append((f.name, typing.Optional[tp], field(default=None, metadata=f.metadata)))
        elif f.name in (types or {}):
            specs.append((f.name, tp, field(default_factory=tp, metadata=f.metadata)))
        elif f.default_factory is not dataclasses.MISSING:
            specs.append((f.name, tp, field(default_factory=f.default_factory, metadata=f.metadata)))
        else:
            specs.append((f.name, tp, field(default=f.default, metadata=f.metadata)))
    out = dataclasses.make_dataclass(name, specs, namespace={"__module__": __name__})
    out.__doc__ = doc
    return out


#: A training section's ``data``: the trainer's DataConfig minus what the recipe's ``data`` sets;
#: ``seed`` None is the recipe's seed.
TrainingData = _typed_section("TrainingData", DataConfig, drop=_DATA_FROM_RECIPE, none=("seed",),
                              doc="The trainer's data keys a training section may set (see DataConfig).")
#: ``correct_teacher`` and ``distill``: the trainer's DistillConfig minus the keys the pipeline sets,
#: plus ``enabled``; ``seed`` None is the recipe's seed.
TrainingSection = _typed_section("TrainingSection", DistillConfig, drop=_RESERVED, none=("seed",),
                                 types={"data": TrainingData}, enabled=True,
                                 doc="A training stage's keys: DistillConfig's, less mode/teacher/student/out.")
#: ``scratch``: as TrainingSection; the keys in _SCRATCH_INHERITS default to distill's (None).
#: ``distill``: TrainingSection plus ``teacher``, the kind of teacher (its path is the recipe's).
DistillSection = dataclasses.make_dataclass(
    "DistillSection", [("teacher", str, field(default="online", metadata={
        "help": "online: the (corrected) teacher model runs beside the student; offline: its top-k logits are "
                "written once by the teacher_logits stage and no teacher is loaded", "choices": TEACHER_KINDS})),
     ("stored_logits", typing.Optional[str], field(default=None, metadata={
         "help": "with teacher: offline, a complete teacher-logits directory written earlier (minitron-fast "
                 "teacher-logits --out DIR) to read instead of writing them; checked against the teacher, the data "
                 "and seq_len before any stage runs"}))],
    bases=(TrainingSection,), namespace={"__module__": __name__})
DistillSection.__doc__ = ("The distill stage: TrainingSection's keys plus teacher: online | offline, and stored_logits: a "
                          "teacher-logits directory to read (offline).")
ScratchSection = _typed_section("ScratchSection", TrainingSection, drop=(), none=("seed",) + _SCRATCH_INHERITS,
                                doc="The from-scratch baseline: TrainingSection's keys; None takes distill's.")


@dataclass
class Recipe:
    name: str = "recipe"
    teacher: str | None = None    # HF checkpoint directory, or "demo" (embedded SmolLM2-135M)
    out: str = "runs/recipe"
    seed: int = 0
    threads: int | None = None    # torch CPU threads (None: torch's default)
    data: DataSection = field(default_factory=DataSection)
    correct_teacher: TrainingSection = field(default_factory=lambda: TrainingSection(enabled=False))
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    teacher_logits: TeacherLogitsConfig = field(default_factory=TeacherLogitsConfig)  # distill.teacher: offline
    scratch: ScratchSection = field(default_factory=lambda: ScratchSection(enabled=False))
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    launch: LaunchSection = field(default_factory=LaunchSection)
    source_file: str | None = field(default=None, repr=False)  # set by load_recipe, not a YAML key

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d

    def validate(self) -> "Recipe":
        if not self.teacher:
            raise RecipeError("the recipe names no teacher; set teacher: PATH (a HF checkpoint directory) or demo")
        if self.data.seq_len < 2:
            raise RecipeError(f"data.seq_len must be at least 2, got {self.data.seq_len}")
        for section in ("importance", "search", "prune", "evaluate", "export"):
            try:
                getattr(self, section).validate(f"{section}.")
            except MinitronError as exc:
                raise RecipeError(str(exc)) from None
        imp, pr, s = self.importance, self.prune, self.search
        if pr.depth_metric in ("lm_loss", "lm_loss_block") and not imp.depth_lm_loss:
            raise RecipeError(f"prune.depth_metric={pr.depth_metric} needs importance.depth_lm_loss: true")
        if pr.depth_metric == "lm_loss_block" and not imp.depth_block:
            raise RecipeError("prune.depth_metric=lm_loss_block needs importance.depth_block: the number of layers "
                              "the target drops (the block whose removal is measured)")
        if s.enabled:
            if not s.params:
                raise RecipeError("search.enabled needs a budget: search.params (e.g. 90M, 4.5e9 or 0.7x)")
        elif not pr.target:
            raise RecipeError("set prune.target (e.g. hidden=3072,ffn=9216 or layers=16) or enable search")
        if self.evaluate.tasks:  # task files are checked here; lm_eval itself when the run starts
            from minitron_fast.evaluate.harness import resolve_tasks

            try:
                resolve_tasks(self.evaluate.tasks, self.evaluate.include_path)
            except MinitronError as exc:
                raise RecipeError(f"evaluate.tasks: {exc}") from None
        if self.launch.num_procs < 1:
            raise RecipeError(f"launch.num_procs must be at least 1, got {self.launch.num_procs}")
        if self.launch.launcher not in ("auto", "deepspeed", "torchrun", "none"):
            raise RecipeError(f"launch.launcher={self.launch.launcher!r} is not one of auto, deepspeed, torchrun, none")
        if self.distill.teacher not in TEACHER_KINDS:
            raise RecipeError(f"distill.teacher={self.distill.teacher!r} is not one of {', '.join(TEACHER_KINDS)} (the "
                              "teacher model itself is the recipe's teacher)")
        for section in ("correct_teacher", "distill", "scratch"):
            if stage_enabled(self, section):
                training_config(self, section, teacher="<teacher>", student="<student>", out="<out>",
                                teacher_logits="<teacher_logits>" if offline_teacher(self) else None)
        if offline_teacher(self):
            teacher_logits_config(self)
        if self.distill.stored_logits:
            if self.distill.teacher != "offline":
                raise RecipeError("distill.stored_logits needs distill.teacher: offline (the stored logits stand in for "
                                  "the teacher)")
            if stage_enabled(self, "correct_teacher"):
                raise RecipeError("distill.stored_logits with correct_teacher.enabled: the logits were written by a teacher "
                                  "that correction would change; set correct_teacher.enabled: false (and teacher: the "
                                  "corrected teacher, if it wrote them), or drop distill.stored_logits")
        return self


def stage_enabled(recipe: Recipe, section: str) -> bool:
    """Whether a training section (``correct_teacher``, ``distill``, ``scratch``) runs."""
    return bool(getattr(recipe, section).enabled)


def offline_teacher(recipe: Recipe) -> bool:
    """Whether distill reads stored top-k teacher logits (``distill.teacher: offline``)."""
    return recipe.distill.teacher == "offline" and stage_enabled(recipe, "distill")


def teacher_logits_config(recipe: Recipe, *, check: bool = True) -> TeacherLogitsConfig:
    """The teacher-logits stage's config: the recipe's ``teacher_logits`` section with ``seq_len``
    the data's and, unless set, ``samples`` the train blocks distill reads
    (``distill.data.max_blocks``; the whole split when that is unset too). ``check``: refuse a
    ``seq_len`` other than the data's and invalid values (one-line RecipeError)."""
    tl = recipe.teacher_logits
    if check and tl.seq_len is not None and tl.seq_len != recipe.data.seq_len:
        raise RecipeError(f"teacher_logits.seq_len={tl.seq_len} differs from data.seq_len={recipe.data.seq_len}, which "
                          "distill trains on; remove teacher_logits.seq_len")
    samples = tl.samples if tl.samples is not None else recipe.distill.data.max_blocks
    cfg = dataclasses.replace(tl, seq_len=tl.seq_len or recipe.data.seq_len, samples=samples)
    if not check:
        return cfg
    try:
        return cfg.validate("teacher_logits.")
    except MinitronError as exc:
        raise RecipeError(str(exc)) from None


# what each training section's progress bar and logs call it (the trainer's mode alone would call
# the from-scratch baseline "correct-teacher": it runs that mode on a random student)
TRAINING_LABELS = {"correct_teacher": "teacher correction", "distill": "distillation",
                   "scratch": "from-scratch baseline"}


def training_config(recipe: Recipe, section: str, *, teacher: str, student: str | None, out: str,
                    validate: bool = True, teacher_logits: str | None = None) -> dict[str, Any]:
    """The distillation trainer's recipe (a plain dict of DistillConfig's keys) for a training section.

    ``correct_teacher`` runs the trainer's ``correct-teacher`` mode (LM loss on the teacher);
    ``distill`` its ``distill`` mode (logit KD from the corrected teacher); ``scratch`` trains a
    randomly initialized student of the pruned shape with the LM loss on the same number of tokens
    as ``distill`` (the keys in ``_SCRATCH_INHERITS`` default to distill's). The data keys come from
    the recipe's ``data`` section, the seeds and threads from the recipe's unless the section sets
    them. With ``validate``, the trainer's own schema checks the result, and errors name the section.
    """
    sec = dataclasses.asdict(getattr(recipe, section))
    sec.pop("enabled", None)
    sec.pop("teacher", None)  # distill's teacher kind; the path is the pipeline's (offline: teacher_logits)
    sec.pop("stored_logits", None)  # read by the teacher_logits stage; the trainer gets its teacher_logits
    if section == "scratch":
        dist = dataclasses.asdict(recipe.distill)
        sec.update({k: dist[k] for k in _SCRATCH_INHERITS if sec[k] is None})
    data = dict(sec.pop("data"))
    data.update(source=recipe.data.source, text_field=recipe.data.text_field, seq_len=recipe.data.seq_len)
    if data["seed"] is None:
        data["seed"] = recipe.seed
    cfg: dict[str, Any] = dict(sec, data=data, out=out, teacher=teacher)
    if cfg["seed"] is None:
        cfg["seed"] = recipe.seed
    if recipe.threads and cfg["threads"] is None:
        cfg["threads"] = recipe.threads
    if section == "distill":
        cfg.update(mode="distill", student=student, teacher_logits=teacher_logits)
    else:  # correct_teacher and scratch both train one model with the LM loss
        cfg.update(mode="correct-teacher", student=None)
    cfg["label"] = TRAINING_LABELS[section]
    if not cfg["on_policy"]["lmbda"]:  # off: left out, so stage keys stay those of runs made before it existed
        cfg.pop("on_policy")
    if validate:
        from minitron_fast.distill.config import config_from_dict

        try:
            config_from_dict(cfg)
        except MinitronError as exc:
            raise RecipeError(f"{section}: {exc}") from None
    return cfg


def check_against_teacher(recipe: Recipe, teacher_config: Any) -> None:
    """The checks that need the teacher's config (not its weights), run before any stage: the
    prune target is reachable from the teacher, a search budget lies below its size, and an
    ``lm_loss_block`` depth metric measures blocks of the size the target drops."""
    from minitron_fast.artifacts.targets import target_geometry
    from minitron_fast.models import view_class_for_config

    pr = recipe.prune
    view_cls = view_class_for_config(teacher_config)
    if pr.target and not recipe.search.enabled:
        try:
            geo = target_geometry(teacher_config, pr.target, budget_axes=pr.budget_axes)
        except TargetError as exc:
            raise RecipeError(f"prune.target={pr.target}: {exc}") from None
        dropped = teacher_config.num_hidden_layers - geo.num_hidden_layers
        if pr.depth_metric == "lm_loss_block" and dropped and recipe.importance.depth_block != dropped:
            raise RecipeError(f"prune.depth_metric=lm_loss_block drops {dropped} layers but importance.depth_block="
                              f"{recipe.importance.depth_block}; set importance.depth_block: {dropped}")
    if recipe.search.enabled:
        full = view_cls.count_params(teacher_config)["total"]
        budget = parse_budget_spec(recipe.search.params).resolve(full)
        if budget >= full:
            raise RecipeError(f"search.params={recipe.search.params} ({budget:,}) is not below the teacher's "
                              f"{full:,} parameters")


# -- building from YAML + overrides ---------------------------------------------------------------

def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    return configtools.from_dict(cls, d, error=RecipeError, skip=("source_file",))


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["distill.steps=5", "teacher=demo"]`` -> nested dict (values parsed as YAML)."""
    return configtools.parse_overrides(overrides, error=RecipeError, example="distill.steps=50")


merge = configtools.deep_merge


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    if not isinstance(d, dict):
        raise RecipeError(f"a recipe must be a YAML mapping of keys to values, got {type(d).__name__}")
    for section in ("correct_teacher", "distill", "scratch"):
        sec = d.get(section)
        if not isinstance(sec, dict):
            continue
        for k in _RESERVED:
            if k in sec and not (section == "distill" and k == "teacher"):
                raise RecipeError(f"{section}.{k} is set by the pipeline; remove it from the recipe")
        for k in _DATA_FROM_RECIPE:
            if isinstance(sec.get("data"), dict) and k in sec["data"]:
                raise RecipeError(f"{section}.data.{k} comes from the recipe's data section; set data.{k} instead")
    return _from_dict(Recipe, d).validate()


# -- finding shipped recipes ----------------------------------------------------------------------

def configs_dir() -> Path:
    """Where the shipped recipes live: ``minitron_fast.configs`` in an installed wheel (the
    top-level ``configs/`` folder mapped into the package), else the source tree's ``configs/``."""
    try:
        from importlib.resources import files

        p = Path(str(files("minitron_fast.configs")))
        if (p / "demo.yaml").is_file():
            return p
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    here = Path(__file__).resolve().parent.parent  # minitron_fast/
    for cand in (here / "configs", here.parent / "configs"):
        if (cand / "demo.yaml").is_file():
            return cand
    raise RecipeError("cannot find the shipped recipes (configs/demo.yaml); reinstall minitron_fast")


def shipped_recipes() -> dict[str, Path]:
    """name -> path of every shipped recipe."""
    return {p.stem: p for p in sorted(configs_dir().glob("*.yaml"))}


def find_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (``demo``,
    ``llama3.1-8b-to-4b-width``, with or without ``.yaml``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        hint = "; to rerun that run, pass its recipe: " + str(p / "recipe.yaml") if (p / "recipe.yaml").is_file() else ""
        raise RecipeError(f"recipe {p} is a directory, not a recipe YAML file{hint}")
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if str(p.parent) in (".", "") or p.parent.name == "configs":
        shipped = shipped_recipes()
        if name in shipped:
            return shipped[name]
        raise RecipeError(f"recipe {name_or_path} not found: not a file and not a shipped recipe "
                          f"({', '.join(shipped)})")
    raise RecipeError(f"recipe file {p} does not exist")


def load_recipe(name_or_path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Reads and validates a recipe (a path or a shipped name), with ``key=value`` overrides.

    Raises RecipeError (one line) for unknown keys, wrong types and impossible values."""
    path = find_recipe(name_or_path)
    d = configtools.load_yaml_mapping(path, error=RecipeError)
    r = recipe_from_dict(merge(d, parse_overrides(list(overrides))))
    r.source_file = str(path)
    return r


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
