"""A memory plan before the job: per-GPU bytes of every stage of a run that loads a model.

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
decoder layer keeps for backward (SDPA / flash attention: no ``[T, T]`` scores; eager attention,
Gemma 2's default, adds its ``[B, heads, T, T]`` scores, :func:`eager_attention_bytes`; a MoE
layer's MLP counts its top-k experts per token).
``tests/distill/test_memory_plan.py`` checks the plan against a measured CPU run.

A pipeline recipe's other stages load a whole model outside DeepSpeed (``teacher_eval``,
``teacher_logits``, ``importance``, ``search``, ``prune``, ``evaluate``): their
:class:`StagePlan` counts the **weights** in the stage's dtype (None: float32, the loader's
default) on one GPU, or spread over the node's GPUs with ``device_map: auto``, one forward's
**activations** and the **logits** the stage makes (a held-out loss: ``[B, T, V]`` and two fp32
copies). :func:`plan_recipe` plans every stage of a recipe; ``minitron-fast memory`` prints them
(``tests/distill/test_recipes_fit.py``: every shipped recipe fits 8 x 80 GB).

Example:
    >>> from minitron_fast.distill.memory import plan_recipe
    >>> for p, cfg in plan_recipe("llama3.1-8b-to-4b-width", gpu_mem="80GB"):
    ...     print(p.render(cfg))
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minitron_fast.errors import MinitronError

GB = 1e9
HEADROOM = 0.9   # plan against 90% of the GPU: NCCL buffers, allocator fragmentation
# Each process that touches a GPU holds a CUDA context there (the driver's state and the kernels
# torch loads lazily), outside torch's allocator: about 0.5 GB per process on an H100 with torch 2.x
# (a figure from public reports, not measured here: no GPU). A training rank holds one; in a
# pipeline run, rank 0 shares cuda:0 with the pipeline process, which ran teacher_eval and
# importance there in-process and keeps its context after emptying its cache.
CUDA_CONTEXT = 0.5 * GB

from minitron_fast.models.known_configs import DEMO_MODEL, KNOWN_CONFIGS  # noqa: E402  (facts of the models)


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
    """The HF config of ``model``: a local checkpoint, ``demo`` (the embedded teacher's shape, fp32,
    without converting it), or a shipped recipe's hub name (``KNOWN_CONFIGS``)."""
    from minitron_fast.models.loading import load_config

    if str(model) in KNOWN_CONFIGS or str(model) == "demo":
        from transformers import AutoConfig

        d = dict(KNOWN_CONFIGS[DEMO_MODEL], dtype="float32") if str(model) == "demo" else KNOWN_CONFIGS[str(model)]
        d = dict(d)
        return AutoConfig.for_model(d.pop("model_type"), **d)
    p = Path(str(model)).expanduser()
    if not (p / "config.json").is_file():
        raise MemoryPlanError(f"cannot plan for model {model}: no config.json there (known without a checkpoint: demo, "
                              f"{', '.join(KNOWN_CONFIGS)}); pass a local checkpoint directory")
    return load_config(model)


@dataclass
class ModelStats:
    params: int
    largest_layer: int       # the largest module's own parameters (ZeRO-3 gathers one at a time)
    hidden: int
    ffn: int                 # MLP neurons a token passes through (MoE: top-k experts' plus a shared expert's)
    layers: int
    kv_dim: int
    q_dim: int
    vocab: int
    heads: int = 0
    block_params: int = 0    # the largest decoder layer's parameters (device_map places whole layers)
    eager: bool = False      # the family's default attention is eager ([T, T] scores; Gemma 2's softcap)
    attn_softcap: bool = False
    dtype: str | None = None  # the checkpoint's dtype (config.json), None when it names none

    @classmethod
    def of(cls, config: Any) -> "ModelStats":
        from minitron_fast.models import get_view, view_class_for_config
        from minitron_fast.models.loading import meta_model

        m = meta_model(config)
        params = sum(p.numel() for p in m.parameters())
        largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in m.modules())
        block = max(sum(p.numel() for p in layer.parameters()) for layer in get_view(m).decoder_layers)
        view_cls = view_class_for_config(config)
        g = view_cls.geometry_of(config)
        ffn = view_cls.active_ffn_of(config, g)   # MoE: the experts each token passes through
        dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return cls(params=params, largest_layer=largest, hidden=g.hidden_size, ffn=ffn,
                   layers=g.num_hidden_layers, kv_dim=g.num_key_value_heads * g.head_dim,
                   q_dim=g.num_attention_heads * g.head_dim, vocab=g.vocab_size, heads=g.num_attention_heads,
                   block_params=block, eager=view_cls.default_attn_implementation == "eager",
                   attn_softcap=bool(get_view(m).attn_logit_softcap),
                   dtype=None if dt is None else str(dt).replace("torch.", ""))


