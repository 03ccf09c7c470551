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

Aggregation (``seq_agg`` over the valid tokens of a sample, then ``batch_agg`` over samples),
each one of ``mean`` (sum / n), ``l2`` (sqrt of the sum of squares) or ``var`` (population
variance, ddof 0). The default, mean then L2, is the papers' best.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from minitron_fast.errors import MinitronError
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


class _Stat:
    """Streaming statistics of one unit axis of one module."""

    def __init__(self, n_units: int, seq_agg: str, batch_agg: str, label: str):
        self.n_units, self.seq_agg, self.batch_agg, self.label = n_units, seq_agg, batch_agg, label
        self.need_s1 = seq_agg in ("mean", "var")
        self.need_s2 = seq_agg in ("l2", "var")
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None
        self.S1: torch.Tensor | None = None
        self.S2: torch.Tensor | None = None
        self.N = 0

    def begin(self, B: int, device: torch.device) -> None:
        self.s1 = torch.zeros(B, self.n_units, device=device) if self.need_s1 else None
        self.s2 = torch.zeros(B, self.n_units, device=device) if self.need_s2 else None

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.s1, self.s2) if t is not None)

    def end(self, n: torch.Tensor, keep: torch.Tensor) -> None:
        """Folds this batch in: ``n [B, 1]`` valid tokens per sample, ``keep [B]`` samples with any."""
        s1 = None if self.s1 is None else self.s1.double()[keep]
        s2 = None if self.s2 is None else self.s2.double()[keep]
        v = seq_aggregate(s1, s2, n[keep], self.seq_agg)  # [B', U]
        if self.batch_agg in ("mean", "var"):
            self.S1 = v.sum(0) if self.S1 is None else self.S1 + v.sum(0)
        if self.batch_agg in ("l2", "var"):
            self.S2 = (v * v).sum(0) if self.S2 is None else self.S2 + (v * v).sum(0)
        self.N += int(keep.sum())
        self.s1 = self.s2 = None

    def result(self) -> torch.Tensor:
        if self.N == 0:
            raise MinitronError("no calibration tokens were seen (every position was padding)")
        return batch_aggregate(self.S1, self.S2, self.N, self.batch_agg).float().cpu()


class _MoEStat:
    """Expert statistics of one MoE layer, summed over valid tokens in fp64:

    - ``reap [E]``: sum over the tokens routed to each expert of router weight x ||expert
      output|| (REAP, arXiv 2510.13999), and ``routed [E]`` their count;
    - ``neurons [E, F]``: the same tokens' router weight x ``|act(gate) * up|`` per neuron;
    - ``mass [E]``: the router's softmax probability of each expert, summed over all tokens.
    """

    def __init__(self, moe, label: str):
        E, F = moe.num_experts, moe.ffn
        dev = moe.router_weight.device
        self.label = label
        # on the model's device: no host sync per expert (fp64 sums; the counts are exact in fp64)
        self.reap = torch.zeros(E, dtype=torch.float64, device=dev)
        self.routed = torch.zeros(E, dtype=torch.float64, device=dev)
        self.neur = torch.zeros(E, F, dtype=torch.float64, device=dev)
        self.mass_sum = torch.zeros(E, dtype=torch.float64, device=dev)
        self.tokens = torch.zeros((), dtype=torch.float64, device=dev)

    def forward(self, moe, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                valid: torch.Tensor | None) -> torch.Tensor:
        """The experts' output for ``x [N, H]`` routed by ``top_k_index / top_k_weights [N, k]``
        (the eager loop of transformers' experts), recording the statistics."""
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
        p = torch.softmax(logits.float(), dim=-1).double()  # [N, E]
        if valid is not None:
            p = p * valid[:, None]
        self.mass_sum += p.sum(0)
        self.tokens += p.shape[0] if valid is None else valid.double().sum()

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.reap, self.neur, self.mass_sum))

    def experts(self) -> torch.Tensor:
        return (self.reap / self.routed.clamp_min(1)).float().cpu()

    def neurons(self) -> torch.Tensor:
        return (self.neur / self.routed.clamp_min(1)[:, None]).float().cpu()

    def mass(self) -> torch.Tensor:
        return (self.mass_sum / self.tokens.clamp_min(1)).float().cpu()


