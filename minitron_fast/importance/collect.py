"""One-pass collection of activation importance for every axis, through an explicit, reversible
patch of the adapter's modules.

What is read (independent of the attention implementation, eager/SDPA/flash-attn):

- heads: the input of ``o_proj`` ``[B, T, n_heads*head_dim]`` (the concatenated per-head
  attention outputs), per-token L2 norm per head;
- neurons: the input of ``down_proj`` (``act(gate) * up``), ``|x|``;
- channels: the outputs of each layer's ``[hidden]`` norms (``LayerView.hidden_norms``: two for
  Llama, four for Gemma), ``|y|``;
- block importance: each decoder layer's input and output, cosine per token.

On CUDA (``impl="triton"``) the gated-MLP (SiLU or GELU-tanh gate, fused or separate gate/up
projections) and RMSNorm (``w`` or Gemma's ``1 + w``) forwards are replaced by fused kernels that
produce their normal output and the statistics in the same pass (each chosen by the module's
behaviour on a probe, not its class; anything else keeps its own forward and a hook), and the head and cosine
statistics are Triton reductions; on the CPU (``impl="torch"``) forward hooks compute the same
sums with one cheap reduction over each tensor. Per batch only ``[B, units]`` fp32 sums are kept
(no activations); they are folded into per-unit fp64 accumulators after each batch.

Devices (a model spread by accelerate, ``device_map="auto"`` / ``dispatch_model`` / ``cpu_offload``):
every statistic lives on the device of the activation it sums (a layer's sums on that layer's
device, made at first use in each batch; the attention mask is copied once per device and batch),
and per-layer fp64 accumulators stay there until :meth:`ImportanceCollector.scores`. accelerate
hooks a module by replacing its ``forward`` with a wrapper that moves the inputs (and loads
offloaded weights) around ``module._old_forward``; on such a module the collector patches and
observes ``_old_forward``, so the hook keeps working, the statistics see the inputs after the hook
moved them and the weights it loaded, and ``detach()`` puts back exactly what was there.

Aggregation (``seq_agg`` over the valid tokens of a sample, then ``batch_agg`` over samples),
each one of ``mean`` (sum / n), ``l2`` (sqrt of the sum of squares) or ``var`` (population
variance, ddof 0). The default, mean then L2, is the papers' best.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from minitron_fast.errors import MinitronError
from minitron_fast.io import MMAP_THRESHOLD, cap_heap_retention
from minitron_fast.artifacts.scores import ImportanceScores
from minitron_fast.models import ModelView, get_view
from minitron_fast.ops import importance as ops
from minitron_fast.ops._dispatch import resolve_impl

AGGS = ("mean", "l2", "var")
# "input": norm of each head's output before o_proj (the papers'); "output": norm of its
# contribution after o_proj, ||W_o[:, head] x_head|| (better on SmolLM2-135M, docs/importance.md)
HEAD_SCORES = ("input", "output")


class NonFiniteActivationError(MinitronError, FloatingPointError):
    """NaN or inf in the activations of a layer (reported with the layer and the axis)."""


def _check_agg(name: str, agg: str) -> None:
    if agg not in AGGS:
        raise MinitronError(f"{name} must be one of {AGGS}, got {agg!r}")


def aggregate(s1: torch.Tensor | None, s2: torch.Tensor | None, n: torch.Tensor | int, agg: str) -> torch.Tensor:
    """Aggregated values from streamed sums ``s1 = sum x`` and ``s2 = sum x**2`` over ``n`` items:
    ``mean`` = s1 / n, ``l2`` = sqrt(s2), ``var`` = s2 / n - mean**2. Used twice: over a sample's
    valid tokens (``[B, U]`` sums, ``n [B, 1]``), then over samples of those per-sample values."""
    if agg == "mean":
        return s1 / n
    if agg == "l2":
        return s2.sqrt()
    mean = s1 / n
    return (s2 / n - mean * mean).clamp_min(0)


# the two stages of the papers' aggregation (over the sequence, then over the batch): one formula
seq_aggregate = batch_aggregate = aggregate


# -- devices and accelerate's hooks -----------------------------------------------------------------

def _hf_hooks(module: nn.Module) -> list[Any]:
    """accelerate's hooks on ``module`` (``add_hook_to_module``: ``module._hf_hook``, a
    ``SequentialHook`` when several were chained), innermost last; [] when none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def accelerate_hooked(module: nn.Module) -> bool:
    """Whether accelerate wraps ``module``: its instance ``forward`` is the hook's wrapper, which
    moves the inputs to the execution device (loading offloaded weights) and then calls
    ``module._old_forward``, the module's own computation."""
    d = vars(module)
    return "_hf_hook" in d and "_old_forward" in d and "forward" in d


