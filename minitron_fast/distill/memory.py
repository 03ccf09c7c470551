"""A memory plan before the job: per-GPU bytes of a distillation (or teacher-correction) run.

For a trainer recipe (``DistillConfig``), a world size and the two models' configs, the plan
gives per GPU (rank):

- **teacher**: its parameters in the training dtype (divided by the world size under
  ``teacher_zero3``, plus one gathered layer; none with ``teacher_offload_param``);
- **student**: its parameters (stage 3: a partition plus what a rank keeps gathered from forward
  to backward: ``min(P, deepspeed.max_live_parameters)`` elements, DeepSpeed's default 1e9, or
  one gathered layer at 0);
- **gradients**: 16-bit (or fp32) gradients (stages 2-3: a partition);
- **optimizer**: AdamW's two fp32 moments, plus the fp32 master weights (mixed precision, and
  every ZeRO stage: DeepSpeed clones an fp32 partition from fp32 parameters too) and the fp32
  gradient partition of mixed precision (stages 1-3: a partition; CPU with ``offload_optimizer``);
- **activations**: what the student's backward needs, with and without activation
  checkpointing (``activations_ckpt`` / ``activations_full``; the plan counts the recipe's
  choice), plus the teacher's and student's final hidden states;
- **kd_loss**: the fused KD loss's ``[chunk, V]`` fp32 buffers and the ``[N, H]`` hidden
  gradient (``impl: materialized``: the whole ``[N, V]`` logits of both models), plus the
  gathered lm_heads under ZeRO-3.

The student's model states (parameters + gradients + optimizer) come from DeepSpeed's own
estimators (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_...``) where they
apply (bf16 with ZeRO-2/3); the per-part split follows the same accounting (2 + 2 + 16 bytes per
parameter for bf16). Activation bytes per token and layer count the tensors a Llama-style
decoder layer keeps for backward (SDPA / flash attention: no ``[T, T]`` scores).
``tests/distill/test_memory_plan.py`` checks the plan against a measured CPU run.

Example:
    >>> from minitron_fast.distill.memory import plan_recipe
    >>> print(plan_recipe("llama3.1-8b-to-4b-width", gpu_mem="80GB").render())
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minitron_fast.errors import MinitronError

GB = 1e9
HEADROOM = 0.9   # plan against 90% of the GPU: CUDA context, NCCL buffers, allocator fragmentation

# Published configs of the shipped recipes' teachers (no hub access here): enough to plan.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                                    max_position_embeddings=131072),
    "nvidia/Llama-3.1-Minitron-4B-Width-Base": dict(model_type="llama", hidden_size=3072, intermediate_size=9216,
                                                    num_hidden_layers=32, num_attention_heads=32,
                                                    num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                                    tie_word_embeddings=False, max_position_embeddings=131072),
    "mistralai/Mistral-Nemo-Base-2407": dict(model_type="mistral", hidden_size=5120, intermediate_size=14336,
                                             num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                                             head_dim=128, vocab_size=131072, tie_word_embeddings=False,
                                             max_position_embeddings=131072),
}


class MemoryPlanError(MinitronError, ValueError):
    """The plan cannot be made (unknown model shape, bad GPU size)."""


def parse_size(text: str | float | int) -> float:
    """``"80GB"``, ``"80G"``, ``"80GiB"``, ``"141 GB"`` or a number of GB -> bytes."""
    if isinstance(text, (int, float)):
        return float(text) * GB
    t = str(text).strip().replace(" ", "").upper()
    for suffix, mult in (("GIB", 2**30), ("GB", GB), ("G", GB), ("MIB", 2**20), ("MB", 1e6), ("TB", 1e12)):
        if t.endswith(suffix):
            t, m = t[: -len(suffix)], mult
            break
    else:
        m = GB
    try:
        v = float(t) * m
    except ValueError:
        raise MemoryPlanError(f"GPU memory {text!r} is not a size; write it like 80GB, 141GB or 24GiB") from None
    if not v > 0:
        raise MemoryPlanError(f"GPU memory {text!r} must be positive")
    return v


def model_config(model: str | os.PathLike) -> Any:
    """The HF config of ``model``: a local checkpoint, ``demo``, or a shipped recipe's hub name."""
    from minitron_fast.models.loading import load_config

    if str(model) in KNOWN_CONFIGS:
        from transformers import AutoConfig

        d = dict(KNOWN_CONFIGS[str(model)])
        return AutoConfig.for_model(d.pop("model_type"), **d)
    p = Path(str(model)).expanduser()
    if str(model) != "demo" and not (p / "config.json").is_file():
        raise MemoryPlanError(f"cannot plan for model {model}: no config.json there (known without a checkpoint: "
                              f"{', '.join(KNOWN_CONFIGS)}); pass a local checkpoint directory")
    return load_config(model)


