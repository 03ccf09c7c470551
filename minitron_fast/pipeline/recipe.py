"""Pipeline recipes: one YAML file describing a whole Minitron run, validated into dataclasses.

A recipe names the teacher, the data, and one section per stage (teacher correction,
importance, search, prune, distill, the from-scratch baseline, evaluate, export). Every key is
checked: an unknown key or a value of the wrong type is a one-line ``RecipeError`` naming the
dotted key and the known keys. ``key=value`` overrides (values parsed as YAML, dotted keys for
nested sections: ``distill.steps=50``, ``prune.target=hidden=512,ffn=1024``) are applied before
validation.

The training sections (``correct_teacher``, ``distill``, ``scratch``) hold the distillation
trainer's own recipe keys (``steps``, ``micro_batch_size``, ``lr``, ``loss``, ``deepspeed``, ...),
passed through to ``python -m minitron_fast.distill``; the trainer's schema validates them (see
:func:`training_config`), so the two never drift apart.

Example::

    >>> r = load_recipe("demo", ["distill.steps=4"])
    >>> r.prune.target, r.distill["steps"]
    ('hidden=512,ffn=1024', 4)
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minitron_fast import configtools
from minitron_fast.errors import MinitronError


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
class ImportanceSection:
    samples: int = 64             # calibration blocks (the papers use 1024)
    seq_len: int | None = None    # default: data.seq_len
    batch_size: int = 8
    seq_agg: str = "mean"         # mean | l2 | var (the papers' best: mean over the sequence ...)
    batch_agg: str = "l2"         # ... then L2 over the batch)
    depth_lm_loss: bool = False   # also score layers by the LM loss with each one dropped (slow)


@dataclass
class SearchSection:
    enabled: bool = False
    params: str | None = None     # budget: "4.5e9", "90M", or "0.7x" (a fraction of the teacher)
    tolerance: float = 0.05       # candidates within [budget * (1 - tol), budget]
    kinds: list[str] = field(default_factory=lambda: ["width", "depth", "mixed"])
    multiple: int | None = None   # hidden/FFN multiple (default: 64 for hidden >= 1024, else 32)
    max_candidates: int = 6       # per kind after ranking by closeness to the budget
    retrain_steps: int = 20       # brief KD per candidate
    micro_batch_size: int = 4
    lr: float = 2e-4
    lora_rank: int = 0            # 0: full fine-tune; >0: LoRA through peft
    eval_blocks: int = 4


@dataclass
class PruneSection:
    target: str | None = None     # "hidden=3072,ffn=9216" / "layers=16" / "params=0.5x"; None when search decides
    depth_metric: str = "block_importance"   # block_importance | lm_loss
    depth_mode: str = "contiguous"           # contiguous (2nd paper) | top
    budget_axes: str = "width"               # for params= targets: width | ffn | depth


@dataclass
class EvaluateSection:
    eval_blocks: int = 8          # held-out blocks (eval_blocks x data.seq_len tokens)
    batch_size: int = 8
    tasks: list[str] = field(default_factory=list)   # lm-evaluation-harness tasks: names or task YAML files
    include_path: list[str] = field(default_factory=list)  # more directories of lm-eval task YAML files
    limit: int | None = None      # examples per lm-eval task (None: all)


@dataclass
class ExportSection:
    enabled: bool = True          # the distilled student as a stock HF checkpoint under out/student


@dataclass
class LaunchSection:
    num_procs: int = 1            # processes for the DeepSpeed stages (1: single process, no launcher)
    launcher: str = "auto"        # auto | deepspeed | torchrun | none
    hostfile: str | None = None   # DeepSpeed hostfile ("host slots=N" lines): multi-node, num_procs ranks per host


STAGES = ("teacher_eval", "correct_teacher", "teacher_logits", "importance", "search", "prune", "distill", "scratch",
          "evaluate", "export")


@dataclass
class Recipe:
    name: str = "recipe"
    teacher: str | None = None    # HF checkpoint directory, or "demo" (embedded SmolLM2-135M)
    out: str = "runs/recipe"
    seed: int = 0
    threads: int | None = None    # torch CPU threads (None: torch's default)
    data: DataSection = field(default_factory=DataSection)
    correct_teacher: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    importance: ImportanceSection = field(default_factory=ImportanceSection)
    search: SearchSection = field(default_factory=SearchSection)
    prune: PruneSection = field(default_factory=PruneSection)
    distill: dict[str, Any] = field(default_factory=dict)
    # options of the teacher-logits stage (distill.teacher: offline); TeacherLogitsConfig's fields
    teacher_logits: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    export: ExportSection = field(default_factory=ExportSection)
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
        imp = self.importance
        for k in ("seq_agg", "batch_agg"):
            if getattr(imp, k) not in ("mean", "l2", "var"):
                raise RecipeError(f"importance.{k}={getattr(imp, k)!r} is not one of mean, l2, var")
        if imp.samples < 1 or imp.batch_size < 1:
            raise RecipeError("importance.samples and importance.batch_size must be at least 1")
        if self.prune.depth_metric not in ("block_importance", "lm_loss"):
            raise RecipeError(f"prune.depth_metric={self.prune.depth_metric!r} is not one of block_importance, lm_loss")
        if self.prune.depth_mode not in ("contiguous", "top"):
            raise RecipeError(f"prune.depth_mode={self.prune.depth_mode!r} is not one of contiguous, top")
        if self.prune.budget_axes not in ("width", "ffn", "depth"):
            raise RecipeError(f"prune.budget_axes={self.prune.budget_axes!r} is not one of width, ffn, depth")
        if self.prune.depth_metric == "lm_loss" and not imp.depth_lm_loss:
            raise RecipeError("prune.depth_metric=lm_loss needs importance.depth_lm_loss: true")
        s = self.search
        if s.enabled:
            if not s.params:
                raise RecipeError("search.enabled needs a budget: search.params (e.g. 90M, 4.5e9 or 0.7x)")
            parse_budget(s.params, 1)  # syntax check
            bad = [k for k in s.kinds if k not in ("width", "depth", "mixed")]
            if bad or not s.kinds:
                raise RecipeError(f"search.kinds {s.kinds} must be a non-empty list of width, depth, mixed")
            if not 0 < s.tolerance < 1:
                raise RecipeError(f"search.tolerance must lie in (0, 1), got {s.tolerance}")
            if s.retrain_steps < 0 or s.lora_rank < 0 or s.max_candidates < 1:
                raise RecipeError("search.retrain_steps and lora_rank must be >= 0, max_candidates >= 1")
        elif not self.prune.target:
            raise RecipeError("set prune.target (e.g. hidden=3072,ffn=9216 or layers=16) or enable search")
        if self.prune.target:
            _check_target_syntax(self.prune.target)
        if self.evaluate.eval_blocks < 1:
            raise RecipeError(f"evaluate.eval_blocks must be at least 1, got {self.evaluate.eval_blocks}")
        if self.evaluate.limit is not None and self.evaluate.limit < 1:
            raise RecipeError(f"evaluate.limit must be at least 1 (or null for every example), got {self.evaluate.limit}")
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
        for section in ("correct_teacher", "distill", "scratch"):
            if stage_enabled(self, section):
                training_config(self, section, teacher="<teacher>", student="<student>", out="<out>",
                                teacher_logits="<teacher_logits>" if offline_teacher(self) else None)
        if offline_teacher(self):
            teacher_logits_config(self, model="<teacher>", out="<out>")
        return self


# -- the offline teacher (distill.teacher: offline) ------------------------------------------------------

def offline_teacher(recipe: Recipe) -> bool:
    """Whether the recipe distills from stored top-k teacher logits (``distill.teacher: offline``)."""
    mode = recipe.distill.get("teacher", "online")
    if mode not in ("online", "offline"):
        raise RecipeError(f"distill.teacher={mode!r} is not one of online, offline (the teacher model itself is "
                          "the recipe's teacher)")
    return mode == "offline" and stage_enabled(recipe, "distill")


def teacher_logits_config(recipe: Recipe, *, model: str, out: str):
    """The teacher-logits stage's config: the recipe's ``teacher_logits`` section, with the data
    keys from the recipe's ``data`` section and, unless set, ``samples`` = the blocks the distill
    stage reads (``distill.data.max_blocks``; all train blocks when unset)."""
    from minitron_fast.teacher_logits.config import TeacherLogitsConfig

    sec = dict(recipe.teacher_logits)
    for k in ("model", "out", "data", "seq_len", "text_field"):
        if k in sec:
            raise RecipeError(f"teacher_logits.{k} is set by the pipeline (from teacher, out and data); remove it")
    sec.setdefault("samples", (recipe.distill.get("data") or {}).get("max_blocks"))
    sec.setdefault("threads", recipe.threads)
    d = dict(sec, model=model, out=out, data=recipe.data.source, seq_len=recipe.data.seq_len,
             text_field=recipe.data.text_field)
    try:
        return configtools.from_dict(TeacherLogitsConfig, d, error=RecipeError, prefix="teacher_logits.").validate()
    except MinitronError as exc:
        raise RecipeError(f"teacher_logits: {exc}") from None


def stage_enabled(recipe: Recipe, section: str) -> bool:
    """Whether a training section (``correct_teacher``, ``distill``, ``scratch``) runs."""
    d = getattr(recipe, section)
    return bool(d.get("enabled", True))


# Keys of a training section that the pipeline sets itself (never the user).
_RESERVED = ("mode", "teacher", "student", "out")
# Trainer keys a section may not set, because they belong to the whole recipe.
_FROM_RECIPE = {"data.source": "data.source", "data.text_field": "data.text_field", "data.seq_len": "data.seq_len"}


def training_config(recipe: Recipe, section: str, *, teacher: str, student: str | None, out: str,
                    validate: bool = True, teacher_logits: str | None = None) -> dict[str, Any]:
    """The distillation trainer's recipe (a plain dict) for a training section.

    ``correct_teacher`` runs the trainer's ``correct-teacher`` mode (LM loss on the teacher);
    ``distill`` its ``distill`` mode (logit KD from the corrected teacher); ``scratch`` trains a
    randomly initialized student of the pruned shape with the LM loss on the same number of tokens
    as ``distill`` (its ``steps``, ``micro_batch_size`` and ``grad_accum`` default to distill's).
    The data keys come from the recipe's ``data`` section. With ``validate``, the trainer's own
    schema checks every key (``minitron_fast.distill.config``), and errors name the section.
    """
    sec = dict(getattr(recipe, section))
    sec.pop("enabled", None)
    if section == "distill" and sec.get("teacher") in ("online", "offline"):
        sec.pop("teacher")  # the teacher's kind; its path is the pipeline's (teacher_logits: the stored rows)
    for k in _RESERVED:
        if k in sec:
            raise RecipeError(f"{section}.{k} is set by the pipeline; remove it from the recipe")
    if section == "scratch":
        base = {k: recipe.distill[k] for k in ("steps", "micro_batch_size", "grad_accum", "warmup_steps", "schedule",
                                               "deepspeed", "threads", "eval_every", "save_every", "data")
                if k in recipe.distill}
        base.update(sec)
        sec = base
    data = dict(sec.pop("data", {}) or {})
    if not isinstance(data, dict):
        raise RecipeError(f"{section}.data must be a mapping")
    for k in ("source", "text_field", "seq_len"):
        if k in data:
            raise RecipeError(f"{section}.data.{k} comes from the recipe's data section; set data.{k} instead")
    data.update(source=recipe.data.source, text_field=recipe.data.text_field, seq_len=recipe.data.seq_len)
    if "seed" not in data:
        data["seed"] = recipe.seed
    cfg: dict[str, Any] = dict(sec, data=data, out=out, teacher=teacher)
    cfg.setdefault("seed", recipe.seed)
    if recipe.threads and "threads" not in cfg:
        cfg["threads"] = recipe.threads
    if section == "distill":
        cfg.update(mode="distill", student=student)
        if teacher_logits:
            cfg["teacher_logits"] = teacher_logits
    else:  # correct_teacher and scratch both train one model with the LM loss
        cfg.update(mode="correct-teacher")
        cfg.pop("student", None)
    if validate:
        _validate_training(cfg, section)
    return cfg


def _validate_training(cfg: dict[str, Any], section: str) -> None:
    try:
        from minitron_fast.distill.config import config_from_dict
    except ImportError:  # the trainer is optional at recipe-load time; its schema checks at run time
        return
    try:
        config_from_dict(_jsonable(cfg))
    except MinitronError as exc:
        raise RecipeError(f"{section}: {exc}") from None


def _jsonable(d: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(d))


# -- budgets and targets ------------------------------------------------------------------------------

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


def parse_budget(text: str | int | float, teacher_params: int) -> int:
    """A parameter budget: ``4.5e9``, ``4.5B``, ``90M`` or ``0.7x`` (a fraction of
    ``teacher_params``). Raises RecipeError on anything else."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    try:
        if s.endswith("x"):
            f = float(s[:-1])
            if not 0 < f <= 1:
                raise RecipeError(f"budget {text!r}: a fraction must lie in (0, 1]")
            return int(f * teacher_params)
        if s and s[-1] in _SUFFIX:
            return int(float(s[:-1]) * _SUFFIX[s[-1]])
        v = int(float(s))
    except ValueError:
        raise RecipeError(f"budget {text!r} is not a parameter count (e.g. 4.5e9, 4.5B, 90M or 0.7x)") from None
    if v <= 0:
        raise RecipeError(f"budget {text!r} must be positive")
    return v


_TARGET_KEYS = ("hidden", "ffn", "heads", "kv_heads", "layers", "params")


def _check_target_syntax(target: str) -> None:
    for part in str(target).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise RecipeError(f"prune.target entry {part!r} is not key=value (e.g. hidden=3072,ffn=9216)")
        k, v = (x.strip() for x in part.split("=", 1))
        if k not in _TARGET_KEYS:
            raise RecipeError(f"prune.target key {k!r} is unknown; known: {', '.join(_TARGET_KEYS)}")
        if k != "params":
            try:
                if int(v) <= 0:
                    raise ValueError
            except ValueError:
                raise RecipeError(f"prune.target {k}={v!r} must be a positive integer") from None


def parse_target(target: str) -> dict[str, Any]:
    """``"hidden=3072,ffn=9216"`` -> ``{"hidden": 3072, "ffn": 9216}`` (``params`` kept as text)."""
    _check_target_syntax(target)
    out: dict[str, Any] = {}
    for part in str(target).split(","):
        if part.strip():
            k, v = (x.strip() for x in part.split("=", 1))
            out[k] = v if k == "params" else int(v)
    return out


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
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of keys to values")
    r = recipe_from_dict(merge(d, parse_overrides(list(overrides))))
    r.source_file = str(path)
    return r


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
