"""The one knowledge-distillation step, shared by distill's trainer, search's retraining, the HF
``Trainer`` integration and the benchmarks.

For one micro-batch ``input_ids [B, T]``:

1. the student's **decoder** (never its lm_head) gives its final hidden states ``[B, T, Hs]`` and,
   for the intermediate-state loss, the raw (pre-final-norm) outputs of chosen decoder layers;
2. the teacher's decoder does the same under ``no_grad``; or the teacher comes precomputed: its
   final hidden states with its lm_head (``TeacherHidden``, e.g. cached once for many students),
   or its top-k logits (``TopKTeacher``, an offline teacher: no teacher model at all);
3. positions ``0..T-2`` pair with labels ``1..T-1``, and the fused loss runs **once** through
   both lm_heads (gathered under DeepSpeed ZeRO-3: the student's by running the loss as its
   lm_head's forward, ``zero3.call_through``; the frozen teacher's read-only, ``zero3.gathered``),
   returning its KD and CE parts from that one pass;
4. each intermediate pair ``(s, t)`` adds ``MSE(proj(student layer s), teacher layer t)``.

Every loss is ``sum over valid tokens / num_items`` (``num_items``: the valid-token count of the
whole optimizer step, for gradient accumulation; default: this micro-batch's), so summing the
micro-batch losses of a step gives the per-token mean over the step.

What the step computes is a ``KDSpec`` (``ops.kd_spec``, torch-free): the weights, ``materialized``
(plain torch logits instead of the fused loss) and ``loss``, the fused loss's ``KDLossOptions``.

Example:
    >>> spec = KDSpec(kd_weight=1.0, lm_weight=0.5, loss=KDLossOptions(temperature=2.0))
    >>> out = kd_step(student, teacher, input_ids, spec=spec)     # doctest: +SKIP
    >>> out["loss"].backward(); float(out["kd"]), float(out["lm"])  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minitron_fast.ops.kd_loss.params import KDLossOptions
from minitron_fast.ops.kd_spec import IGNORE_INDEX, KDSetupError, KDSpec  # noqa: F401  (re-exported)
from minitron_fast.ops.zero3 import call_through, gathered


@dataclass
class TeacherHidden:
    """A teacher given as its final hidden states and lm_head (computed earlier, e.g. once for
    many students). ``hidden``: ``[B, T, Ht]`` (every position; the last is dropped), ``[B, T-1, Ht]``
    or rows ``[N, Ht]`` already aligned with the step's ``N = B * (T - 1)`` next-token rows;
    ``weight``: ``[V, Ht]``; ``bias``: ``[V]`` or None. Under ZeRO-3 ``weight`` may be a
    partitioned parameter: it is gathered read-only for the loss."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


@dataclass
class TopKTeacher:
    """An offline teacher: its top-k logits per token. ``values``/``indices``: ``[N, k]`` rows
    aligned with the step's ``N = B * (T - 1)`` next-token rows (or ``[B, T, k]`` / ``[B, T-1, k]``);
    ``tail_lse``: optional ``[N]`` log-sum-exp of the teacher's raw logits outside its top k (one
    extra tail bucket, see ``fused_linear_kd_loss``'s ``teacher_topk_tail_lse``; None: the top-k
    distribution is renormalized)."""

    values: Tensor
    indices: Tensor
    tail_lse: Tensor | None = None


Teacher = Union[nn.Module, TeacherHidden, TopKTeacher, None]


# -- models: decoder and head ---------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The HF causal LM inside DDP / DeepSpeed engines (``.module``) and peft wrappers."""
    while True:
        if callable(getattr(model, "get_base_model", None)):  # peft
            inner = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP / DeepSpeed engine
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The base decoder (returning final, normalized hidden states) and the lm_head of an HF causal LM."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise KDSetupError(f"{type(model).__name__} has no output embedding (lm_head) to fuse into the loss")
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        base = model.get_decoder()
    return base, head