@dataclass
class ModelStats:
    params: int
    largest_layer: int       # the largest module's own parameters (ZeRO-3 gathers one at a time)
    hidden: int
    ffn: int
    layers: int
    kv_dim: int
    q_dim: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> "ModelStats":
        from minitron_fast.models import view_class_for_config
        from minitron_fast.models.loading import meta_model

        m = meta_model(config)
        params = sum(p.numel() for p in m.parameters())
        largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())
        g = view_class_for_config(config).geometry_of(config)
        return cls(params=params, largest_layer=largest, hidden=g.hidden_size, ffn=g.intermediate_size,
                   layers=g.num_hidden_layers, kv_dim=g.num_key_value_heads * g.head_dim,
                   q_dim=g.num_attention_heads * g.head_dim, vocab=g.vocab_size)


def activation_bytes_per_token_layer(s: ModelStats, b: int) -> int:
    """Bytes one decoder layer keeps per token for its backward (Llama-style, SDPA/flash):
    the two norms' inputs (fp32 upcast) and outputs, q/k/v, the attention output and its
    log-sum-exp, o_proj's input, the MLP's gate, up, activation and product, and the residual."""
    h, F, kv, q = s.hidden, s.ffn, s.kv_dim, s.q_dim
    norms = 2 * (4 * h + b * h)            # fp32 input + normalized output, x2 norms
    attn = b * (q + 2 * kv) + b * q + 4 * (q // 64 or 1) + b * q   # q, k, v (roped), out, lse, o_proj in
    mlp = b * (2 * F) + b * F + b * F      # gate, up, act(gate), act*up (down_proj's input)
    return norms + attn + mlp + b * h      # + the residual stream


@dataclass
class Plan:
    """Per-GPU memory of one training run, bytes (see the module doc)."""

    title: str
    world: int
    dtype: str
    parts: dict[str, float]
    activations_full: float
    activations_ckpt: float
    checkpointing: bool
    gpu_mem: float | None = None
    notes: list[str] = field(default_factory=list)
    ds_estimate: float | None = None   # DeepSpeed's estimate of the student's model states

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_mem is None else self.total <= HEADROOM * self.gpu_mem

    def advice(self, cfg: Any | None = None) -> list[str]:
        """The knobs that would make a run that does not fit fit, biggest saving first."""
        if self.fits is not False:
            return []
        out = []
        if not self.checkpointing and self.activations_full > self.activations_ckpt:
            out.append(f"activation_checkpointing=true (activations {self.activations_full / GB:.1f} -> "
                       f"{self.activations_ckpt / GB:.1f} GB)")
        if cfg is not None:
            ds = cfg.deepspeed
            if self.parts.get("teacher", 0) > 0 and not ds.teacher_zero3 and cfg.mode == "distill":
                out.append(f"deepspeed.teacher_zero3=true (teacher {self.parts['teacher'] / GB:.1f} GB -> about "
                           f"{self.parts['teacher'] / self.world / GB:.1f} GB per GPU)")
            if ds.zero_stage < 3:
                out.append("deepspeed.zero_stage=3 (partition the student's parameters and gradients too)")
            if not ds.offload_optimizer:
                out.append(f"deepspeed.offload_optimizer=true (optimizer states {self.parts['optimizer'] / GB:.1f} GB "
                           "to CPU memory)")
            if ds.teacher_zero3 and not ds.teacher_offload_param:
                out.append("deepspeed.teacher_offload_param=true (teacher parameters to CPU memory)")
            if cfg.micro_batch_size > 1:
                out.append(f"micro_batch_size={cfg.micro_batch_size // 2} with grad_accum={cfg.grad_accum * 2} "
                           "(halves activations, same global batch)")
        return out

    def rows(self) -> list[tuple[str, float]]:
        return list(self.parts.items()) + [("total", self.total)]

    def render(self, cfg: Any | None = None) -> str:
        lines = [f"{self.title}: per GPU, {self.world} rank{'s' if self.world > 1 else ''}, {self.dtype}"]
        for k, v in self.rows():
            extra = ""
            if k == "activations":
                extra = (f"   (checkpointing {'on' if self.checkpointing else 'off'}; on: "
                         f"{self.activations_ckpt / GB:.2f} GB, off: {self.activations_full / GB:.2f} GB)")
            if k == "total" and self.ds_estimate is not None:
                extra = f"   (student model states by DeepSpeed's estimator: {self.ds_estimate / GB:.2f} GB)"
            lines.append(f"  {k:<12} {v / GB:8.2f} GB{extra}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.gpu_mem is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  verdict: {verdict} a {self.gpu_mem / GB:.0f} GB GPU (plan <= {HEADROOM:.0%} of it: "
                         f"{HEADROOM * self.gpu_mem / GB:.1f} GB)")
            for a in self.advice(cfg):
                lines.append(f"  change: {a}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "world": self.world, "dtype": self.dtype,
                "parts_gb": {k: v / GB for k, v in self.parts.items()}, "total_gb": self.total / GB,
                "activations_full_gb": self.activations_full / GB, "activations_ckpt_gb": self.activations_ckpt / GB,
                "checkpointing": self.checkpointing, "gpu_mem_gb": None if self.gpu_mem is None else self.gpu_mem / GB,
                "fits": self.fits, "ds_student_states_gb": None if self.ds_estimate is None else self.ds_estimate / GB,
                "notes": self.notes}


def _kd_chunk(V: int, N: int) -> tuple[int, int]:
    """(rows per chunk, fp32 [chunk, V] buffers) of the fused loss's default."""
    try:
        from minitron_fast.ops.kd_loss import default_chunk_size

        return default_chunk_size(V, N), 3
    except ImportError:  # pragma: no cover - the KD op moved
        return max(1, min(1024, N)), 3


DS_MAX_LIVE = 10**9  # DeepSpeed's stage3_max_live_parameters / stage3_max_reuse_distance default


def _ds_student_states(P: int, largest: int, world: int, stage: int, bf16: bool, offload: bool) -> float | None:
    """DeepSpeed's estimate of the student's params + grads + optimizer per GPU (bf16, stage 2-3)."""
    if not bf16 or stage not in (2, 3):
        return None
    try:
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            _, gpu, _ = estimate_zero3_model_states_mem_needs(P, largest, num_gpus_per_node=world, cpu_offload=offload,
                                                              cpu_offload_params=False, zero_init=True)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            _, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=world, cpu_offload=offload)
        return float(gpu)
    except Exception:  # pragma: no cover - DeepSpeed missing or changed
        return None


