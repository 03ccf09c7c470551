"""Distillation recipes: YAML validated into dataclasses, with ``key=value`` overrides.

A recipe is one YAML mapping; nested sections are ``loss``, ``data``, ``deepspeed`` and
``intermediate``. Overrides use dotted keys (``loss.temperature=2``, ``steps=100``) and YAML
values (``ds.offload_optimizer=true``). Unknown keys are errors, with the known keys listed.

Example recipe (``configs/distill/demo.yaml``)::

    mode: distill
    teacher: demo
    student: runs/pruned
    out: runs/distilled
    steps: 200
    micro_batch_size: 4
    grad_accum: 2
    lr: 3.0e-4
    data: {source: demo, seq_len: 256}
    loss: {kd_weight: 1.0, lm_weight: 0.0, temperature: 1.0}
    deepspeed: {zero_stage: 2}

The ``loss`` section is generated (``LossConfig``): the KD step's weights and ``materialized``
(``KDSpec``'s fields), the fused loss's options (``KDLossOptions``'s fields, less those the step
sets and the models' facts), and the top-k teacher's ``topk`` / ``topk_semantics``. A field added
to ``KDLossOptions`` is a recipe key without an edit here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from minitron_fast import configtools
from minitron_fast.errors import KDInputError, MinitronError
from minitron_fast.ops.kd_loss.divergences import REGISTRY, canonical, names as divergence_names  # the one registry (torch-free)
from minitron_fast.ops.kd_loss.params import ROW_IMPLS, KDLossOptions
from minitron_fast.ops.kd_spec import MODEL_FACTS, STEP_SETS, KDSpec


class ConfigError(MinitronError, ValueError):
    """A recipe that does not validate."""


MODES = ("distill", "correct-teacher")
TOPK_SEMANTICS = ("tail", "renorm")


def _int(name: str, v: Any, low: int | None) -> int:
    """``v`` must be an integer (not a bool) of at least ``low``."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    if low is not None and v < low:
        raise ConfigError(f"{name} must be at least {low}, got {v}")
    return v