def module_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: the execution device of accelerate's hook when one
    places it (between forwards its weights may sit on ``meta`` or the CPU, offloaded), else the
    device of its first parameter or buffer, else the CPU."""
    for hook in reversed(_hf_hooks(module)):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev)
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _forward_slot(module: nn.Module) -> str:
    """The attribute holding ``module``'s computation: ``_old_forward`` under accelerate's hook
    (replacing ``forward`` there would bypass the hook, and deleting it would drop the hook)."""
    return "_old_forward" if accelerate_hooked(module) else "forward"


def _swap_forward(module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], None]:
    """Replaces ``module``'s computation by ``make(inner)`` (``inner``: the computation it
    replaces, bound) in the slot of :func:`_forward_slot`; returns the function that puts back
    exactly what was there (an instance attribute, or none: the class's ``forward`` again)."""
    slot = _forward_slot(module)
    d = vars(module)
    had, prev = slot in d, d.get(slot)
    setattr(module, slot, make(getattr(module, slot)))

    def restore() -> None:
        if had:
            setattr(module, slot, prev)
        else:
            d.pop(slot, None)
    return restore


class _Stat:
    """Streaming statistics of one unit axis of one module.

    A batch's ``[B, U]`` fp32 sums are made at first use on the device of the activation they
    add (:meth:`buffers`: a layer's on that layer's device); the fp64 accumulators ``S1, S2`` stay
    on that device too, and only :meth:`result` brings them to the CPU."""

    def __init__(self, n_units: int, seq_agg: str, batch_agg: str, label: str):
        self.n_units, self.seq_agg, self.batch_agg, self.label = n_units, seq_agg, batch_agg, label
        self.need_s1 = seq_agg in ("mean", "var")
        self.need_s2 = seq_agg in ("l2", "var")
        self.B = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.S1: torch.Tensor | None = None
        self.S2: torch.Tensor | None = None
        self.N = 0

    def begin(self, B: int, device: torch.device | str | None = None) -> None:
        """Starts a batch of ``B`` samples: sums made on ``device`` now, or (None) on first use."""
        self.B = B
        self.s1 = self.s2 = None
        if device is not None:
            self.buffers(torch.device(device))

    @property
    def device(self) -> torch.device | None:
        """Where this statistic's sums live (None before any was made)."""
        for t in (self.s1, self.s2, self.S1, self.S2):
            if t is not None:
                return t.device
        return None

    def buffers(self, where: torch.Tensor | torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This batch's ``(s1, s2)`` on the device of ``where`` (the activation they add, or a
        device): made there at first use, moved there (exactly) if an earlier call of the batch made
        them elsewhere."""
        dev = where.device if isinstance(where, torch.Tensor) else where
        if self.s1 is None and self.s2 is None:
            self.s1 = torch.zeros(self.B, self.n_units, device=dev) if self.need_s1 else None
            self.s2 = torch.zeros(self.B, self.n_units, device=dev) if self.need_s2 else None
        elif self.device != dev:
            self.s1 = None if self.s1 is None else self.s1.to(dev)
            self.s2 = None if self.s2 is None else self.s2.to(dev)
        return self.s1, self.s2

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.s1, self.s2) if t is not None)

    def end(self, on: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]], kept: int) -> None:
        """Folds this batch in; ``on(device)`` gives ``n [B, 1]`` (valid tokens per sample) and
        ``keep [B, 1]`` (samples with any: ``kept`` of them) on that device. A sample without
        tokens adds nothing (selected out with ``where``: no host sync, and no 0/0 NaN gets
        through). A module that did not run this batch counts as zeros."""
        if self.s1 is None and self.s2 is None:
            self.buffers(self.device or torch.device("cpu"))
        n, keep = on(self.device)
        s1 = None if self.s1 is None else self.s1.double()
        s2 = None if self.s2 is None else self.s2.double()
        v = torch.where(keep, seq_aggregate(s1, s2, n, self.seq_agg), 0)  # [B, U]
        if self.batch_agg in ("mean", "var"):
            self.S1 = v.sum(0) if self.S1 is None else self.S1 + v.sum(0).to(self.S1.device)
        if self.batch_agg in ("l2", "var"):
            self.S2 = (v * v).sum(0) if self.S2 is None else self.S2 + (v * v).sum(0).to(self.S2.device)
        self.N += kept
        self.s1 = self.s2 = None

    def result(self) -> torch.Tensor:
        if self.N == 0:
            raise MinitronError("no calibration tokens were seen (every position was padding)")
        return batch_aggregate(self.S1, self.S2, self.N, self.batch_agg).float().cpu()


def _moved(t: torch.Tensor | None, dev: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` on ``dev`` (an fp64 accumulator, moved exactly), or zeros of ``shape`` there."""
    return torch.zeros(shape, dtype=torch.float64, device=dev) if t is None else t.to(dev)


class _MoEStat:
    """Expert statistics of one MoE layer, summed over valid tokens in fp64:

    - ``reap [E]``: sum over the tokens routed to each expert of router weight x ||expert
      output|| (REAP, arXiv 2510.13999), and ``routed [E]`` their count;
    - ``neurons [E, F]``: the same tokens' router weight x ``|act(gate) * up|`` per neuron;
    - ``mass [E]``: the router's softmax probability of each expert, summed over all tokens.

    The experts' sums live on the experts' device and the router's on the router's (each made at
    first use, on the device of the tensors it sums: no host sync per expert, and nothing combined
    across devices); only the results are brought to the CPU.
    """

    def __init__(self, moe, label: str):
        self.E, self.F = moe.num_experts, moe.ffn
        self.label = label
        self.reap: torch.Tensor | None = None
        self.routed: torch.Tensor | None = None
        self.neur: torch.Tensor | None = None
        self.mass_sum: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    def _experts_on(self, dev: torch.device) -> None:
        E, F = self.E, self.F
        self.reap, self.routed = _moved(self.reap, dev, (E,)), _moved(self.routed, dev, (E,))
        self.neur = _moved(self.neur, dev, (E, F))

    def _router_on(self, dev: torch.device) -> None:
        self.mass_sum, self.tokens = _moved(self.mass_sum, dev, (self.E,)), _moved(self.tokens, dev, ())

    def forward(self, moe, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                valid: torch.Tensor | None) -> torch.Tensor:
        """The experts' output for ``x [N, H]`` routed by ``top_k_index / top_k_weights [N, k]``
        (the eager loop of transformers' experts), recording the statistics. Everything is
        combined on ``x``'s device (``valid [N]`` must be there; the routing is moved there)."""
        dev = x.device
        top_k_index, top_k_weights = top_k_index.to(dev), top_k_weights.to(dev)
        self._experts_on(dev)
        out = torch.zeros_like(x)
        for e in torch.unique(top_k_index).tolist():
            tok, pos = torch.where(top_k_index == e)
            h, y = moe.expert_mlp(x[tok], e)  # [n, F], [n, H]
            w = top_k_weights[tok, pos]  # [n]
            out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))
            wv = w.double() if valid is None else w.double() * valid[tok]
            self.reap[e] += (wv * y.double().norm(dim=-1)).sum()
            self.routed[e] += tok.numel() if valid is None else valid[tok].double().sum()
            self.neur[e] += (wv[:, None] * h.double().abs()).sum(0)
        return out

    def add_router(self, logits: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Adds the router's probabilities from ``logits [N, E]`` (``valid [N]`` on their device)."""
        self._router_on(logits.device)
        p = torch.softmax(logits.float(), dim=-1).double()  # [N, E]
        if valid is not None:
            p = p * valid[:, None]
        self.mass_sum += p.sum(0)
        self.tokens += p.shape[0] if valid is None else valid.double().sum()

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.reap, self.neur, self.mass_sum) if t is not None)

    def experts(self) -> torch.Tensor:
        if self.reap is None:
            return torch.zeros(self.E)
        return (self.reap / self.routed.clamp_min(1)).float().cpu()

    def neurons(self) -> torch.Tensor:
        if self.neur is None:
            return torch.zeros(self.E, self.F)
        return (self.neur / self.routed.clamp_min(1)[:, None]).float().cpu()

    def mass(self) -> torch.Tensor:
        if self.mass_sum is None:
            return torch.zeros(self.E)
        return (self.mass_sum / self.tokens.clamp_min(1)).float().cpu()