def plan(cfg: Any, teacher: ModelStats | None, student: ModelStats, world: int, *, gpu_mem: float | None = None,
         title: str = "plan") -> Plan:
    """The per-GPU plan of trainer recipe ``cfg`` (a ``DistillConfig``) on ``world`` ranks.
    ``student`` is the trained model (the teacher itself in ``correct-teacher`` mode)."""
    ds = cfg.deepspeed
    b = 2 if ds.bf16 else 4
    stage = ds.zero_stage
    W = max(1, world)
    P = student.params
    parts: dict[str, float] = {}
    notes: list[str] = []
    # teacher (frozen, no optimizer state)
    if cfg.mode == "distill" and teacher is not None:
        if ds.teacher_zero3:
            t = 0.0 if ds.teacher_offload_param else teacher.params * b / W
            parts["teacher"] = t + 2 * teacher.largest_layer * b   # a gathered module and the prefetched next
            if ds.teacher_offload_param:
                notes.append(f"teacher parameters in CPU memory: {teacher.params * b / W / GB:.1f} GB per rank")
        else:
            parts["teacher"] = teacher.params * b
    # student model states (DeepSpeed's accounting: 16-bit params and grads, fp32 master + Adam)
    master = 4 if ds.bf16 or stage >= 1 else 0    # fp32 master partition (ZeRO clones one from fp32 params too)
    fp32_grad = 4 if ds.bf16 else 0               # fp32 gradient partition the optimizer steps on
    opt_bytes = (8 + master + fp32_grad) * P
    if stage == 3:  # a partition, plus what stays gathered from forward to backward (_stage3_residency)
        live = DS_MAX_LIVE if ds.max_live_parameters is None else ds.max_live_parameters
        parts["student"] = P * b / W + max(2 * student.largest_layer, min(P, live)) * b
    else:
        parts["student"] = P * b
    parts["gradients"] = P * b / W if stage >= 2 else P * b
    if ds.offload_optimizer:
        parts["optimizer"] = 0.0
        notes.append(f"optimizer states in CPU memory: {opt_bytes / max(W, 1) / GB:.1f} GB per rank")
    else:
        parts["optimizer"] = opt_bytes / W if stage >= 1 else opt_bytes
    # activations of one micro-batch (the optimizer step and the backward do not overlap)
    n = cfg.micro_batch_size * cfg.data.seq_len
    per_layer = n * activation_bytes_per_token_layer(student, b)
    full = student.layers * per_layer
    ckpt = student.layers * n * student.hidden * b + per_layer     # layer inputs + one layer recomputed
    hidden_states = n * student.hidden * b + (n * teacher.hidden * b if teacher is not None and cfg.mode == "distill" else 0)
    if teacher is not None and cfg.mode == "distill":   # the teacher's forward: one layer's transients at a time
        hidden_states += n * activation_bytes_per_token_layer(teacher, b) // 2
    parts["activations"] = (ckpt if cfg.activation_checkpointing else full) + hidden_states
    # the loss
    N = cfg.micro_batch_size * (cfg.data.seq_len - 1)
    V = student.vocab
    if cfg.loss.impl == "materialized":
        kd = 4 * N * V * (3 if cfg.mode == "distill" else 2)
    else:
        chunk, nbuf = _kd_chunk(V, N)
        chunk = min(cfg.loss.chunk_size or chunk, N)
        kd = nbuf * chunk * V * 4
    kd += N * student.hidden * 4                                      # fp32 grad of the hidden states
    if stage == 3:
        kd += V * student.hidden * b                                  # the student lm_head, gathered
    if cfg.mode == "distill" and teacher is not None and ds.teacher_zero3:
        kd += V * teacher.hidden * b                                  # the teacher lm_head, gathered
    parts["kd_loss"] = kd
    est = _ds_student_states(P, student.largest_layer, W, stage, ds.bf16, ds.offload_optimizer)
    return Plan(title=title, world=W, dtype="bf16" if ds.bf16 else "fp32", parts=parts, activations_full=full + hidden_states,
                activations_ckpt=ckpt + hidden_states, checkpointing=cfg.activation_checkpointing, gpu_mem=gpu_mem,
                notes=notes, ds_estimate=est)