def _num(name: str, v: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False) -> float:
    """``v`` must be a finite number within [low, high] (open ends where asked); NaN and inf are
    refused here, where ``lr <= 0``-style checks would let NaN through."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ConfigError(f"{name} must be {'above' if low_open else 'at least'} {low}, got {v}")
    if high is not None and (v >= high if high_open else v > high):
        raise ConfigError(f"{name} must be {'below' if high_open else 'at most'} {high}, got {v}")
    return float(v)


# -- the loss section, generated from KDSpec and KDLossOptions ----------------------------------------

#: keys that are not the loss section's, with what to do instead
_NOT_LOSS_KEYS = {**STEP_SETS, **MODEL_FACTS, "inter_weight": "the intermediate-state loss's weight; set "
                                                              "intermediate.weight"}


def _moved_impl(value: Any, prefix: str) -> str | None:
    """The one-line migration message for a recipe written before ``loss.impl`` became the row
    implementation (it was ``fused`` | ``materialized``), or None."""
    if value == "materialized":
        return (f"{prefix}impl=materialized: {prefix}impl now selects the row implementation "
                f"({'/'.join(ROW_IMPLS)}); write {prefix}materialized: true for the plain-torch baseline")
    if value == "fused":
        return (f"{prefix}impl=fused: {prefix}impl now selects the row implementation ({'/'.join(ROW_IMPLS)}) "
                f"and the fused loss is the default; remove {prefix}impl (or write {prefix}impl: auto)")
    return None


def _check_loss_keys(d: dict[str, Any], *, prefix: str, error: type[Exception]) -> None:
    """``configtools.from_dict``'s hook for the loss section: keys it does not take and the old
    meaning of ``impl``, each refused in one line saying what to write instead."""
    for k in d:
        if k in _NOT_LOSS_KEYS:
            raise error(f"{prefix}{k} is not a recipe key: {_NOT_LOSS_KEYS[k]}")
    moved = _moved_impl(d.get("impl"), prefix)
    if moved:
        raise error(moved)


def _loss_options(self, **model_facts: Any) -> KDLossOptions:
    """The fused loss's options of this section, with ``model_facts`` (``softcap``, ``vocab_size``:
    ``kd_spec.MODEL_FACTS``, read from the models)."""
    return self.OPTIONS_CLS(**{k: getattr(self, k) for k in self.OPTION_KEYS}, **model_facts)


def loss_section(spec_cls: type = KDSpec, options_cls: type = KDLossOptions) -> type:
    """The recipe's ``loss`` section as a dataclass generated from ``spec_cls`` (``KDSpec``) and
    ``options_cls`` (``KDLossOptions``): the spec's fields a recipe sets (``STEP_KEYS``: all but
    ``loss`` and ``inter_weight``, which is ``intermediate.weight``), then the loss options' fields
    (``OPTION_KEYS``: all but those the step sets itself, ``kd_spec.STEP_SETS``, and the models'
    facts, ``kd_spec.MODEL_FACTS``), each with its type and default, then the top-k teacher's
    ``topk`` and ``topk_semantics``. ``options(**model_facts)`` builds the ``KDLossOptions``."""
    spec_hints, opt_hints = typing.get_type_hints(spec_cls), typing.get_type_hints(options_cls)
    step_keys = tuple(f.name for f in dataclasses.fields(spec_cls) if f.name not in ("loss", "inter_weight"))
    option_keys = tuple(f.name for f in dataclasses.fields(options_cls) if f.name not in _NOT_LOSS_KEYS)
    defaults = {f.name: f.default for f in dataclasses.fields(spec_cls) + dataclasses.fields(options_cls)}
    specs: list[tuple[str, Any, Any]] = [(k, spec_hints[k], field(default=defaults[k])) for k in step_keys]
    specs += [(k, opt_hints[k], field(default=defaults[k])) for k in option_keys]
    # A top-k teacher: with teacher_logits, the stored rows (topk: fewer than stored folds the rest
    # into the tail; None: all stored); with a live teacher, topk truncates it the same way online.
    # tail: top-k + one bucket for the rest; renorm: softmax over the top-k.
    specs += [("topk", typing.Optional[int], field(default=None)), ("topk_semantics", str, field(default="tail"))]
    cls = dataclasses.make_dataclass("LossConfig", specs, namespace={
        "__module__": __name__, "STEP_KEYS": step_keys, "OPTION_KEYS": option_keys, "OPTIONS_CLS": options_cls,
        "options": _loss_options, "check_recipe_keys": staticmethod(_check_loss_keys)})
    cls.__doc__ = (f"The recipe's loss section: the KD step's {', '.join(step_keys)} ({spec_cls.__name__}), the "
                   f"fused loss's {', '.join(option_keys)} ({options_cls.__name__}, with its defaults), and the top-k "
                   "teacher's topk, topk_semantics. Generated by loss_section.")
    return cls


LossConfig = loss_section()
LOSS_STEP_KEYS: tuple[str, ...] = LossConfig.STEP_KEYS      # kd_weight, lm_weight, materialized
LOSS_OPTION_KEYS: tuple[str, ...] = LossConfig.OPTION_KEYS  # divergence, beta, temperature, chunk_size, impl, ...


@dataclass
class IntermediateConfig:
    """Intermediate-state loss: MSE between ``proj(student hidden after layer s)`` and the
    teacher's hidden state after layer t, for each pair ``[s, t]``; ``proj`` is one learned
    linear map from student to teacher width shared by all pairs (identity-initialized when the
    widths are equal). Layer indices count decoder layers from 0; -1 is the last."""

    pairs: list[list[int]] = field(default_factory=list)
    weight: float = 0.0


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD): on a fraction ``lmbda`` of the steps (a draw seeded by the
    run's seed and the step, the same on every rank), the student writes the last
    ``max_new_tokens`` tokens of each block after its first ``seq_len - max_new_tokens``, sampling at
    ``temperature`` (0: greedy), and the loss covers the written tokens only; the teacher scores
    the student's own text. 0 (the default) trains on the data alone."""

    lmbda: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0