def _fusable_norm(view: ModelView, norm: nn.Module) -> tuple[torch.Tensor, float, float] | None:
    """``(weight, eps, offset)`` when ``norm`` behaves as the RMSNorm the fused kernel computes:
    the adapter's claim (``rmsnorm_of``) checked on a probe, so a family whose norm differs keeps
    its own forward (and the hook path) instead of silently computing something else."""
    rms = view.rmsnorm_of(norm)
    if rms is None:
        return None
    w, eps, off = rms
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 3, w.shape[0], generator=g).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        same = torch.equal(norm(x), ops.rmsnorm_reference(x, w, eps, off))
    return rms if same else None


def _gate_act(lv) -> str | None:
    """The fused kernel's name for the layer's gate activation (SiLU, GELU-tanh), judged by
    behaviour; None keeps the MLP's own forward."""
    return ops.gate_activation_kind(lv.act_fn) if lv.act_fn is not None and lv.down_proj is not None else None


class ImportanceCollector:
    """Collects every importance axis in one forward pass per batch.

    Patching is explicit and reversible: ``attach()`` installs hooks (and on CUDA, fused
    forwards) on the adapter's modules, ``detach()`` restores the model exactly; use it as a
    context manager.

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
        p = next(self.model.parameters())
        self.impl = resolve_impl(impl, p, op="importance collection")
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
        self.cos_sum = torch.zeros(L, dtype=torch.float64)
        self.cos_count = 0.0
        self.tokens = 0
        self.samples = 0
        self._cos_batch: list[torch.Tensor] = []
        self._layer_in: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []

    # -- patch -----------------------------------------------------------------------------------
    def attach(self) -> "ImportanceCollector":
        if self._handles or self._patched:
            return self
        fused = self.impl == "triton"
        for i, lv in enumerate(self.view.layers):
            self._handles.append(lv.o_proj.register_forward_pre_hook(self._head_hook(i)))
            act = _gate_act(lv) if fused and i not in self.moe else None
            if i in self.moe:
                self._attach_moe(i, lv.moe)
            elif act is not None:
                self._patch(lv.mlp, self._fused_mlp(i, lv, act))
            else:
                self._handles.append(lv.down_proj.register_forward_pre_hook(self._neuron_hook(i)))
            for norm, stat in zip(lv.hidden_norms(), self.norms[i]):
                rms = _fusable_norm(self.view, norm) if fused else None
                if rms is not None:
                    self._patch(norm, self._fused_norm(rms, stat))
                else:
                    self._handles.append(norm.register_forward_hook(self._norm_hook(stat)))
            self._handles.append(lv.module.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
            self._handles.append(lv.module.register_forward_hook(self._layer_hook(i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self._patched:
            del m.forward  # the instance attribute shadowed the class's forward
        self._patched.clear()
        self._layer_in.clear()

    def __enter__(self) -> "ImportanceCollector":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _patch(self, module: nn.Module, fwd) -> None:
        module.forward = fwd
        self._patched.append(module)

    # -- hooks -----------------------------------------------------------------------------------
    def _head_hook(self, i: int):
        nh = self.geometry.num_attention_heads
        gram = ops.head_output_gram(self.view.layers[i].o_proj.weight, nh) if self.head_score == "output" else None

        def hook(mod, args):
            st = self.heads[i]
            if gram is not None:
                ops.head_output_stats(args[0], gram, self._mask, st.s1, st.s2)
            else:
                ops.head_stats(args[0], nh, self._mask, st.s1, st.s2, impl=self.impl)
        return hook

    def _neuron_hook(self, i: int):
        def hook(mod, args):
            st = self.neurons[i]
            ops.abs_stats(args[0], self._mask, st.s1, st.s2)
        return hook

    def _norm_hook(self, st: _Stat):
        def hook(mod, args, out):
            ops.abs_stats(out, self._mask, st.s1, st.s2)
        return hook

    def _attach_moe(self, i: int, moe) -> None:
        """Experts: their forward is replaced by the eager per-expert loop that also records the
        statistics (the output is the same sum of router-weighted expert outputs); the router's
        probabilities are read by a hook; the shared expert's neurons like a dense MLP's."""
        st = self.moe[i]

        def experts_forward(hidden_states, top_k_index, top_k_weights):
            valid = None if self._mask is None else self._mask.reshape(-1)
            return st.forward(moe, hidden_states, top_k_index, top_k_weights, valid)

        def router_hook(mod, args, out):
            valid = None if self._mask is None else self._mask.reshape(-1)
            st.add_router(moe.router_logits(out), valid)

        self._patch(moe.experts, experts_forward)
        self._handles.append(moe.router.register_forward_hook(router_hook))
        if moe.shared_down is not None:
            stat = self.shared[i]

            def shared_hook(mod, args):  # the block runs the shared expert on [B*T, H]: back to [B, T, F]
                x = args[0]
                B = (stat.s1 if stat.s1 is not None else stat.s2).shape[0]
                ops.abs_stats(x.view(B, -1, x.shape[-1]), self._mask, stat.s1, stat.s2)

            self._handles.append(moe.shared_down.register_forward_pre_hook(shared_hook))

    def _fused_mlp(self, i: int, lv, act: str):
        def forward(x):
            st = self.neurons[i]
            gate, up = lv.gate_up(x)
            h = ops.swiglu_with_stats(gate, up, self._mask, st.s1, st.s2, act=act, impl=self.impl)
            return lv.down_proj(h)
        return forward

    def _fused_norm(self, rms: tuple[torch.Tensor, float, float], st: _Stat):
        w, eps, off = rms

        def forward(x):
            return ops.rmsnorm_with_stats(x, w, eps, self._mask, st.s1, st.s2, offset=off, impl=self.impl)
        return forward

    def _layer_pre_hook(self, i: int):
        def hook(mod, args, kwargs):
            self._layer_in[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _layer_hook(self, i: int):
        def hook(mod, args, out):
            y = out[0] if isinstance(out, (tuple, list)) else out
            x = self._layer_in.pop(i)
            ops.block_cosine(x, y, self._mask, self._cos_batch[i], impl=self.impl)
        return hook

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
        ``run_lm_head``, e.g. to use the logits in the same pass). Returns the model's output."""
        if not self._handles:
            raise RuntimeError("ImportanceCollector.step() before attach(); use `with ImportanceCollector(model) as c:`")
        dev = next(self.model.parameters()).device
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
        for st in self._all_stats():
            st.begin(B, dev)
        self._cos_batch = [torch.zeros(B, device=dev) for _ in range(self.view.num_layers)]
        try:
            fwd = self.model if run_lm_head or not hasattr(self.model, "get_decoder") else self.model.get_decoder()
            result = fwd(input_ids=ids, attention_mask=am, use_cache=False)
        finally:
            self._mask = None
            self._layer_in.clear()
        if self.check_finite:
            self._check_finite()
        nk = n.view(-1, 1)
        for st in self._all_stats():
            st.end(nk.to(st.s1.device if st.s1 is not None else st.s2.device), keep.to(dev))
        self.cos_sum += torch.stack([c.double().sum() for c in self._cos_batch]).cpu()
        self.cos_count += float(n.sum())
        self.tokens += int(n.sum())
        self.samples += int(keep.sum())
        return result

    def _check_finite(self) -> None:
        for i in range(self.view.num_layers):
            moe = [d[i] for d in (self.moe, self.shared) if i in d]
            for st in (*self.norms[i], self.heads[i], self.neurons[i], *moe):
                if not st.finite():
                    raise NonFiniteActivationError(
                        f"NaN/inf activations in {st.label}; the model or its dtype overflows on this data "
                        f"(try --dtype float32) — no scores were written")
            if not bool(torch.isfinite(self._cos_batch[i]).all()):
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
    was_training = model.training
    model.eval()
    try:
        with ImportanceCollector(model, seq_agg=seq_agg, batch_agg=batch_agg, impl=impl, head_score=head_score) as col:
            starts: Iterable[int] = range(0, blocks.shape[0], batch_size)
            for s in tqdm(starts, desc="importance", disable=not progress, leave=False,
                          total=(blocks.shape[0] + batch_size - 1) // batch_size, unit="batch"):
                am = None if attention_mask is None else attention_mask[s: s + batch_size]
                col.step(blocks[s: s + batch_size], am)
        m = {"seq_len": int(blocks.shape[1])}
        m.update(meta or {})
        return col.scores(m)
    finally:
        model.train(was_training)


__all__ = ["AGGS", "HEAD_SCORES", "ImportanceCollector", "collect_importance", "NonFiniteActivationError", "seq_aggregate",
           "batch_aggregate"]
