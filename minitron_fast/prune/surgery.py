"""Width and depth surgery on a loaded model, in place, through the ``ModelView``.

Every parameter tied to a pruned unit is sliced (LLM-Pruner's dependency groups):

| unit            | sliced                                                                   |
|-----------------|--------------------------------------------------------------------------|
| query head      | q_proj rows (+bias), o_proj columns                                      |
| KV group        | k_proj / v_proj rows (+bias) (its query heads go with it)                |
| MLP neuron      | gate_proj / up_proj rows (+bias), down_proj columns                      |
| hidden channel  | embeddings and lm_head columns (tied or not), every projection's input   |
|                 | columns or output rows (+o/down bias), every norm's weight (and bias)    |
| layer           | the decoder layer, with the survivors' ``layer_idx`` renumbered          |

Slicing goes through ``minitron_fast.ops.compact.compact_``: kept rows/columns are compacted
inside each parameter's own buffer and freed pages are returned to the OS, so the model never
exists twice in memory; each ``nn.Parameter`` stays the same object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from minitron_fast.models import ModelView, get_view
from minitron_fast.ops.compact import compact_2d_
from minitron_fast.artifacts.plan import Plan, PlanError, validate_plan


@dataclass
class Rule:
    """How one parameter is sliced: keep ``rows`` along dim 0 and ``cols`` along dim 1 (None: all)."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        if self.rows is not None:
            out[0] = self.rows.numel()
        if self.cols is not None:
            out[1] = self.cols.numel()
        return tuple(out)


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


def layer_rules(view: ModelView, plan: Plan, src_layer: int, lv: Any) -> Iterator[tuple[nn.Parameter, Rule]]:
    """The (parameter, rule) pairs of one kept decoder layer ``lv`` (source index ``src_layer``)."""
    src = plan.source_geometry()
    hd = src.head_dim
    hid = _maybe(plan.hidden, src.hidden_size)
    q = plan.heads[src_layer]
    kv = plan.kv_heads[src_layer]
    q_rows = None if _maybe(q, src.num_attention_heads) is None else _units_to_rows(q, hd)
    kv_rows = None if _maybe(kv, src.num_key_value_heads) is None else _units_to_rows(kv, hd)
    ff = _maybe(plan.neurons[src_layer], src.intermediate_size)
    for proj, rows in ((lv.q_proj, q_rows), (lv.k_proj, kv_rows), (lv.v_proj, kv_rows)):
        yield proj.weight, Rule(rows, hid)
        if proj.bias is not None:
            yield proj.bias, Rule(rows)
    yield lv.o_proj.weight, Rule(hid, q_rows)
    if lv.o_proj.bias is not None:
        yield lv.o_proj.bias, Rule(hid)
    for proj in (lv.gate_proj, lv.up_proj):
        yield proj.weight, Rule(ff, hid)
        if proj.bias is not None:
            yield proj.bias, Rule(ff)
    yield lv.down_proj.weight, Rule(hid, ff)
    if lv.down_proj.bias is not None:
        yield lv.down_proj.bias, Rule(hid)
    for norm in (lv.input_norm, lv.post_attn_norm):
        for p in norm.parameters(recurse=False):
            yield p, Rule(hid)


def model_rules(view: ModelView, plan: Plan) -> Iterator[tuple[nn.Parameter, Rule]]:
    """The (parameter, rule) pairs outside the decoder layers: embeddings, final norm, lm_head."""
    hid = _maybe(plan.hidden, plan.source_geometry().hidden_size)
    yield view.embed_tokens.weight, Rule(None, hid)
    for p in view.final_norm.parameters(recurse=False):
        yield p, Rule(hid)
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
    (``in_features``, ``num_key_value_groups``, ...) and the config are updated to describe
    the new shape exactly.

    Example:
        >>> plan = make_plan(model, "scores.safetensors", "hidden=48,ffn=64")
        >>> apply_plan(model, plan); model.config.hidden_size
        48
    """
    view = get_view(model)
    geo = validate_plan(plan, model.config)
    src_layer_types = list(getattr(model.config, "layer_types", None) or [])
    # 1. depth: drop layers (their memory goes with the last reference)
    keep = set(plan.layers)
    layers = view.decoder_layers
    for i in range(len(layers) - 1, -1, -1):
        if i not in keep:
            del layers[i]
    view.refresh()
    for new_i, lv in enumerate(view.layers):
        for mod in (lv.module, lv.attn):
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_i
    # 2. width: compact every parameter in place (one pass per tensor over both axes with _C)
    rules = all_rules(view, plan)
    it = rules
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(rules, desc="pruning", unit="tensor")
    for p, r in it:
        compact_2d_(p, r.rows, r.cols, impl=impl, release=release)
    # 3. module attributes that cache sizes
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = tuple(mod.weight.shape)
    for lv in view.layers:
        if hasattr(lv.attn, "num_key_value_groups"):
            lv.attn.num_key_value_groups = geo.num_attention_heads // geo.num_key_value_heads
        if hasattr(lv.attn, "head_dim"):
            lv.attn.head_dim = geo.head_dim
    # 4. the config, in place (modules hold references to it)
    update_config_(model.config, geo, plan, src_layer_types)
    view.refresh()
    return model


def update_config_(config: Any, geo: Any, plan: Plan, src_layer_types: list[str] | None = None) -> Any:
    """Makes ``config`` describe ``geo`` exactly (head_dim written explicitly); per-layer lists
    (``layer_types``) keep the entries of the kept layers."""
    from minitron_fast.models import view_class_for_config

    new = view_class_for_config(config).config_for(config, geo)
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "vocab_size"):
        setattr(config, k, getattr(new, k))
    if src_layer_types:
        config.layer_types = [src_layer_types[i] for i in plan.layers]
    return config


def pruned_config(config: Any, plan: Plan) -> Any:
    """A new config describing ``plan``'s target (``config`` untouched)."""
    import copy

    new = copy.deepcopy(config)
    layer_types = list(getattr(config, "layer_types", None) or [])
    return update_config_(new, plan.target_geometry(), plan, layer_types)