@dataclass
class DataConfig:
    source: str = "demo"            # "demo", a .txt/.jsonl file, a directory, a saved HF dataset
    seq_len: int = 256
    text_field: str = "text"
    max_blocks: int | None = None   # cap on training blocks (tests, smoke runs)
    eval_blocks: int = 8            # held-out blocks for the held-out loss
    seed: int = 0                   # data order (the block permutation of each epoch)
    cache_dir: str | None = None    # token shards (None: $MINITRON_FAST_TOKEN_CACHE or ~/.cache/minitron_fast/tokens)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    bf16: bool = False
    offload_optimizer: bool = False
    offload_param: bool = False         # ZeRO-3 only
    teacher_zero3: bool = False         # partition the frozen teacher with ZeRO-3 (built partitioned: zero.Init)
    teacher_offload_param: bool = False  # keep the ZeRO-3 teacher's parameter partitions in CPU memory
    config_file: str | None = None      # a user DeepSpeed JSON; checked against this recipe
    optimizer: str = "torch_adamw"      # torch_adamw (client optimizer) | deepspeed (DS's own AdamW)
    gradient_clipping: float = 1.0
    persistence_threshold: int | None = None  # stage3_param_persistence_threshold (None: DS default)
    max_live_parameters: int | None = None  # ZeRO-3: gathered elements a rank may keep (None: DS default, 1e9)