def plan_config(cfg: Any, world: int, *, gpu_mem: float | None = None, teacher_config: Any = None,
                student_config: Any = None, title: str | None = None) -> Plan:
    """The plan of a trainer recipe whose models are on disk (or given as configs)."""
    tc = teacher_config if teacher_config is not None else model_config(cfg.teacher)
    if cfg.mode == "distill":
        sc = student_config if student_config is not None else model_config(cfg.student)
        return plan(cfg, ModelStats.of(tc), ModelStats.of(sc), world, gpu_mem=gpu_mem, title=title or cfg.mode)
    return plan(cfg, None, ModelStats.of(tc), world, gpu_mem=gpu_mem, title=title or cfg.mode)


def hostfile_slots(path: str | os.PathLike) -> int:
    """Total ``slots=N`` of a DeepSpeed hostfile."""
    total = 0
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        slots = [w.split("=", 1)[1] for w in line.split()[1:] if w.startswith("slots=")]
        total += int(slots[0]) if slots else 1
    return total


def plan_recipe(recipe: str | os.PathLike, overrides: list[str] = (), *, gpu_mem: str | float | None = None,
                world: int | None = None) -> list[tuple[Plan, Any]]:
    """Plans of every training section of a pipeline recipe (``correct_teacher``, ``distill``,
    ``scratch``), with the student's shape from ``prune.target``; or of one trainer recipe (a
    distill YAML). Returns ``[(plan, DistillConfig)]``."""
    from minitron_fast.distill.config import ConfigError, config_from_dict, load_config
    from minitron_fast.pipeline.recipe import RecipeError, load_recipe, stage_enabled, training_config

    mem = parse_size(gpu_mem) if gpu_mem is not None else None
    try:
        r = load_recipe(recipe, list(overrides))
    except RecipeError as exc:
        if not Path(str(recipe)).is_file():
            raise
        try:  # a trainer recipe (configs/distill/*.yaml)?
            cfg = load_config(recipe, list(overrides))
        except ConfigError:
            raise exc from None
        W = world or 1
        return [(plan_config(cfg, W, gpu_mem=mem, title=f"{Path(str(recipe)).stem}: {cfg.mode}"), cfg)]
    from minitron_fast.models import view_class_for_config
    from minitron_fast.artifacts.targets import target_geometry

    W = world or r.launch.num_procs
    hostfile = getattr(r.launch, "hostfile", None)
    if world is None and hostfile and Path(hostfile).is_file():
        W = hostfile_slots(hostfile)   # ranks = the hosts' slots
    tc = model_config(r.teacher)
    geo = target_geometry(tc, r.prune.target)
    sc = view_class_for_config(tc).config_for(copy.deepcopy(tc), geo)
    out = []
    for section in ("correct_teacher", "distill", "scratch"):
        if not stage_enabled(r, section):
            continue
        d = training_config(r, section, teacher=str(r.teacher), student="student", out="plan")
        cfg = config_from_dict(d)
        if cfg.mode == "distill":
            p = plan_config(cfg, W, gpu_mem=mem, teacher_config=tc, student_config=sc, title=f"{r.name}: {section}")
        else:   # correct_teacher trains the teacher, scratch a student-shaped model
            p = plan_config(cfg, W, gpu_mem=mem, teacher_config=tc if section == "correct_teacher" else sc,
                            title=f"{r.name}: {section}")
        out.append((p, cfg))
    return out


__all__ = ["KNOWN_CONFIGS", "MemoryPlanError", "ModelStats", "Plan", "activation_bytes_per_token_layer",
           "hostfile_slots", "model_config", "parse_size", "plan", "plan_config", "plan_recipe"]
