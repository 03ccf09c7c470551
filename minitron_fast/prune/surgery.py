"""Width and depth surgery on a loaded model, in place, through the ``ModelView``.

Every parameter tied to a pruned unit is sliced (LLM-Pruner's dependency groups). What each
parameter's rows and columns are made of comes from the family adapter
(``LayerView.sliced_params``): fused projections are row blocks laid end to end (Phi-3's
``qkv_proj`` rows are ``[q heads | kv heads | kv heads]``, ``gate_up_proj`` rows ``[ffn | ffn]``).

| unit            | sliced                                                                   |
|-----------------|--------------------------------------------------------------------------|
| query head      | q rows (+bias), o_proj columns                                           |
| KV group        | k / v rows (+bias) (its query heads go with it)                          |
| MLP neuron      | gate / up rows (+bias), down_proj columns                                |
| hidden channel  | embeddings and lm_head columns (tied or not), every projection's input   |
|                 | columns or output rows (+o/down bias), every ``[hidden]`` norm (and bias)|
| layer           | the decoder layer, with the survivors' ``layer_idx`` renumbered and the  |
|                 | config's per-layer settings following the kept layers (``config_for``)   |

Per-head norms (Qwen3/Gemma3 query and key norms, weight ``[head_dim]``) are shared by every
head and never sliced. When the embedding scale depends on the hidden size (Gemma), hidden
pruning rescales the kept embedding columns (and, with tied embeddings, the final norm): see
``hidden_rescale``.

Slicing goes through ``minitron_fast.ops.compact.compact_``: kept rows/columns are compacted
inside each parameter's own buffer and freed pages are returned to the OS, so the model never
exists twice in memory; each ``nn.Parameter`` stays the same object.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from minitron_fast.models import ModelView, get_view
from minitron_fast.ops.compact import compact_2d_
from minitron_fast.artifacts.plan import Plan, PlanError, validate_plan


@dataclass
class Rule:
    """How one parameter is sliced: keep ``rows`` along dim 0 and ``cols`` along dim 1 (None: all),
    then map the kept values ``w -> w * scale + shift`` (computed in fp32; the identity unless a
    family's embedding scale depends on the hidden size, see ``hidden_rescale``)."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    scale: float = 1.0
    shift: float = 0.0

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        if self.rows is not None:
            out[0] = self.rows.numel()
        if self.cols is not None:
            out[1] = self.cols.numel()
        return tuple(out)

    @property
    def affine(self) -> bool:
        return self.scale != 1.0 or self.shift != 0.0

    def apply_affine_(self, t: torch.Tensor) -> torch.Tensor:
        """``t <- t * scale + shift`` in place, in fp32 (fp64 for fp64 weights) then rounded once
        to ``t``'s dtype (the in-place and the streaming pruner call this same function, so they
        agree bit for bit)."""
        if self.affine:
            t.copy_(t.to(torch.promote_types(t.dtype, torch.float32)).mul_(self.scale).add_(self.shift))
        return t


@dataclass
class ExpertRule:
    """How a stacked expert tensor ``[E, R, C]`` is sliced: keep ``experts`` along dim 0, then
    ``rows`` (dim 1) and ``cols`` (dim 2) of each kept expert. ``rows`` / ``cols`` are one index
    tensor for every expert, a list of one per kept expert (each expert its own neurons), or None
    (all)."""

    experts: torch.Tensor | None = None
    rows: torch.Tensor | list[torch.Tensor] | None = None
    cols: torch.Tensor | list[torch.Tensor] | None = None

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        n = lambda k, full: full if k is None else (k[0] if isinstance(k, list) else k).numel()  # noqa: E731
        return (n(self.experts, shape[0]), n(self.rows, shape[1]), n(self.cols, shape[2]))

    def apply_(self, p: torch.Tensor, *, impl: str = "auto", release: bool = True) -> None:
        """Slices ``p`` in place (its own buffer, through ``compact_2d_`` on 2-D views), except
        per-expert columns (``down_proj`` with each expert's own neurons), which cannot be one
        2-D compaction: that tensor is rebuilt (peak: one extra copy of the pruned tensor)."""
        if not p.is_contiguous():
            p.data = p.data.contiguous()
        E, R, C = p.shape
        if self.experts is not None:
            p.data = p.data.view(E, R * C)
            compact_2d_(p, self.experts, None, impl=impl, release=release)
            E = self.experts.numel()
            p.data = p.data.view(E, R, C)
        if self.rows is None and self.cols is None:
            return
        Et, Rt, Ct = self.shape((E, R, C))
        if isinstance(self.cols, list):
            rows = self.rows if isinstance(self.rows, list) else [self.rows] * E
            new = torch.stack([_take(_take(p.data[j], 0, rows[j]), 1, self.cols[j]) for j in range(E)])
            p.data = new
            return
        flat = None
        if self.rows is not None:
            rows = self.rows if isinstance(self.rows, list) else [self.rows] * E
            flat = torch.cat([j * R + r for j, r in enumerate(rows)])
        p.data = p.data.view(E * R, C)
        compact_2d_(p, flat, self.cols, impl=impl, release=release)
        p.data = p.data.view(Et, Rt, Ct)


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx.to(t.device))