def _fusable_norm(view: ModelView, norm: nn.Module) -> tuple[torch.Tensor, float, float] | None:
    """``(weight, eps, offset)`` when ``norm`` behaves as the RMSNorm the fused kernel computes:
    the adapter's claim (``rmsnorm_of``) checked on a probe, so a family whose norm differs keeps
    its own forward (and the hook path) instead of silently computing something else.

    The probe runs through the module's own call (accelerate's hook included: it moves the probe
    to the execution device and loads offloaded weights), and the reference reads the weight
    inside it, where the forward reads it."""
    rms = view.rmsnorm_of(norm)
    if rms is None:
        return None
    dev = module_device(norm)
    if dev.type == "meta":  # no data to compute on
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 3, rms[0].shape[0], generator=g).to(device=dev, dtype=rms[0].dtype)
    same: list[bool] = []

    def probe(inner):
        def forward(h, *args, **kwargs):
            y = inner(h, *args, **kwargs)
            now = view.rmsnorm_of(norm)
            same.append(now is not None and torch.equal(y, ops.rmsnorm_reference(h, *now)))
            return y
        return forward

    restore = _swap_forward(norm, probe)
    try:
        with torch.no_grad():
            norm(x)
    finally:
        restore()
    return rms if same == [True] else None


def _gate_act(lv) -> str | None:
    """The fused kernel's name for the layer's gate activation (SiLU, GELU-tanh), judged by
    behaviour; None keeps the MLP's own forward."""
    return ops.gate_activation_kind(lv.act_fn) if lv.act_fn is not None and lv.down_proj is not None else None