def activation_bytes_per_token_layer(s: ModelStats, b: int) -> int:
    """Bytes one decoder layer keeps per token for its backward (Llama-style, SDPA/flash):
    the two norms' inputs (fp32 upcast) and outputs, q/k/v, the attention output and its
    log-sum-exp, o_proj's input, the MLP's gate, up, activation and product, and the residual."""
    h, F, kv, q = s.hidden, s.ffn, s.kv_dim, s.q_dim
    norms = 2 * (4 * h + b * h)            # fp32 input + normalized output, x2 norms
    attn = b * (q + 2 * kv) + b * q + 4 * (q // 64 or 1) + b * q   # q, k, v (roped), out, lse, o_proj in
    mlp = b * (2 * F) + b * F + b * F      # gate, up, act(gate), act*up (down_proj's input)
    return norms + attn + mlp + b * h      # + the residual stream


def uses_eager(attn_implementation: str | None, s: ModelStats) -> bool:
    """Whether a stage runs eager attention: named, or left to the family's default (the plan
    assumes no flash-attn, which would otherwise be the CUDA default for bf16/fp16)."""
    return attn_implementation == "eager" or (attn_implementation is None and s.eager)


def eager_attention_bytes(s: ModelStats, seqs: int, T: int, b: int) -> tuple[float, float]:
    """Eager attention's ``[seqs, heads, T, T]`` scores in one layer: ``(kept, transient)`` bytes.
    Kept for backward: the fp32 softmax, its cast to the model dtype (and the softcap's tanh);
    transient (also a no-grad forward's peak): the raw scores beside the fp32 softmax and its cast.
    The two ``[seqs, 1, T, T]`` additive masks (full and sliding) are counted in the transient.

    Example (Gemma-2-9B, 16 heads, one 8192-token sequence, bf16): 8.6 GB kept, 8.9 GB transient.
    """
    e = seqs * s.heads * T * T
    kept = e * (4 + b + (b if s.attn_softcap else 0))
    return float(kept), float(e * (4 + 2 * b) + 2 * seqs * T * T * b)


def forward_bytes(s: ModelStats, seqs: int, T: int, b: int, *, eager: bool = False) -> float:
    """Transient bytes of a no-grad forward over ``seqs`` sequences of ``T`` tokens: the residual
    stream and a layer's inputs and outputs ``[seqs*T, H]``, one layer's tensors at a time
    (:func:`activation_bytes_per_token_layer`; a forward keeps nothing for backward) and eager
    attention's scores. The logits are counted by the caller (each stage makes its own)."""
    n = seqs * T
    out = 4 * n * s.hidden * b + n * activation_bytes_per_token_layer(s, b)
    return out + (eager_attention_bytes(s, seqs, T, b)[1] if eager else 0.0)


def logits_bytes(s: ModelStats, seqs: int, T: int, b: int) -> float:
    """A held-out loss's logits (``evaluate.perplexity.lm_loss``): ``[seqs, T, V]`` in the model
    dtype, its fp32 copy and the fp32 log-softmax of the cross entropy."""
    return float(seqs * T * s.vocab * (b + 8))


def per_sequence_logits_bytes(s: ModelStats, seqs: int, T: int, b: int) -> float:
    """The logits of a loss taken a sequence at a time (``importance.depth.depth_lm_loss``): the
    batch's ``[seqs, T, V]`` in the model dtype, and one sequence's fp32 copy and log-softmax."""
    return float(seqs * T * s.vocab * b + T * s.vocab * 8)


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
    stage: str | None = None           # the recipe stage (pipeline recipes), e.g. distill
    attention: float = 0.0             # eager attention's [B, heads, T, T] scores within the activations

    kind = "train"                     # a DeepSpeed training run (StagePlan: "load", a whole-model load)

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
        if self.attention > 0.05 * self.total:
            out.append(f"attn_implementation=flash_attention_2 (no [T, T] eager attention scores: "
                       f"-{self.attention / GB:.1f} GB; needs flash-attn installed)")
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

    def header(self) -> str:
        return f"{self.title}: per GPU, {self.world} rank{'s' if self.world > 1 else ''}, {self.dtype}"

    def row_note(self, key: str) -> str:
        """The parenthesis printed after a row of :meth:`render` ("" for none)."""
        if key == "activations":
            return (f"checkpointing {'on' if self.checkpointing else 'off'}; on: "
                    f"{self.activations_ckpt / GB:.2f} GB, off: {self.activations_full / GB:.2f} GB")
        if key == "total" and self.ds_estimate is not None:
            return f"student model states by DeepSpeed's estimator: {self.ds_estimate / GB:.2f} GB"
        return ""

    def render(self, cfg: Any | None = None) -> str:
        lines = [self.header()]
        for k, v in self.rows():
            extra = self.row_note(k)
            lines.append(f"  {k:<12} {v / GB:8.2f} GB{f'   ({extra})' if extra else ''}")
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
        return {"title": self.title, "stage": self.stage, "kind": self.kind, "world": self.world, "dtype": self.dtype,
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
    B, T = cfg.micro_batch_size, cfg.data.seq_len
    n = B * T
    per_layer = n * activation_bytes_per_token_layer(student, b)
    full = student.layers * per_layer
    ckpt = student.layers * n * student.hidden * b + per_layer     # layer inputs + one layer recomputed
    attention = 0.0
    if uses_eager(cfg.attn_implementation, student):   # [B, heads, T, T] scores: every layer's, or one recomputed
        kept, transient = eager_attention_bytes(student, B, T, b)
        full += student.layers * kept + transient
        ckpt += kept + transient
        attention = (kept if cfg.activation_checkpointing else student.layers * kept) + transient
        notes.append(f"eager attention: [{B}, {student.heads}, {T}, {T}] scores, {kept / GB:.2f} GB kept per layer")
    hidden_states = n * student.hidden * b + (n * teacher.hidden * b if teacher is not None and cfg.mode == "distill" else 0)
    if teacher is not None and cfg.mode == "distill":   # the teacher's forward: one layer's transients at a time
        hidden_states += n * activation_bytes_per_token_layer(teacher, b) // 2
        if uses_eager(cfg.attn_implementation, teacher):
            hidden_states += eager_attention_bytes(teacher, B, T, b)[1]
    parts["activations"] = (ckpt if cfg.activation_checkpointing else full) + hidden_states
    # the loss
    N = cfg.micro_batch_size * (cfg.data.seq_len - 1)
    V = student.vocab
    if cfg.loss.materialized:
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
    parts["cuda_context"] = CUDA_CONTEXT
    est = _ds_student_states(P, student.largest_layer, W, stage, ds.bf16, ds.offload_optimizer)
    return Plan(title=title, world=W, dtype="bf16" if ds.bf16 else "fp32", parts=parts, activations_full=full + hidden_states,
                activations_ckpt=ckpt + hidden_states, checkpointing=cfg.activation_checkpointing, gpu_mem=gpu_mem,
                notes=notes, ds_estimate=est, attention=attention)


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


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SPREAD_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")   # device_map values that use every GPU
DEVICE_MAP_SECTIONS = ("importance", "evaluate", "teacher_logits")    # DeviceMapConfig sections
LM_EVAL_TOKENS = 2048        # lm-evaluation-harness requests: at most its default context (short prompts)
LOGIT_CHUNK = 1 << 28        # the offline teacher's fp32 [rows, V] logits per lm_head call (artifacts.teacher_logits)
@dataclass
class StagePlan(Plan):
    """Per-GPU memory of a pipeline stage that loads a whole model outside DeepSpeed
    (``teacher_eval``, ``teacher_logits``, ``importance``, ``search``, ``prune``, ``evaluate``):
    its weights in the stage's dtype (``device_map: auto``: spread over the node's GPUs, whole
    decoder layers each, so one layer more than an even share; else all on one GPU), one forward's
    activations (:func:`forward_bytes`) and the logits it makes; search also holds its candidate
    (a teacher-sized copy while it is pruned, then the student with its gradients and AdamW states)
    and the teacher's cached hidden states. ``world`` is the GPUs the weights spread over.
    ``section`` is the recipe section the stage loads with (``teacher_eval``: ``evaluate``)."""

    section: str = ""
    model: str = "teacher"
    params: int = 0
    device_map: str | None = None
    node_gpus: int = 1
    on_gpu: bool = True
    batch: int = 0
    row_notes: dict[str, str] = field(default_factory=dict)
    stage_options: dict[str, Any] = field(default_factory=dict)

    kind = "load"

    def header(self) -> str:
        where = (f"spread over {self.world} GPUs (device_map {self.device_map})" if self.world > 1
                 else "on one GPU" if self.on_gpu else "on the CPU, nothing on a GPU")
        return f"{self.title}: per GPU, the {self.model} ({self.params / 1e9:.2f}B parameters) {where}, {self.dtype}"

    def row_note(self, key: str) -> str:
        return self.row_notes.get(key, "")

    def advice(self, cfg: Any | None = None) -> list[str]:
        """The recipe keys that would make this stage fit, biggest saving first."""
        if self.fits is not False:
            return []
        sec, out = self.section, []
        w = self.parts.get("weights", 0.0)
        if self.stage == "prune" and not self.stage_options.get("streaming", True):
            out.append("prune.streaming=true (prune from the safetensors shards: no model on a GPU)")
        if self.dtype == "fp32":
            out.append(f"{sec}.dtype=bfloat16 (weights {w / GB:.1f} -> {w / 2 / GB:.1f} GB)")
        if sec in DEVICE_MAP_SECTIONS and self.world == 1 and self.node_gpus > 1:
            b = 2 if self.dtype == "fp32" else 1
            out.append(f"{sec}.device_map=auto (the weights over the node's {self.node_gpus} GPUs: about "
                       f"{w / b / self.node_gpus / GB:.1f} GB each{' in bfloat16' if b == 2 else ''})")
        if self.stage == "search":
            if not self.stage_options.get("lora_rank"):
                out.append(f"search.lora_rank=16 (no full-size gradients and AdamW states: "
                           f"-{self.stage_options.get('states', 0.0) / GB:.1f} GB)")
            out.append("search.enabled=false with prune.target set (search has no device_map: its teacher and "
                       "candidates share one GPU)")
        if self.attention > 0.05 * self.total:
            out.append(f"{sec}.attn_implementation=flash_attention_2 (no [T, T] eager attention scores: "
                       f"-{self.attention / GB:.1f} GB; needs flash-attn installed)")
        x = sum(self.parts.get(k, 0.0) for k in ("activations", "logits", "training"))
        if self.batch > 1 and x > 0.1 * self.total:
            key = "micro_batch_size" if self.stage == "search" else "batch_size"
            what = "activations and logits" if "logits" in self.parts else "activations"
            out.append(f"{sec}.{key}={self.batch // 2} ({what} {x / GB:.1f} -> about {x / 2 / GB:.1f} GB)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(super().to_dict(), section=self.section, model=self.model, params=self.params,
                    device_map=self.device_map, gpus=self.world, on_gpu=self.on_gpu)


def load_plan(stage: str, s: ModelStats, *, section: str, dtype: str | None, device: str = "auto",
              device_map: str | None = None, node_gpus: int = 1, seqs: int = 1, T: int = 2,
              attn_implementation: str | None = None, logits: str = "none", model: str = "teacher",
              extra: dict[str, float] | None = None, extra_notes: dict[str, str] | None = None,
              forward: bool = True, gpu_mem: float | None = None,
              title: str | None = None, notes: list[str] | None = None,
              options: dict[str, Any] | None = None) -> StagePlan:
    """The :class:`StagePlan` of ``stage`` loading the model ``s`` in ``dtype`` (None: float32,
    the loader's default) for forwards over ``seqs`` sequences of ``T`` tokens. ``logits``:
    ``heldout`` (the held-out loss's ``[seqs, T, V]`` logits, :func:`logits_bytes`),
    ``per_sequence`` (a loss a sequence at a time, :func:`per_sequence_logits_bytes`), ``chunked``
    (the offline teacher's bounded chunks) or ``none`` (importance skips the lm_head). ``extra``:
    more parts (search), ``extra_notes`` their row notes; ``forward`` False: no forward of its own
    (in-memory prune; search counts its training instead). ``node_gpus``:
    the GPUs a spreading ``device_map`` uses; ``options``: the stage's knobs the advice names.

    Example (the old Mixtral recipe: fp32, no device_map): 186.8 GB of weights on one GPU.
        >>> p = load_plan("teacher_eval", ModelStats.of(model_config("mistralai/Mixtral-8x7B-v0.1")),
        ...               section="evaluate", dtype=None, node_gpus=8, seqs=2, T=4096, logits="heldout",
        ...               gpu_mem=80e9)
        >>> p.fits, p.advice()[0]
        (False, 'evaluate.dtype=bfloat16 (weights 186.8 -> 93.4 GB)')
    """
    dtype = dtype or "float32"
    b = DTYPE_BYTES[dtype]
    on_gpu = not (device_map == "cpu" or (not device_map and str(device) == "cpu"))
    G = max(1, node_gpus) if device_map in SPREAD_MAPS else 1
    notes = list(notes or [])
    row_notes: dict[str, str] = {}
    parts: dict[str, float] = {}
    attention = 0.0
    if on_gpu:
        parts["weights"] = s.params * b / G + (s.block_params * b if G > 1 else 0)
        if G > 1:
            row_notes["weights"] = f"{s.params * b / GB:.2f} GB over {G} GPUs, whole layers on each"
        eager = forward and uses_eager(attn_implementation, s)
        if forward:
            parts["activations"] = forward_bytes(s, seqs, T, b, eager=eager)
            row_notes["activations"] = f"a forward over {seqs} x {T} tokens"
        if eager:
            attention = eager_attention_bytes(s, seqs, T, b)[1]
            row_notes["activations"] += f"; eager attention scores {attention / GB:.2f} GB"
        if logits == "heldout":
            parts["logits"] = logits_bytes(s, seqs, T, b)
            row_notes["logits"] = f"[{seqs}, {T}, {s.vocab}] logits, their fp32 copy and log-softmax"
        elif logits == "per_sequence":
            parts["logits"] = per_sequence_logits_bytes(s, seqs, T, b)
            row_notes["logits"] = f"[{seqs}, {T}, {s.vocab}] logits; one sequence's fp32 copy and log-softmax"
        elif logits == "chunked":
            parts["logits"] = 4.0 * LOGIT_CHUNK
            row_notes["logits"] = "fp32 [rows, V] chunks of the top-k"
        parts.update(extra or {})
        row_notes.update(extra_notes or {})
        parts["cuda_context"] = CUDA_CONTEXT
        row_notes["cuda_context"] = "the pipeline process's CUDA context"
    else:
        notes.append(f"runs on the CPU: {s.params * b / GB:.1f} GB of weights in host memory")
    return StagePlan(title=title or stage, world=G if on_gpu else 1, dtype=DTYPE_SHORT[dtype], parts=parts,
                     activations_full=parts.get("activations", 0.0), activations_ckpt=parts.get("activations", 0.0),
                     checkpointing=False, gpu_mem=gpu_mem, notes=notes, stage=stage, attention=attention,
                     section=section, model=model, params=s.params, device_map=device_map, node_gpus=node_gpus,
                     on_gpu=on_gpu, batch=seqs, row_notes=row_notes, stage_options=dict(options or {}))


def stage_plans(r: Any, teacher: ModelStats, student: ModelStats, node_gpus: int, *,
                gpu_mem: float | None = None) -> list[tuple[StagePlan, Any]]:
    """The :class:`StagePlan` of every stage of pipeline recipe ``r`` that loads a whole model
    outside DeepSpeed, with the stage's config: ``teacher_eval`` (the teacher's held-out loss with
    the ``evaluate`` section's settings; the training stages' own held-out losses load the same
    or smaller models), ``teacher_logits`` (offline teacher), ``importance``, ``search`` (when
    enabled), ``prune`` (``streaming: false``: the teacher in memory; streaming loads no model, so
    the plan is the pruned student's held-out loss) and ``evaluate`` (lm-eval tasks on the teacher
    and the student, when ``evaluate.tasks``)."""
    from minitron_fast.pipeline.recipe import offline_teacher, teacher_logits_config

    ev, imp, se, pr = r.evaluate, r.importance, r.search, r.prune
    T = r.data.seq_len
    out: list[tuple[StagePlan, Any]] = []

    def add(stage: str, s: ModelStats, sec: Any, **kw: Any) -> None:
        kw.setdefault("dtype", sec.dtype)
        p = load_plan(stage, s, device=sec.device, device_map=getattr(sec, "device_map", None), node_gpus=node_gpus,
                      attn_implementation=sec.attn_implementation, gpu_mem=gpu_mem, title=f"{r.name}: {stage}", **kw)
        out.append((p, sec))

    add("teacher_eval", teacher, ev, section="evaluate", seqs=min(ev.batch_size, ev.eval_blocks), T=T,
        logits="heldout", notes=["teacher_eval loads with the evaluate section's device, dtype and device_map"])
    if offline_teacher(r) and not r.distill.stored_logits:   # stored logits: read, no model loaded
        tl = teacher_logits_config(r, check=False)
        add("teacher_logits", teacher, tl, section="teacher_logits", seqs=tl.batch_size, T=tl.seq_len,
            logits="chunked")
    Ti = imp.seq_len or T
    if imp.depth_lm_loss:   # every layer's input of one batch, recorded for the skipped runs (importance/depth.py)
        rec = float(teacher.layers * imp.batch_size * Ti * teacher.hidden * DTYPE_BYTES[imp.dtype or "float32"])
        add("importance", teacher, imp, section="importance", seqs=imp.batch_size, T=Ti, logits="per_sequence",
            extra={"layer_inputs": rec},
            extra_notes={"layer_inputs": f"{teacher.layers} layers' inputs of one batch, for the skipped-layer runs"})
    else:
        add("importance", teacher, imp, section="importance", seqs=imp.batch_size, T=Ti, logits="none")
    if se.enabled:
        b = DTYPE_BYTES[se.dtype or "float32"]
        from minitron_fast.artifacts.targets import parse_budget_spec

        Ps = min(teacher.params, parse_budget_spec(se.params).resolve(teacher.params)) if se.params else teacher.params
        states = Ps * b * 3 if not se.lora_rank else 0.0     # gradients + AdamW's two moments (the model dtype)
        n = se.micro_batch_size * T
        train_act = teacher.layers * n * activation_bytes_per_token_layer(teacher, b)   # no checkpointing
        if uses_eager(se.attn_implementation, teacher):
            kept, transient = eager_attention_bytes(teacher, se.micro_batch_size, T, b)
            train_act += teacher.layers * kept + transient
        extra = {"candidate": max(teacher.params * b, Ps * b + states),   # the deepcopy while pruned; then trained
                 "targets": float(se.retrain_steps * se.micro_batch_size * (T - 1) * teacher.hidden * b),
                 "training": train_act}
        extra_notes = {"candidate": "a teacher-sized copy while pruned; then the student" +
                                    ("" if se.lora_rank else ", its gradients and AdamW moments"),
                       "targets": f"the teacher's hidden states for {se.retrain_steps} retraining steps",
                       "training": f"backward over {se.micro_batch_size} x {T} tokens, every layer kept"}
        add("search", teacher, se, section="search", seqs=se.micro_batch_size, T=T, logits="none", extra=extra,
            extra_notes=extra_notes, forward=False, options={"lora_rank": se.lora_rank, "states": states},
            notes=[f"candidates up to {Ps / 1e9:.2f}B parameters, retrained on one GPU without activation "
                   "checkpointing (counted with the teacher's shape)"])
    if not pr.streaming and str(pr.device) != "cpu":
        dt = pr.dtype or (teacher.dtype if teacher.dtype in DTYPE_BYTES else None)
        add("prune", teacher, pr, section="prune", dtype=dt, seqs=1, T=2, logits="none", forward=False,
            extra={"workspace": float(teacher.largest_layer * DTYPE_BYTES[dt or "float32"])},
            options={"streaming": False},
            notes=["in-memory pruning (streaming: false) loads the teacher on one GPU (no device_map); the pruned "
                   "student's held-out loss afterwards is smaller"])
    else:
        add("prune", student, ev, section="evaluate", model="student", seqs=min(ev.batch_size, ev.eval_blocks), T=T,
            logits="heldout", options={"streaming": True},
            notes=["pruning streams the safetensors shards (no model on a GPU); this is the pruned student's "
                   "held-out loss, with the evaluate section's settings"])
    if ev.tasks:
        Tt = min(T, LM_EVAL_TOKENS)
        add("evaluate", teacher, ev, section="evaluate", seqs=ev.batch_size, T=Tt, logits="heldout",
            notes=[f"lm-eval tasks on the teacher, then the student; requests counted at up to {Tt} tokens"])
    return out


def plan_recipe(recipe: str | os.PathLike, overrides: list[str] = (), *, gpu_mem: str | float | None = None,
                world: int | None = None) -> list[tuple[Plan, Any]]:
    """Plans of every stage of a pipeline recipe that loads a model, in the order the pipeline
    runs them: the training sections (``correct_teacher``, ``distill``, ``scratch``: a
    :class:`Plan` per rank, with the student's shape from ``prune.target``, or the search budget)
    and the stages that load a whole model outside DeepSpeed (``teacher_eval``,
    ``teacher_logits``, ``importance``, ``search``, ``prune``, ``evaluate``: a :class:`StagePlan`,
    with ``device_map: auto`` spreading over the node's GPUs, ``launch.num_procs`` or ``world``);
    or the plan of one trainer recipe (a distill YAML). Returns ``[(plan, the stage's config)]``:
    a ``DistillConfig`` for the training plans (``plan.kind == "train"``), the recipe section for
    the others (``"load"``); ``plan.stage`` names the stage.

    Example:
        >>> [(p.stage, p.fits) for p, _ in plan_recipe("mixtral-8x7b-experts-8-to-6", gpu_mem="80GB")]
        [('teacher_eval', True), ('importance', True), ('prune', True), ('distill', True), ('evaluate', True)]
    """
    from minitron_fast.distill.config import ConfigError, config_from_dict, load_config
    from minitron_fast.pipeline.recipe import (RecipeError, load_recipe, offline_teacher, stage_enabled,
                                               training_config)

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
    from minitron_fast.artifacts.targets import TargetError, target_geometry
    from minitron_fast.models import view_class_for_config

    W = world or r.launch.num_procs
    hostfile = getattr(r.launch, "hostfile", None)
    multi_node = bool(hostfile and Path(hostfile).is_file())
    if world is None and multi_node:
        W = hostfile_slots(hostfile)   # ranks = the hosts' slots
    node_gpus = r.launch.num_procs if multi_node else W   # the pipeline's own stages run on one node
    tc = model_config(r.teacher)
    target = f"params={r.search.params}" if r.search.enabled else r.prune.target   # search: a student at the budget
    try:
        geo = target_geometry(tc, target, budget_axes=r.prune.budget_axes)
    except TargetError as exc:
        raise MemoryPlanError(f"prune.target={target}: {exc}") from None
    sc = view_class_for_config(tc).config_for(copy.deepcopy(tc), geo)
    t_stats, s_stats = ModelStats.of(tc), ModelStats.of(sc)
    plans: dict[str, tuple[Plan, Any]] = {}
    for section in ("correct_teacher", "distill", "scratch"):
        if not stage_enabled(r, section):
            continue
        d = training_config(r, section, teacher=str(r.teacher), student="student", out="plan")
        cfg = config_from_dict(d)
        title = f"{r.name}: {section}"
        if cfg.mode == "distill":   # an offline teacher (stored top-k logits) loads no teacher model
            p = plan(cfg, None if offline_teacher(r) else t_stats, s_stats, W, gpu_mem=mem, title=title)
        else:   # correct_teacher trains the teacher, scratch a student-shaped model
            p = plan(cfg, None, t_stats if section == "correct_teacher" else s_stats, W, gpu_mem=mem, title=title)
        p.stage = section
        p.parts["cuda_context"] += CUDA_CONTEXT   # the pipeline process's, beside rank 0 on cuda:0
        p.notes.append("cuda_context: this rank's and, on cuda:0, the pipeline process's")
        plans[section] = (p, cfg)
    for p, sec in stage_plans(r, t_stats, s_stats, node_gpus, gpu_mem=mem):
        plans[p.stage] = (p, sec)
    from minitron_fast.pipeline.table import STAGES

    return [plans[s] for s in STAGES if s in plans]   # the pipeline's order


__all__ = ["KNOWN_CONFIGS", "MemoryPlanError", "ModelStats", "Plan", "StagePlan", "activation_bytes_per_token_layer",
           "eager_attention_bytes", "forward_bytes", "hostfile_slots", "load_plan", "logits_bytes", "model_config",
           "parse_size", "per_sequence_logits_bytes", "plan", "plan_config", "plan_recipe", "stage_plans"]