@dataclass
class DistillConfig(configtools.DeviceConfig):
    """The trainer's options (the distill and correct_teacher stages). ``device``, ``dtype`` and
    ``attn_implementation`` come from :class:`~minitron_fast.configtools.DeviceConfig`: the
    trainer runs on CUDA (one GPU per rank) when available; ``dtype`` None follows
    ``deepspeed.bf16``."""

    mode: str = "distill"
    label: str | None = None       # what progress bars and logs call the run (None: the mode); the pipeline names its stage
    teacher: str | None = None
    student: str | None = None
    teacher_logits: str | None = None  # stored top-k teacher logits (minitron-fast teacher-logits): no teacher loaded
    out: str = "runs/distill"
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    schedule: str = "cosine"       # cosine | linear | constant (after the linear warm-up)
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    seed: int = 0
    save_every: int = 50           # DeepSpeed checkpoint every N steps (and at the end)
    eval_every: int = 50           # held-out loss every K steps (and at steps 0 and the end)
    log_every: int = 1
    export: bool = True            # export the final model as a stock HF checkpoint to <out>/final
    threads: int | None = None     # torch CPU threads per process
    activation_checkpointing: bool = False  # recompute the student's decoder layers in backward (less memory)
    loss: LossConfig = field(default_factory=LossConfig)
    intermediate: IntermediateConfig = field(default_factory=IntermediateConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> "DistillConfig":
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}")
        if self.teacher is None and not (self.teacher_logits and self.mode == "distill"):
            raise ConfigError("the recipe names no teacher; set teacher: PATH (or demo), or teacher_logits: DIR")
        if self.teacher_logits and self.mode != "distill":
            raise ConfigError("teacher_logits serves mode distill only; remove it for correct-teacher")
        if self.teacher_logits and self.intermediate.weight > 0:
            raise ConfigError("the intermediate-state loss needs the live teacher's hidden states; "
                              "set intermediate.weight=0 or drop teacher_logits")
        if self.mode == "distill" and self.student is None:
            raise ConfigError("mode distill needs a student; set student: PATH")
        for name in ("steps", "micro_batch_size", "grad_accum", "save_every", "eval_every", "log_every"):
            _int(name, getattr(self, name), 1)
        _int("warmup_steps", self.warmup_steps, 0)
        _int("seed", self.seed, None)
        if self.threads is not None:
            _int("threads", self.threads, 1)
        _num("lr", self.lr, low=0.0, low_open=True)
        _num("min_lr", self.min_lr, low=0.0)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) is above lr ({self.lr}); the schedule decays from lr to min_lr")
        _num("weight_decay", self.weight_decay, low=0.0)
        if not (isinstance(self.adam_betas, (list, tuple)) and len(self.adam_betas) == 2):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        for i, b in enumerate(self.adam_betas):
            _num(f"adam_betas[{i}]", b, low=0.0, high=1.0, high_open=True)
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule={self.schedule!r} is not one of cosine, linear, constant")
        L = self.loss
        moved = _moved_impl(L.impl, "loss.")
        if moved:
            raise ConfigError(moved)
        if L.divergence not in REGISTRY:
            raise ConfigError(f"loss.divergence={L.divergence!r} is not one of {divergence_names()}")
        if L.impl not in ROW_IMPLS:
            raise ConfigError(f"loss.impl={L.impl!r} is not one of {', '.join(ROW_IMPLS)} (the fused loss's row "
                              "implementation)")
        _num("loss.temperature", L.temperature, low=0.0, low_open=True)
        _num("loss.beta", L.beta, low=0.0, high=1.0)
        for name, v in (("loss.kd_weight", L.kd_weight), ("loss.lm_weight", L.lm_weight),
                        ("intermediate.weight", self.intermediate.weight)):
            _num(name, v, low=0.0)
        if L.chunk_size is not None:
            _int("loss.chunk_size", L.chunk_size, 1)
        try:  # the loss options' own checks (KDLossOptions.validate, the one definition); messages name the field
            L.options().validate()
        except KDInputError as exc:
            raise ConfigError(f"loss.{exc}") from None
        if L.materialized and L.impl != "auto":
            raise ConfigError(f"loss.impl={L.impl} selects the fused loss's row implementation, but loss.materialized: "
                              "true computes plain torch logits instead; drop one of them")
        if L.materialized and L.chunk_size is not None:
            raise ConfigError(f"loss.chunk_size={L.chunk_size} sets the fused loss's chunk rows, but loss.materialized: "
                              "true computes the whole [N, V] logits at once; drop one of them")
        if L.topk_semantics not in TOPK_SEMANTICS:
            raise ConfigError(f"loss.topk_semantics={L.topk_semantics!r} is not one of {TOPK_SEMANTICS}")
        if L.topk is not None:
            _int("loss.topk", L.topk, 1)
        if (L.topk or self.teacher_logits) and L.materialized:
            raise ConfigError("a top-k teacher (teacher_logits or loss.topk) runs through the fused loss; "
                              "set loss.materialized: false")
        if (L.topk or self.teacher_logits) and L.topk_semantics == "renorm" and \
                REGISTRY[canonical(L.divergence, L.beta)].needs_teacher_support:
            raise ConfigError(f"{L.divergence} is infinite against a renormalized top-k teacher (zero mass outside "
                              "the top-k); use loss.topk_semantics=tail or another divergence")
        if self.mode == "distill" and L.kd_weight == 0 and L.lm_weight == 0 and self.intermediate.weight == 0:
            raise ConfigError("every loss weight is 0; set loss.kd_weight (or lm_weight / intermediate.weight)")
        for p in self.intermediate.pairs:
            if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p)):
                raise ConfigError(f"intermediate.pairs entries must be [student_layer, teacher_layer], got {p!r}")
        if self.intermediate.weight > 0 and not self.intermediate.pairs:
            raise ConfigError("intermediate.weight > 0 needs intermediate.pairs: [[s, t], ...]")
        _int("data.seq_len", self.data.seq_len, 2)
        op = self.on_policy
        _num("on_policy.lmbda", op.lmbda, low=0.0, high=1.0)
        _num("on_policy.temperature", op.temperature, low=0.0)
        _int("on_policy.max_new_tokens", op.max_new_tokens, 1)
        if op.lmbda > 0:
            if self.mode != "distill":
                raise ConfigError("on_policy.lmbda > 0 needs mode distill (the teacher scores the student's samples)")
            if self.teacher_logits:
                raise ConfigError("on_policy.lmbda > 0 needs a live teacher: stored logits cannot score the "
                                  "student's own samples; drop teacher_logits or set on_policy.lmbda=0")
            if op.max_new_tokens >= self.data.seq_len:
                raise ConfigError(f"on_policy.max_new_tokens={op.max_new_tokens} leaves no prompt in a block of "
                                  f"data.seq_len={self.data.seq_len} tokens (the student writes the last "
                                  f"max_new_tokens of each block); use at most {self.data.seq_len - 1}")
        _int("data.eval_blocks", self.data.eval_blocks, 0)
        if self.data.max_blocks is not None:
            _int("data.max_blocks", self.data.max_blocks, 1)
        ds = self.deepspeed
        _num("deepspeed.gradient_clipping", ds.gradient_clipping, low=0.0)
        if ds.persistence_threshold is not None:
            _int("deepspeed.persistence_threshold", ds.persistence_threshold, 0)
        if ds.max_live_parameters is not None:
            _int("deepspeed.max_live_parameters", ds.max_live_parameters, 0)
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.offload_param and ds.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param needs zero_stage 3")
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3")
        if ds.teacher_offload_param and not ds.teacher_zero3:
            raise ConfigError("deepspeed.teacher_offload_param needs deepspeed.teacher_zero3: true")
        if ds.optimizer not in ("torch_adamw", "deepspeed"):
            raise ConfigError(f"deepspeed.optimizer={ds.optimizer!r} is not one of torch_adamw, deepspeed")
        try:
            self.check_device()
        except MinitronError as exc:
            raise ConfigError(str(exc)) from None
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}: the trainer runs float32 or bfloat16 (deepspeed.bf16: true)")
        if self.dtype is not None and (self.dtype == "bfloat16") != ds.bf16:
            raise ConfigError(f"dtype={self.dtype} disagrees with deepspeed.bf16={str(ds.bf16).lower()}; "
                              "set deepspeed.bf16: true for bfloat16 (DeepSpeed keeps fp32 master weights), or drop dtype")
        return self

    def train_device(self) -> str:
        """The device this rank trains on: ``cuda:LOCAL_RANK`` for ``auto`` with CUDA available or
        ``cuda`` (``cuda:N`` as given), else the CPU, also on a machine with CUDA for ``cpu`` (the
        trainer then runs gloo ranks on DeepSpeed's CPU accelerator). Raises ConfigError, before any
        model loads, for ``cuda`` without CUDA."""
        try:
            dev = self.resolved_device()
        except MinitronError as exc:
            raise ConfigError(str(exc)) from None
        if dev.startswith("cuda"):
            return dev if ":" in dev else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A hash of everything that defines the run's trajectory (not steps, logging, saving or
        output paths), so ``--resume`` can refuse a directory written by a different run."""
        d = self.to_dict()
        for k in ("steps", "out", "save_every", "eval_every", "log_every", "export", "threads",
                  "activation_checkpointing", "label"):  # memory knobs and names leave the trajectory unchanged
            d.pop(k, None)
        d["deepspeed"] = {k: v for k, v in d["deepspeed"].items() if k not in ("config_file", "teacher_offload_param")}
        d["data"].pop("cache_dir", None)  # where token shards are cached does not change what is read
        if self.on_policy.lmbda == 0:  # off: the same run as before on_policy existed (resumable)
            d.pop("on_policy")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# -- building from dicts, YAML and overrides ---------------------------------------------------

def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    return configtools.from_dict(cls, d, error=ConfigError)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML; ``ds.`` is
    short for ``deepspeed.``)."""
    return configtools.parse_overrides(overrides, error=ConfigError, aliases={"ds": "deepspeed"},
                                       example="steps=100 or loss.temperature=2")


_merge = configtools.deep_merge


def config_from_dict(d: dict[str, Any]) -> DistillConfig:
    return _from_dict(DistillConfig, d).validate()


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> DistillConfig:
    """Reads the YAML recipe at ``path`` (or starts from the defaults when None), applies
    ``key=value`` overrides and validates. Raises ConfigError with a one-line message."""
    d: dict[str, Any] = {}
    if path is not None:
        d = configtools.load_yaml_mapping(path, error=ConfigError)
        if "ds" in d and "deepspeed" not in d:
            d["deepspeed"] = d.pop("ds")
    return config_from_dict(_merge(d, parse_overrides(list(overrides))))


def dump_config(cfg: DistillConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