def _units_to_rows(units: list[int], width: int) -> torch.Tensor:
    """Head indices -> the rows of their ``width`` (head_dim) outputs."""
    u = torch.as_tensor(units, dtype=torch.long)
    return (u[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _maybe(kept: list[int] | torch.Tensor, full: int) -> torch.Tensor | None:
    """``kept`` as a long tensor, or None when it keeps all ``full`` units in order."""
    k = torch.as_tensor(kept, dtype=torch.long)
    if k.numel() == full and bool((k == torch.arange(full)).all()):
        return None
    return k


def _segments_index(segments: tuple[str, ...] | None, kept: dict[str, tuple[list[int], int, int]]) -> torch.Tensor | None:
    """The kept indices along a dimension made of ``segments`` laid end to end (a fused qkv_proj's
    rows are heads, kv_heads, kv_heads), or None when it keeps everything. ``kept[axis]`` is
    ``(kept units, source units, unit width)``."""
    if segments is None:
        return None
    parts, off, whole = [], 0, True
    for axis in segments:
        units, n, width = kept[axis]
        whole = whole and _maybe(units, n) is None
        parts.append(off + _units_to_rows(units, width))
        off += n * width
    return None if whole else torch.cat(parts)


def _kept_units(plan: Plan, src_layer: int | None) -> dict[str, tuple[list[int], int, int]]:
    src = plan.source_geometry()
    kept = {"hidden": (plan.hidden, src.hidden_size, 1)}
    if src_layer is not None:
        kept.update(heads=(plan.heads[src_layer], src.num_attention_heads, src.head_dim),
                    kv_heads=(plan.kv_heads[src_layer], src.num_key_value_heads, src.head_dim),
                    ffn=(plan.neurons[src_layer], src.intermediate_size, 1))
    return kept


def layer_rules(view: ModelView, plan: Plan, src_layer: int, lv: Any) -> Iterator[tuple[nn.Parameter, Rule]]:
    """The (parameter, rule) pairs of one kept decoder layer ``lv`` (source index ``src_layer``),
    from the layer's own description of its parameters (``LayerView.sliced_params``)."""
    kept = _kept_units(plan, src_layer)
    for p, rows, cols in lv.sliced_params():
        yield p, Rule(_segments_index(rows, kept), _segments_index(cols, kept))
    if getattr(lv, "moe", None) is not None:  # a MoE layer's router and stacked experts
        yield from moe_layer_rules(plan, src_layer, lv, _maybe(plan.hidden, plan.source_geometry().hidden_size))


def hidden_rescale(view_cls: Any, config: Any, plan: Plan) -> tuple[float, float, float]:
    """``(embedding_scale, final_norm_scale, final_norm_shift)`` for a family whose embedding is
    multiplied by a function of the hidden size (Gemma: ``sqrt(hidden)``).

    The pruned model multiplies its embedding by the new factor, so the kept embedding columns are
    scaled by ``c = old / new``: then ``embedding * new == original kept channels * old`` and the
    residual stream is the original's kept channels. With tied embeddings the lm_head is that same
    matrix, ``c`` times too large; the final norm, whose output feeds only the lm_head, absorbs
    ``1 / c``: ``(offset + w') = (offset + w) / c``. Logits are then those of the untied model
    that keeps the original lm_head columns (tests/models/test_families.py checks this relation)."""
    old = view_cls.embed_scale_of(config, plan.source_geometry().hidden_size)
    new = view_cls.embed_scale_of(config, len(plan.hidden))
    c = old / new
    if c == 1.0 or not getattr(config, "tie_word_embeddings", False):
        return c, 1.0, 0.0
    off = view_cls.norm_weight_offset
    return c, 1.0 / c, off * (1.0 / c - 1.0)


def moe_layer_rules(plan: Plan, src_layer: int, lv: Any, hid: torch.Tensor | None
                    ) -> Iterator[tuple[nn.Parameter, Rule | ExpertRule]]:
    """The rules of a MoE layer's router and stacked experts (models/moe.py; the shared expert and
    its gate come with ``sliced_params``): router rows of the kept experts, each kept expert's own
    neurons (``gate_up_proj`` rows: gate rows then up rows; ``down_proj`` columns), hidden
    channels everywhere."""
    src = plan.source_geometry()
    m = lv.moe
    F = src.moe_intermediate_size
    ex = _maybe(plan.experts[src_layer], src.num_experts)
    kept = plan.expert_neurons[src_layer]
    if all(len(n) == F for n in kept):
        gu_rows, dn_cols = None, None
    else:
        ks = [torch.as_tensor(n, dtype=torch.long) for n in kept]
        gu_rows, dn_cols = [torch.cat([k, k + F]) for k in ks], ks
    yield m.router_weight, Rule(ex, hid)
    if getattr(m.router, "bias", None) is not None:
        yield m.router.bias, Rule(ex)
    yield m.gate_up_weight, ExpertRule(ex, gu_rows, hid)
    yield m.down_weight, ExpertRule(ex, hid, dn_cols)


def model_rules(view: ModelView, plan: Plan) -> Iterator[tuple[nn.Parameter, Rule]]:
    """The (parameter, rule) pairs outside the decoder layers: embeddings, final norm, lm_head."""
    hid = _maybe(plan.hidden, plan.source_geometry().hidden_size)
    e_scale, n_scale, n_shift = hidden_rescale(type(view), view.config, plan)
    yield view.embed_tokens.weight, Rule(None, hid, scale=e_scale)
    for p in view.final_norm.parameters(recurse=False):
        yield p, Rule(hid, scale=n_scale, shift=n_shift)
    if not view.tied:
        yield view.lm_head.weight, Rule(None, hid)
    if view.lm_head.bias is not None:
        yield view.lm_head.bias, Rule()


def all_rules(view: ModelView, plan: Plan, *, layer_views: list | None = None) -> list[tuple[nn.Parameter, Rule]]:
    """Every parameter of the (layer-dropped) model with its rule; each parameter once (tied
    weights once). Raises PlanError when a parameter is not covered (a family variant whose
    extra weights the pruner does not know how to slice)."""
    lvs = view.layers if layer_views is None else layer_views
    seen: dict[int, tuple[nn.Parameter, Rule]] = {}
    for src_i, lv in zip(plan.layers, lvs):
        for p, r in layer_rules(view, plan, src_i, lv):
            seen.setdefault(id(p), (p, r))
    for p, r in model_rules(view, plan):
        seen.setdefault(id(p), (p, r))
    for name, p in view.model.named_parameters():
        if id(p) not in seen:
            raise PlanError(f"parameter {name} {tuple(p.shape)} is not covered by the {view.family} pruning rules; "
                            "this model variant is not supported")
    return list(seen.values())


def named_rules(model: nn.Module, plan: Plan) -> dict[str, Rule]:
    """Parameter name -> rule, for the source model (full depth) with names as in its state dict.
    Names of dropped layers are absent. Used by the streaming pruner on a meta-device model."""
    view = get_view(model)
    rules: dict[int, Rule] = {}
    for src_i in plan.layers:
        for p, r in layer_rules(view, plan, src_i, view.layers[src_i]):
            rules.setdefault(id(p), r)
    for p, r in model_rules(view, plan):
        rules.setdefault(id(p), r)
    return {name: rules[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in rules}


def layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder layer list (``"model.layers."`` for the supported families)."""
    target = get_view(model).decoder_layers
    for name, mod in model.named_modules():
        if mod is target:
            return name + "."
    raise PlanError("cannot find the decoder layer list in the model")


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan, *, impl: str = "auto", release: bool = True,
               progress: bool = False) -> nn.Module:
    """Prunes ``model`` in place to ``plan`` and returns it (the same object).

    Layers not kept are removed and the survivors renumbered (``layer_idx``, so the KV cache
    works); every kept parameter is compacted in its own buffer with ``compact_(impl=impl)``
    (``"auto"``: the C++ extension on CPU, Triton on CUDA, else torch); module attributes
    (``in_features``, the attention's cached head counts, ...) and the config are updated to describe
    the new shape exactly.

    Example:
        >>> plan = make_plan(model, "scores.safetensors", "hidden=48,ffn=64")
        >>> apply_plan(model, plan); model.config.hidden_size
        48
    """
    view = get_view(model)
    geo = validate_plan(plan, model.config)
    # 1. depth: drop layers (their memory goes with the last reference)
    keep = set(plan.layers)
    layers = view.decoder_layers
    for i in range(len(layers) - 1, -1, -1):
        if i not in keep:
            del layers[i]
    src_config = copy.deepcopy(model.config)
    view.refresh()
    # 2. width: compact every parameter in place (one pass per tensor over both axes with _C)
    rules = all_rules(view, plan, layer_views=view.layers)
    it = rules
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(rules, desc="pruning", unit="tensor")
    for p, r in it:
        if isinstance(r, ExpertRule):
            r.apply_(p, impl=impl, release=release)
        else:
            compact_2d_(p, r.rows, r.cols, impl=impl, release=release)
            r.apply_affine_(p.data)
    # 3. the config, in place (modules hold references to it), then module attributes that cache
    #    sizes (layer_idx, cached head counts, embedding scale, experts and top-k, ...): ModelView.sync_modules_
    update_config_(model.config, geo, plan, src_config)
    view.refresh()
    view.sync_modules_()
    return model


def update_config_(config: Any, geo: Any, plan: Plan, src_config: Any = None) -> Any:
    """Makes ``config`` describe ``geo`` exactly (head_dim written explicitly); per-layer settings
    (attention types, sliding-window boundary) follow the kept layers of ``plan``. ``src_config``
    is the source's config when ``config`` has already been changed (default: ``config``)."""
    from minitron_fast.models import view_class_for_config

    src = config if src_config is None else src_config
    view_cls = view_class_for_config(src)
    new = view_cls.config_for(src, geo, plan.layers)
    for k in view_cls.pruned_config_keys:
        if hasattr(new, k):
            setattr(config, k, getattr(new, k))
    return config


def pruned_config(config: Any, plan: Plan) -> Any:
    """A new config describing ``plan``'s target (``config`` untouched)."""
    return update_config_(copy.deepcopy(config), plan.target_geometry(), plan, config)