# -- a causal forward without transformers' mask code ----------------------------------------------
#
# For a batch of full blocks (no attention_mask, no cache), transformers' mask code ends in no mask
# at all (SDPA's ``is_causal``; flash-attention's causal kernel), but it reads the device to decide
# so: ``find_packed_sequence_indices`` (``(...).all()`` on the position ids) and, with an all-ones
# mask, ``_ignore_causal_mask_sdpa``. One host sync per decoder forward: the student's, and the live
# teacher's. Running the forward under an alias of the same attention function that has no mask
# function registered (transformers' ``AttentionInterface.register``) makes ``create_causal_mask``
# return None without reading anything: the same SDPA kernel with the same ``is_causal``. Only for
# full-attention models (a sliding window needs its mask) on ``sdpa``: eager needs an explicit mask,
# and flash-attention's helpers look at the implementation's name (untested here: no GPU).

_CAUSAL_ALIAS = "minitron_causal_"
_ALIASABLE = ("sdpa",)


def _full_attention_only(config: Any) -> bool:
    from minitron_fast.errors import UnsupportedModelError
    from minitron_fast.models import view_class_for_config

    try:
        return view_class_for_config(config).full_attention_only(config)
    except UnsupportedModelError:  # a family we do not know: keep transformers' mask
        return False


def _causal_alias(config: Any) -> str | None:
    """The registered mask-free alias of ``config``'s attention implementation, or None where
    the model needs transformers' mask."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _ALIASABLE or not _full_attention_only(config):
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = _CAUSAL_ALIAS + impl
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, AttentionInterface._global_mapping[impl])
    if name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:  # someone registered a mask for it
        return None
    return name


class _MaskFree:
    """Runs a forward with ``config``'s attention implementation swapped for its mask-free alias."""

    def __init__(self, config: Any):
        self.config, self.alias = config, _causal_alias(config)

    def __enter__(self):
        if self.alias is not None:
            self.saved = self.config._attn_implementation_internal
            self.config._attn_implementation_internal = self.alias
        return self

    def __exit__(self, *exc):
        if self.alias is not None:
            self.config._attn_implementation_internal = self.saved
        return False