class ImportanceCollector:
    """Collects every importance axis in one forward pass per batch.

    Patching is explicit and reversible: ``attach()`` installs hooks (and on CUDA, fused
    forwards) on the adapter's modules, ``detach()`` restores the model exactly; use it as a
    context manager. A model spread over devices by accelerate (``device_map``) keeps its hooks:
    see the module's docstring.

    Example:
        >>> with ImportanceCollector(model) as col:
        ...     for ids in batches:            # ids: [B, T]
        ...         col.step(ids)
        ... scores = col.scores()
    """

    def __init__(self, model: nn.Module | ModelView, *, seq_agg: str = "mean", batch_agg: str = "l2",
                 impl: str = "auto", check_finite: bool = True, head_score: str = "input"):
        _check_agg("seq_agg", seq_agg)
        if head_score not in HEAD_SCORES:
            raise MinitronError(f"head_score must be one of {HEAD_SCORES}, got {head_score!r}")
        self.head_score = head_score
        _check_agg("batch_agg", batch_agg)
        self.view = model if isinstance(model, ModelView) else get_view(model)
        self.model = self.view.model
        self.seq_agg, self.batch_agg = seq_agg, batch_agg
        # the device the token ids go to (the embedding's; accelerate's execution device when it
        # places it: its weight may be offloaded to meta), and the implementation chosen there
        self.input_device = module_device(self.view.embed_tokens)
        self.impl = resolve_impl(impl, torch.empty(0, device=self.input_device), op="importance collection")
        # what the ops are told: "auto" picks per tensor (Triton on CUDA, torch on a layer that
        # executes on the CPU), an explicit choice holds everywhere
        self._op_impl = "auto" if impl == "auto" else self.impl
        self.check_finite = check_finite
        g = self.view.geometry()
        self.geometry = g
        L = self.view.num_layers
        mk = lambda n, lab: _Stat(n, seq_agg, batch_agg, lab)  # noqa: E731
        self.heads = [mk(g.num_attention_heads, f"layer {i} heads (o_proj input)") for i in range(L)]
        self.neurons = [mk(g.intermediate_size, f"layer {i} neurons (down_proj input)") for i in range(L)]
        # every [hidden] norm of each layer (Llama: 2; Gemma: 4, with the post-attention and
        # post-feed-forward norms), summed into the layer's channel scores
        self.norms = [[mk(g.hidden_size, f"layer {i} channels (norm {j} output)")
                       for j in range(len(lv.hidden_norms()))] for i, lv in enumerate(self.view.layers)]
        # MoE layers (models/moe.py): expert statistics from the same pass
        self.moe = {i: _MoEStat(lv.moe, f"layer {i} experts") for i, lv in enumerate(self.view.layers)
                    if getattr(lv, "moe", None) is not None}
        self.shared = {i: mk(lv.moe.shared_down.in_features, f"layer {i} shared expert neurons")
                       for i, lv in enumerate(self.view.layers)
                       if getattr(lv, "moe", None) is not None and lv.moe.shared_down is not None}
        # block cosine: per layer, this batch's [B] sums and the fp64 total, on the layer's device
        self._cos_acc: dict[int, torch.Tensor] = {}
        self.cos_count = 0.0
        self.tokens = 0
        self.samples = 0
        self._B = 0
        self._cos_batch: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None  # this batch's [B, T] mask on the input device (None: all valid)
        self._masks: dict[torch.device, torch.Tensor] = {}  # ... and its copies on the layers' devices
        self._handles: list[Any] = []
        self._restores: list[Callable[[], None]] = []
        self._attached = False

    @property
    def cos_sum(self) -> torch.Tensor:
        """``[L]`` fp64 (CPU): each layer's sum of per-token cosines so far."""
        return torch.tensor([float(self._cos_acc[i]) if i in self._cos_acc else 0.0
                             for i in range(self.view.num_layers)], dtype=torch.float64)

    # -- patch -----------------------------------------------------------------------------------
    def attach(self) -> "ImportanceCollector":
        if self._attached:
            return self
        self._attached = True
        fused = self.impl == "triton"
        try:
            for i, lv in enumerate(self.view.layers):
                self._observe_input(lv.o_proj, self._head_hook(i))
                act = _gate_act(lv) if fused and i not in self.moe else None
                if i in self.moe:
                    self._attach_moe(i, lv.moe)
                elif act is not None:
                    self._patch(lv.mlp, self._fused_mlp(i, lv, act))
                else:
                    self._observe_input(lv.down_proj, self._neuron_hook(i))
                for norm, stat in zip(lv.hidden_norms(), self.norms[i]):
                    rms = _fusable_norm(self.view, norm) if fused else None
                    if rms is not None:
                        self._patch(norm, self._fused_norm(norm, stat))
                    else:
                        self._handles.append(norm.register_forward_hook(self._norm_hook(stat)))
                self._patch(lv.module, self._layer_forward(i))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for restore in reversed(self._restores):  # the last patch first: each puts back what it found
            restore()
        self._restores.clear()
        self._masks.clear()
        self._attached = False

    def __enter__(self) -> "ImportanceCollector":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _patch(self, module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replaces ``module``'s computation by ``make(inner)`` (under accelerate's hook: the
        ``_old_forward`` its wrapper calls), reversibly."""
        self._restores.append(_swap_forward(module, make))

    def _observe_input(self, module: nn.Module, fn: Callable[[nn.Module, tuple], None]) -> None:
        """Calls ``fn(module, args)`` before each forward of ``module``: a forward pre-hook, or
        under accelerate's hook a wrapper of ``_old_forward``, so ``fn`` sees the inputs after the
        hook moved them to the execution device, and the weights it loaded."""
        if not accelerate_hooked(module):
            self._handles.append(module.register_forward_pre_hook(fn))
            return

        def make(inner):
            def forward(*args, **kwargs):
                fn(module, args)
                return inner(*args, **kwargs)
            return forward
        self._patch(module, make)

    # -- devices ---------------------------------------------------------------------------------
    def _mask_on(self, device: torch.device) -> torch.Tensor | None:
        """This batch's mask on ``device`` (copied there once per batch), or None."""
        if self._mask is None:
            return None
        m = self._masks.get(device)
        if m is None:
            m = self._masks[device] = self._mask.to(device)
        return m

    def _cos_buf(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s ``[B]`` cosine sums of this batch on ``like``'s device (made at first use)."""
        c = self._cos_batch.get(i)
        if c is None:
            c = self._cos_batch[i] = torch.zeros(self._B, device=like.device)
        elif c.device != like.device:
            c = self._cos_batch[i] = c.to(like.device)
        return c

    # -- hooks -----------------------------------------------------------------------------------
    def _head_hook(self, i: int):
        nh = self.geometry.num_attention_heads
        grams: dict[torch.device, torch.Tensor] = {}

        def hook(mod, args):
            x = args[0]
            s1, s2 = self.heads[i].buffers(x)
            mask = self._mask_on(x.device)
            if self.head_score == "output":
                gram = grams.get(x.device)
                if gram is None:  # from the weight as the forward sees it (loaded, if offloaded)
                    gram = grams[x.device] = ops.head_output_gram(mod.weight.to(x.device), nh)
                ops.head_output_stats(x, gram, mask, s1, s2)
            else:
                ops.head_stats(x, nh, mask, s1, s2, impl=self._op_impl)
        return hook

    def _neuron_hook(self, i: int):
        def hook(mod, args):
            x = args[0]
            ops.abs_stats(x, self._mask_on(x.device), *self.neurons[i].buffers(x))
        return hook

    def _norm_hook(self, st: _Stat):
        def hook(mod, args, out):
            ops.abs_stats(out, self._mask_on(out.device), *st.buffers(out))
        return hook

    def _attach_moe(self, i: int, moe) -> None:
        """Experts: their forward is replaced by the eager per-expert loop that also records the
        statistics (the output is the same sum of router-weighted expert outputs); the router's
        probabilities are read by a hook; the shared expert's neurons like a dense MLP's."""
        st = self.moe[i]

        def experts(inner):
            def experts_forward(hidden_states, top_k_index, top_k_weights):
                valid = self._mask_on(hidden_states.device)
                return st.forward(moe, hidden_states, top_k_index, top_k_weights,
                                  None if valid is None else valid.reshape(-1))
            return experts_forward

        def router_hook(mod, args, out):
            logits = moe.router_logits(out)
            valid = self._mask_on(logits.device)
            st.add_router(logits, None if valid is None else valid.reshape(-1))

        self._patch(moe.experts, experts)
        self._handles.append(moe.router.register_forward_hook(router_hook))
        if moe.shared_down is not None:
            stat = self.shared[i]

            def shared_hook(mod, args):  # the block runs the shared expert on [B*T, H]: back to [B, T, F]
                x = args[0]
                ops.abs_stats(x.view(stat.B, -1, x.shape[-1]), self._mask_on(x.device), *stat.buffers(x))

            self._observe_input(moe.shared_down, shared_hook)

    def _fused_mlp(self, i: int, lv, act: str):
        def make(inner):
            def forward(x):
                gate, up = lv.gate_up(x)
                s1, s2 = self.neurons[i].buffers(gate)
                h = ops.swiglu_with_stats(gate, up, self._mask_on(gate.device), s1, s2, act=act, impl=self._op_impl)
                return lv.down_proj(h)
            return forward
        return make

    def _fused_norm(self, norm: nn.Module, st: _Stat):
        def make(inner):
            def forward(x):
                # the weight read now, where the forward reads it (accelerate loads an offloaded one)
                w, eps, off = self.view.rmsnorm_of(norm)
                s1, s2 = st.buffers(x)
                return ops.rmsnorm_with_stats(x, w, eps, self._mask_on(x.device), s1, s2, offset=off,
                                              impl=self._op_impl)
            return forward
        return make

    def _layer_forward(self, i: int):
        """The decoder layer's computation, plus the block cosine of its input and output: both as
        the layer sees them (after accelerate moved the input to the layer's device)."""
        def make(inner):
            def forward(*args, **kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                out = inner(*args, **kwargs)
                y = out[0] if isinstance(out, (tuple, list)) else out
                x = x.to(y.device)  # a no-op on one device; explicit wherever they differ
                ops.block_cosine(x, y, self._mask_on(y.device), self._cos_buf(i, y), impl=self._op_impl)
                return out
            return forward
        return make

    # -- driving ---------------------------------------------------------------------------------
    def _all_stats(self):
        yield from self.heads
        yield from self.neurons
        for per_layer in self.norms:
            yield from per_layer
        yield from self.shared.values()

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             run_lm_head: bool = False) -> Any:
        """One forward over ``input_ids [B, T]`` (``attention_mask [B, T]``, 1 = token, 0 = pad)
        through the decoder stack (the lm_head is not needed for any score and is skipped unless
        ``run_lm_head``, e.g. to use the logits in the same pass). Returns the model's output.
        The ids and the mask go to ``input_device`` (the embedding's); each layer's statistics are
        made on that layer's device."""
        if not self._attached:
            raise RuntimeError("ImportanceCollector.step() before attach(); use `with ImportanceCollector(model) as c:`")
        dev = self.input_device
        ids = input_ids.to(dev)
        B, T = ids.shape
        if attention_mask is not None:
            am = attention_mask.to(dev)
            n = am.sum(1, dtype=torch.float64).cpu()
            self._mask = None if bool((am != 0).all()) else (am != 0).to(torch.float32)
        else:
            am = None
            n = torch.full((B,), float(T), dtype=torch.float64)
            self._mask = None
        keep = n > 0
        self._B = B
        for st in self._all_stats():
            st.begin(B)
        self._cos_batch = {}
        try:
            fwd = self.model if run_lm_head or not hasattr(self.model, "get_decoder") else self.model.get_decoder()
            result = fwd(input_ids=ids, attention_mask=am, use_cache=False)
        finally:
            self._mask = None
            self._masks.clear()
        if self.check_finite:
            self._check_finite()
        nk, kk, kept = n.view(-1, 1), keep.view(-1, 1), int(keep.sum())
        counts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def on(d: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # n, keep copied once per device
            if d not in counts:
                counts[d] = (nk.to(d), kk.to(d))
            return counts[d]

        for st in self._all_stats():
            st.end(on, kept)
        for i, c in self._cos_batch.items():  # summed on the layer's device: no host sync per layer
            s = c.double().sum()
            self._cos_acc[i] = s if i not in self._cos_acc else self._cos_acc[i] + s.to(self._cos_acc[i].device)
        self._cos_batch = {}
        self.cos_count += float(n.sum())
        self.tokens += int(n.sum())
        self.samples += kept
        return result

    def _check_finite(self) -> None:
        for i in range(self.view.num_layers):
            moe = [d[i] for d in (self.moe, self.shared) if i in d]
            for st in (*self.norms[i], self.heads[i], self.neurons[i], *moe):
                if not st.finite():
                    raise NonFiniteActivationError(
                        f"NaN/inf activations in {st.label}; the model or its dtype overflows on this data "
                        f"(try --dtype float32) — no scores were written")
            c = self._cos_batch.get(i)
            if c is not None and not bool(torch.isfinite(c).all()):
                raise NonFiniteActivationError(f"NaN/inf activations in layer {i} output; no scores were written")

    def scores(self, meta: dict[str, Any] | None = None) -> ImportanceScores:
        """The aggregated scores so far (higher = more important)."""
        g = self.geometry
        heads = [s.result() for s in self.heads]
        group = g.num_attention_heads // g.num_key_value_heads
        kv = [h.view(g.num_key_value_heads, group).sum(1) for h in heads]
        layer_ch = [sum(st.result() for st in per_layer) for per_layer in self.norms]
        bi = (1.0 - self.cos_sum / max(self.cos_count, 1.0)).float()
        m = {"family": self.view.family, "geometry": g.as_dict(), "seq_agg": self.seq_agg,
             "batch_agg": self.batch_agg, "calib_tokens": self.tokens, "calib_samples": self.samples,
             "head_score": self.head_score, "impl": self.impl, "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
             "accumulation": "fp32 per-batch sums, fp64 across batches"}
        m.update(meta or {})
        if self.moe:
            m["expert_score"] = "REAP: mean over routed tokens of router weight x ||expert output||"
        return ImportanceScores(heads=heads, kv_groups=kv, neurons=[s.result() for s in self.neurons],
                                layer_channels=layer_ch, channels=torch.stack(layer_ch).sum(0),
                                block_importance=bi, meta=m,
                                experts={i: st.experts() for i, st in self.moe.items()},
                                expert_neurons={i: st.neurons() for i, st in self.moe.items()},
                                expert_mass={i: st.mass() for i, st in self.moe.items()},
                                shared_neurons={i: st.result() for i, st in self.shared.items()})


def cpu_micro_batch(model: nn.Module, seq_len: int) -> int:
    """Samples per forward on the CPU under the heap cap (:func:`minitron_fast.io.cap_heap_retention`):
    the most whose widest activation, ``[b, T, max(hidden, FFN, expert FFN, heads x head_dim)]``
    in the model's dtype, stays below the mmap threshold, so each layer's temporaries are reused
    from the heap instead of being page-faulted in and unmapped at every layer. The statistics do
    not depend on how samples are batched (tested). On SmolLM2-135M, 64 x 256 tokens on the
    2-core VM: batch 8 as micro-batches of 2, 34.2-37.1 s -> 27.5 s (two runs each), peak RSS
    about 1.0-1.1 GB either way."""
    g = get_view(model).geometry()
    width = max(g.hidden_size, g.intermediate_size, g.moe_intermediate_size, g.num_attention_heads * g.head_dim)
    per_sample = seq_len * width * next(model.parameters()).element_size()
    return max(1, MMAP_THRESHOLD // max(1, per_sample))


def collect_importance(model: nn.Module, blocks: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                       batch_size: int = 8, seq_agg: str = "mean", batch_agg: str = "l2", impl: str = "auto",
                       progress: bool = True, meta: dict[str, Any] | None = None,
                       head_score: str = "input") -> ImportanceScores:
    """Activation importance of an in-memory model over calibration ``blocks [n, T]`` (token ids;
    optional ``attention_mask [n, T]``), one forward per batch, every axis at once.

    Example:
        >>> scores = collect_importance(model, token_blocks(tok, "demo", "calib", 256, max_blocks=64))
        >>> scores.neurons[0].shape          # [intermediate_size]
    """
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise MinitronError(f"calibration blocks must be a non-empty [n, T] tensor, got {tuple(blocks.shape)}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos and blocks.shape[1] > max_pos:
        raise MinitronError(f"calibration sequence length {blocks.shape[1]} exceeds the model's "
                            f"max_position_embeddings ({max_pos})")
    micro = batch_size
    if any(p.device.type == "cpu" for p in itertools.islice(model.parameters(), 1)):
        # glibc otherwise keeps each batch's freed [B, T, F] temporaries resident: on SmolLM2-135M,
        # 64 x 256 tokens at batch 8, the peak RSS was 1.91 GB, 0.99 GB with the cap (the model's
        # forward alone: 1.06 GB); the trainer's policy (io.cap_heap_retention), process-wide.
        # Forwards of cpu_micro_batch samples then keep the temporaries under the cap's threshold.
        cap_heap_retention()
        micro = min(batch_size, cpu_micro_batch(model, blocks.shape[1]))
    was_training = model.training
    model.eval()
    try:
        with ImportanceCollector(model, seq_agg=seq_agg, batch_agg=batch_agg, impl=impl, head_score=head_score) as col:
            starts: Iterable[int] = range(0, blocks.shape[0], batch_size)
            for s in tqdm(starts, desc="importance", disable=not progress, leave=False,
                          total=(blocks.shape[0] + batch_size - 1) // batch_size, unit="batch"):
                for u in range(s, min(s + batch_size, blocks.shape[0]), micro):
                    am = None if attention_mask is None else attention_mask[u: u + micro]
                    col.step(blocks[u: u + micro], am)
        m = {"seq_len": int(blocks.shape[1])}
        m.update(meta or {})
        return col.scores(m)
    finally:
        model.train(was_training)


__all__ = ["AGGS", "HEAD_SCORES", "ImportanceCollector", "collect_importance", "cpu_micro_batch", "NonFiniteActivationError", "seq_aggregate",
           "batch_aggregate"]