def decoder_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                   layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
    """Runs the decoder of ``model`` (no lm_head): returns the final hidden states ``[B, T, H]``
    (after the final norm) and the **raw** outputs ``[B, T, H]`` of decoder ``layers`` (0-based,
    before any final norm, the last layer included: transformers 5's last ``hidden_states`` entry
    is the final-norm output instead, which would compare unlike with like).

    Without ``attention_mask`` (full blocks), a full-attention model on SDPA runs with no mask
    and no host read in transformers' mask code (see ``_MaskFree``)."""
    base, _ = decoder_and_head(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        return _decoder_states(model, base, kwargs, layers)
    with _MaskFree(base.config):
        return _decoder_states(model, base, kwargs, layers)


def _decoder_states(model: nn.Module, base: nn.Module, kwargs: dict[str, Any],
                    layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    if not layers:
        return base(**kwargs).last_hidden_state, []
    from minitron_fast.models import get_view

    blocks = get_view(unwrap(model)).decoder_layers
    grabbed: dict[int, Tensor] = {}

    def grab(i):
        def hook(_module, _args, output):
            grabbed[i] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[i].register_forward_hook(grab(i)) for i in sorted(set(layers))]
    try:
        final = base(**kwargs).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    return final, [grabbed[i] for i in layers]


@torch.no_grad()
def teacher_hidden(teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> TeacherHidden:
    """The teacher's final hidden states for ``input_ids``, as next-token rows ``[B*(T-1), Ht]``,
    with its lm_head: a ``TeacherHidden`` to reuse across students (search, benchmarks)."""
    h, _ = decoder_states(teacher, input_ids, attention_mask)
    _, head = decoder_and_head(teacher)
    return TeacherHidden(h[:, :-1].reshape(-1, h.shape[-1]).contiguous(), head.weight.detach(),
                         None if getattr(head, "bias", None) is None else head.bias.detach())


def _softcap_of(model: nn.Module) -> float | None:
    """The final-logit softcap of a supported family (its ``ModelView``); None for a model the
    package has no adapter for (the HF integration takes any causal LM: pass the loss's
    ``softcap`` yourself there)."""
    from minitron_fast.errors import UnsupportedModelError
    from minitron_fast.models import get_view

    try:
        c = get_view(unwrap(model)).final_logit_softcap
    except UnsupportedModelError:
        return None
    return float(c) if c else None


def head_options(student: nn.Module, teacher: nn.Module | None = None, n_tokens: int | None = None) -> dict[str, Any]:
    """``{"softcap", "vocab_size"}`` (``kd_spec.MODEL_FACTS``) for ``KDSpec.loss`` from the models'
    configs: the final-logit softcap both apply (Gemma 2/3; differing caps are refused: the fused
    loss applies one to both), and,
    when the lm_heads differ only by padding rows (151,936 vs 152,064 for Qwen), the shared
    vocabulary (the smaller head; refused when the tokenizer's ``n_tokens`` exceed it)."""
    softcap = _softcap_of(student)
    if teacher is None:
        return {"softcap": softcap, "vocab_size": None}
    t_cap = _softcap_of(teacher)
    if t_cap != softcap:
        raise KDSetupError(f"the teacher's final-logit softcap is {t_cap} but the student's {softcap}: the fused loss "
                           "applies one cap to both; give the student's config.json the teacher's final-logit softcap")
    vt, vs = unwrap(teacher).config.vocab_size, unwrap(student).config.vocab_size
    if vt == vs:
        return {"softcap": softcap, "vocab_size": None}
    shared = min(vt, vs)
    if n_tokens is not None and n_tokens > shared:
        raise KDSetupError(f"the tokenizer has {n_tokens} tokens but the {'student' if vs < vt else 'teacher'} "
                           f"vocabulary only {shared} rows (teacher {vt}, student {vs}): the two lm_heads may differ "
                           "only by padding rows beyond the tokenizer")
    return {"softcap": softcap, "vocab_size": shared}


# -- rows ---------------------------------------------------------------------------------------------

def _rows(t: Tensor, B: int, T: int, name: str, row_dims: int) -> Tensor:
    """``t`` as next-token rows ``[N, ...]`` (``N = B * (T - 1)``; a row has ``row_dims - 1`` dims):
    given as rows already, or per position ``[B, T, ...]`` (the last position, which predicts no
    token of the block, dropped) or ``[B, T - 1, ...]``."""
    N = B * (T - 1)
    if t.dim() == row_dims + 1 and t.shape[0] == B and t.shape[1] in (T, T - 1):
        return t[:, : T - 1].reshape(N, *t.shape[2:])
    if t.dim() == row_dims and t.shape[0] == N:
        return t
    raise KDSetupError(f"{name} has shape {tuple(t.shape)}; expected per-position [{B}, {T}, ...] or "
                     f"[{B}, {T - 1}, ...], or [{N}, ...] next-token rows, for input_ids [{B}, {T}]")


# -- losses on rows -------------------------------------------------------------------------------------

def _softcap(z: Tensor, c: float | None) -> Tensor:
    return z if c is None else c * torch.tanh(z / c)


def _materialized_logits(h: Tensor, w: Tensor, b: Tensor | None, opts: KDLossOptions) -> Tensor:
    """fp32 logits (fp64 for fp64 inputs), softcapped and cut to the shared vocabulary."""
    dt = torch.float64 if h.dtype == torch.float64 else torch.float32
    z = F.linear(h.to(dt), w.to(dt), None if b is None else b.to(dt))
    z = _softcap(z, opts.softcap)
    return z if opts.vocab_size is None else z[:, : opts.vocab_size]


def divergence_rows(s_logits: Tensor, t_logits: Tensor, *, divergence: str, beta: float,
                    temperature: float) -> Tensor:
    """``[N]`` divergence between teacher and student distributions from full ``[N, V]`` logits in
    plain torch (autograd through the log-softmaxes): the registry's definitional formula
    (``ops.kd_loss.divergences``), in the logits' dtype."""
    from minitron_fast.ops.kd_loss.divergences import canonical, get

    ls = torch.log_softmax(s_logits / temperature, dim=-1)
    lt = torch.log_softmax(t_logits / temperature, dim=-1)
    return get(canonical(divergence, float(beta))).reference(ls, lt, float(beta))


def _materialized(hs, w, b, teacher, labels, spec: KDSpec,
                  num_items: float | Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    valid = labels != IGNORE_INDEX
    divisor = num_items if num_items is not None else valid.sum().clamp(min=1)  # a device tensor: no host read
    opts = spec.loss
    if spec.kd_weight == 0:  # the LM loss alone: the student's own head, padding rows included (as fused)
        opts = opts.replace(vocab_size=None)
    z = _materialized_logits(hs, w, b, opts)
    parts: dict[str, Tensor] = {}
    total = z.new_zeros(())
    if spec.kd_weight > 0:
        th, tw, tb = teacher
        with torch.no_grad():
            zt = _materialized_logits(th, tw, tb, opts)
        per = divergence_rows(z, zt, divergence=opts.divergence, beta=opts.beta, temperature=opts.temperature)
        if opts.t2_scaling:
            per = per * opts.temperature ** 2
        parts["kd"] = (per * valid).sum() / divisor
        total = total + spec.kd_weight * parts["kd"]
    if spec.lm_weight > 0:  # (a plain-torch step computes CE only when it trains on it)
        parts["lm"] = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="sum") / divisor
        total = total + spec.lm_weight * parts["lm"]
    return total, {k: v.detach() for k, v in parts.items()}


def _fused(hs, w, b, teacher, labels, spec: KDSpec,
           num_items: float | Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    from minitron_fast.ops.kd_loss import fused_linear_cross_entropy, fused_linear_kd_loss

    opts = spec.loss
    if spec.kd_weight == 0:  # the LM loss alone: the student's own head, padding rows included
        lm = fused_linear_cross_entropy(hs, w, labels, bias=b, num_items=num_items, chunk_size=opts.chunk_size,
                                        impl=opts.impl, ignore_index=IGNORE_INDEX, softcap=opts.softcap)
        return spec.lm_weight * lm, {"lm": lm.detach()}
    if isinstance(teacher, TopKTeacher):
        t_kw: dict[str, Any] = {"teacher_topk": (teacher.values, teacher.indices)}
        if teacher.tail_lse is not None:
            t_kw["teacher_topk_tail_lse"] = teacher.tail_lse
    else:
        th, tw, tb = teacher
        t_kw = {"teacher_hidden": th, "teacher_weight": tw, "teacher_bias": tb}
    # one pass; its loss is kd + (lm_weight / kd_weight) * ce, scaled by kd_weight here. The CE part
    # comes from the same pass whatever its weight (the student's log-sum-exp is computed anyway).
    # The spec's options as given, with the fields the step sets (STEP_SETS) set here
    opts = opts.replace(hard_label_weight=spec.lm_weight / spec.kd_weight, ignore_index=IGNORE_INDEX,
                        reduction="mean")
    out = fused_linear_kd_loss(hs, w, student_bias=b, labels=labels, num_items=num_items, return_parts=True,
                               options=opts, **t_kw)
    return spec.kd_weight * out.loss, {"kd": out.kd, "lm": out.ce}


def head_loss(student_hidden: Tensor, student_head: nn.Module, teacher: TeacherHidden | TopKTeacher | None,
              labels: Tensor, *, spec: KDSpec, num_items: float | Tensor | None = None) -> dict[str, Tensor]:
    """The logit part of the step on next-token rows: ``student_hidden [N, Hs]`` through
    ``student_head`` (an ``nn.Linear``-like module, ``[V, Hs]``) against ``teacher`` (rows already
    aligned; None when ``spec.kd_weight == 0``), ``labels [N]``. One fused call (or, with
    ``spec.materialized``, one set of full logits). Under ZeRO-3 the student head is gathered by
    running this as its forward (and re-gathered for backward), the teacher head read-only.

    ``num_items``: the divisor; None: this call's valid-token count. Passed to the fused op as
    given (None: its own count, read with its other host numbers; a tensor stays where it is), so
    the step reads the device no more than the op does.

    Returns ``{"loss": weighted sum (with gradient), "kd", "lm": detached parts}``.
    """
    if spec.kd_weight > 0 and teacher is None:
        raise KDSetupError("kd_weight > 0 needs a teacher (a model, TeacherHidden or TopKTeacher)")
    if isinstance(teacher, TopKTeacher) and spec.materialized:
        raise KDSetupError("a top-k teacher runs through the fused loss: materialized=True (the plain-torch baseline) "
                           "takes a teacher model")
    t_params = (teacher.weight, teacher.bias) if isinstance(teacher, TeacherHidden) else ()

    def run(h: Tensor) -> dict[str, Tensor]:
        w, b = student_head.weight, getattr(student_head, "bias", None)
        t = teacher
        if isinstance(teacher, TeacherHidden):
            t = (teacher.hidden, teacher.weight, teacher.bias)
        with gathered(*t_params):
            fn = _materialized if spec.materialized else _fused
            # (autocast: bf16 hidden states with fp32 weights are the op's to reconcile; materialized: fp32)
            total, parts = fn(h, w, b, t if spec.kd_weight > 0 else None, labels, spec, num_items)
        return {"loss": total, **parts}

    return call_through(student_head, run, student_hidden)


def intermediate_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], valid: Tensor,
                      divisor: float | Tensor, proj: nn.Module | None = None) -> Tensor:
    """Mean over pairs of ``sum over valid rows of mean_c (proj(s) - t)^2 / divisor``; states are
    ``[N, H]`` rows (student width before ``proj``, teacher width after)."""
    total = None
    for s, t in zip(student_states, teacher_states):
        if proj is not None:
            s = proj(s)
        d = (s.float() - t.float()).pow(2).mean(-1)
        term = (d * valid).sum() / divisor
        total = term if total is None else total + term
    return total / len(student_states)


# -- the step -----------------------------------------------------------------------------------------

def kd_step(student: nn.Module, teacher: Teacher, input_ids: Tensor, attention_mask: Tensor | None = None,
            labels: Tensor | None = None, *, spec: KDSpec = KDSpec(), num_items: float | Tensor | None = None,
            pairs: Sequence[tuple[int, int]] = (), proj: nn.Module | None = None) -> dict[str, Tensor]:
    """One distillation step's losses for one micro-batch (see the module docstring).

    Args:
        student: an HF causal LM (also inside DDP / DeepSpeed / peft wrappers).
        teacher: an HF causal LM (run under ``no_grad``), a ``TeacherHidden``, a ``TopKTeacher``,
            or None (LM loss only: ``spec.kd_weight == 0`` and no pairs).
        input_ids: ``[B, T]``; attention_mask: ``[B, T]`` or None.
        labels: ``[B, T]`` (unshifted, HF convention; -100 ignored). Default: ``input_ids`` with
            padding (``attention_mask == 0``) ignored.
        spec: the loss terms and options (``KDSpec``).
        num_items: the divisor (the valid-token count of the whole optimizer step); default: this
            micro-batch's valid tokens.
        pairs: ``(student_layer, teacher_layer)`` pairs of the intermediate-state loss (0-based
            decoder layers; raw layer outputs on both sides); needs a teacher model.
        proj: the learned student->teacher width map applied to the student's states (or None).

    Returns:
        ``{"loss": the weighted total (backward this), "kd", "lm", "inter": detached parts (those
        computed), "tokens": valid tokens of this micro-batch}``.
    """
    B, T = input_ids.shape
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    rows_labels = labels[:, 1:].reshape(-1)
    pairs = [(int(s), int(t)) for s, t in pairs]
    if pairs and not isinstance(teacher, nn.Module):
        raise KDSetupError("the intermediate-state loss (pairs) needs a teacher model, not precomputed logits")
    hs, s_inter = decoder_states(student, input_ids, attention_mask, [s for s, _ in pairs])
    t_rows: TeacherHidden | TopKTeacher | None = None
    t_inter: list[Tensor] = []
    if isinstance(teacher, nn.Module):
        if spec.kd_weight > 0 or pairs:
            with torch.no_grad():
                th, t_inter = decoder_states(teacher, input_ids, attention_mask, [t for _, t in pairs])
            if spec.kd_weight > 0:
                _, t_head = decoder_and_head(teacher)
                t_rows = TeacherHidden(th[:, :-1].reshape(-1, th.shape[-1]), t_head.weight,
                                       getattr(t_head, "bias", None))
    elif isinstance(teacher, TeacherHidden):
        t_rows = TeacherHidden(_rows(teacher.hidden, B, T, "TeacherHidden.hidden", 2), teacher.weight, teacher.bias)
    elif isinstance(teacher, TopKTeacher):
        tail = None if teacher.tail_lse is None else _rows(teacher.tail_lse, B, T, "TopKTeacher.tail_lse", 1)
        t_rows = TopKTeacher(_rows(teacher.values, B, T, "TopKTeacher.values", 2),
                             _rows(teacher.indices, B, T, "TopKTeacher.indices", 2), tail)
    elif teacher is not None:
        raise KDSetupError(f"teacher must be a model, TeacherHidden, TopKTeacher or None, got {type(teacher).__name__}")
    _, s_head = decoder_and_head(student)
    out = head_loss(hs[:, :-1].reshape(-1, hs.shape[-1]), s_head, t_rows, rows_labels, spec=spec,
                    num_items=num_items)
    valid = rows_labels != IGNORE_INDEX
    out["tokens"] = valid.sum()
    if pairs:
        divisor = num_items if num_items is not None else out["tokens"].clamp(min=1)  # no host read
        inter = intermediate_loss([h[:, :-1].reshape(-1, h.shape[-1]) for h in s_inter],
                                  [h[:, :-1].reshape(-1, h.shape[-1]) for h in t_inter], valid, divisor, proj)
        out["inter"] = inter.detach()
        out["loss"] = out["loss"] + spec.inter_weight * inter
    return out


class KDStudent(nn.Module):
    """The student (and the intermediate-state projection) as one module whose forward **is** the
    KD step, for engines that own the forward (DeepSpeed: under ZeRO-3 the lm_head and ``proj``
    are gathered inside it and re-gathered for backward, like any submodule).

    ``forward(input_ids, teacher=None, **kwargs)`` returns ``kd_step(self.model, teacher,
    input_ids, proj=self.proj, **kwargs)``.
    """

    def __init__(self, model: nn.Module, proj: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.proj = proj

    def forward(self, input_ids: Tensor, teacher: Teacher = None, **kwargs) -> dict[str, Tensor]:
        return kd_step(self.model, teacher, input_ids, proj=self.proj, **kwargs)


__all__ = ["KDSetupError", "head_options", "KDLossOptions", "KDSpec", "KDStudent", "TeacherHidden", "TopKTeacher",
           "IGNORE_INDEX", "kd_step", "head_loss", "decoder_states", "decoder_and_head", "teacher_hidden",
           "intermediate_loss", "divergence_rows", "unwrap"]
