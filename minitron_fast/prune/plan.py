"""Prune planning: which units of each axis to keep, chosen from importance scores.

The plan itself (the ``Plan`` dataclass, its JSON file and ``validate_plan``) is an artifact:
``minitron_fast.artifacts.plan``. The scores are read through ``minitron_fast.artifacts.scores``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from minitron_fast.artifacts.plan import Plan, PlanError, config_of, validate_plan
from minitron_fast.artifacts.scores import ImportanceScores, ScoresFileError, scores_tensors
from minitron_fast.artifacts.targets import target_geometry
from minitron_fast.models import Geometry, view_class_for_config

DEPTH_METRICS = ("block_importance", "lm_loss", "lm_loss_block")
DEPTH_MODES = ("contiguous", "top")


def _score(scores: Mapping[str, torch.Tensor], key: str, n: int, why: str) -> torch.Tensor:
    if key not in scores:
        raise PlanError(f"scores file has no {key!r}, needed to {why}")
    t = scores[key].flatten().float()
    if t.numel() != n:
        raise PlanError(f"scores {key!r} has {t.numel()} entries but the model has {n}; "
                        "is this scores file from another model?")
    if not torch.isfinite(t).all():
        raise PlanError(f"scores {key!r} contains NaN or infinite values")
    return t


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, sorted ascending (ties: lower index wins)."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return sorted(int(i) for i in order)


def _contiguous_drop(scores: torch.Tensor, n_drop: int) -> list[int]:
    """Start..end of the contiguous block of ``n_drop`` layers with the lowest summed importance."""
    L = scores.numel()
    best, best_s = None, None
    for s in range(0, L - n_drop + 1):
        tot = float(scores[s:s + n_drop].double().sum())
        if best is None or tot < best - 1e-12:
            best, best_s = tot, s
    return list(range(best_s, best_s + n_drop))


# -- making a plan ----------------------------------------------------------------------------------

def make_plan(model_or_config: Any, scores: str | os.PathLike | ImportanceScores | Mapping[str, torch.Tensor],
              target: str | Mapping[str, Any] | Geometry, *, depth_metric: str = "block_importance",
              depth_mode: str = "contiguous", budget_axes: str = "width") -> Plan:
    """Chooses the units to keep for ``target`` from importance ``scores`` (higher = more important).

    Args:
        model_or_config: a supported HF model, its ``ModelView``, or its config.
        scores: path of the importance safetensors file, or a dict of the same keys:
            ``layers.{i}.heads [n_heads]``, ``layers.{i}.kv_groups [n_kv]``,
            ``layers.{i}.neurons [ffn]``, ``channels [hidden]``, ``depth.<metric> [n_layers]``.
            Only the axes the target prunes need scores.
        target: ``"hidden=3072,ffn=9216,heads=32,kv_heads=8,layers=32"`` (missing keys keep the
            source value), ``"params=4.5e9"`` / ``"params=0.5x"``, a dict, or a ``Geometry``.
        depth_metric: ``depth.<metric>`` to rank layers by: "block_importance", "lm_loss" (loss
            with that layer skipped), or "lm_loss_block" (loss with each contiguous block of the
            size to drop skipped; the lowest is dropped, whatever ``depth_mode``).
        depth_mode: ``"contiguous"`` removes the contiguous block of lowest total importance
            (the second Minitron paper's choice); ``"top"`` keeps the individually top layers.
        budget_axes: for a ``params=`` target: "width", "ffn" or "depth".

    Query heads are ranked within their KV group and every kept group keeps the same number of
    heads; KV groups are kept by ``layers.{i}.kv_groups`` when ``kv_heads`` shrinks.

    Example:
        >>> plan = make_plan(model, "scores.safetensors", "hidden=3072,ffn=9216")
        >>> apply_plan(model, plan)
    """
    config = config_of(model_or_config)
    view_cls = view_class_for_config(config)
    src = view_cls.geometry_of(config)
    geo = target_geometry(config, target, budget_axes=budget_axes)
    if depth_metric not in DEPTH_METRICS:
        raise PlanError(f"depth metric {depth_metric!r} is not one of {DEPTH_METRICS}")
    if depth_mode not in DEPTH_MODES:
        raise PlanError(f"depth mode {depth_mode!r} is not one of {DEPTH_MODES}")
    try:
        S, info = scores_tensors(scores)
    except ScoresFileError as exc:
        raise PlanError(str(exc)) from None
    L = src.num_hidden_layers

    # layers
    if geo.num_hidden_layers < L:
        n_drop = L - geo.num_hidden_layers
        if depth_metric == "lm_loss_block":
            # LM loss with layers [s, s+k) skipped, per start s: drop the block whose removal hurts least
            d = _score(S, "depth.lm_loss_block", L - n_drop + 1,
                       f"drop a block of {n_drop} layers (the file's block size must be {n_drop})")
            s0 = int(torch.argmin(d))
            layers = [i for i in range(L) if not s0 <= i < s0 + n_drop]
        else:
            d = _score(S, f"depth.{depth_metric}", L, f"choose {geo.num_hidden_layers} of {L} layers")
            if depth_mode == "top":
                layers = top_k(d, geo.num_hidden_layers)
            else:
                drop = set(_contiguous_drop(d, n_drop))
                layers = [i for i in range(L) if i not in drop]
    else:
        layers = list(range(L))

    # hidden channels (one set shared by every layer: the residual stream)
    if geo.hidden_size < src.hidden_size:
        hidden = top_k(_score(S, "channels", src.hidden_size, f"prune hidden {src.hidden_size}->{geo.hidden_size}"),
                       geo.hidden_size)
    else:
        hidden = list(range(src.hidden_size))

    nq, nkv = src.num_attention_heads, src.num_key_value_heads
    gsize, gsize_t = nq // nkv, geo.num_attention_heads // geo.num_key_value_heads
    heads: dict[int, list[int]] = {}
    kvs: dict[int, list[int]] = {}
    neurons: dict[int, list[int]] = {}
    for i in layers:
        if geo.num_key_value_heads < nkv:
            kv = top_k(_score(S, f"layers.{i}.kv_groups", nkv, f"prune KV heads {nkv}->{geo.num_key_value_heads}"),
                       geo.num_key_value_heads)
        else:
            kv = list(range(nkv))
        if gsize_t < gsize:
            hs = _score(S, f"layers.{i}.heads", nq, f"prune query heads {nq}->{geo.num_attention_heads}")
            q = []
            for g in kv:  # rank query heads within their own KV group
                q += [g * gsize + j for j in top_k(hs[g * gsize:(g + 1) * gsize], gsize_t)]
        else:
            q = [g * gsize + j for g in kv for j in range(gsize)]
        if geo.intermediate_size < src.intermediate_size and not _is_sparse(config, i):
            nr = top_k(_score(S, f"layers.{i}.neurons", src.intermediate_size,
                              f"prune FFN {src.intermediate_size}->{geo.intermediate_size}"), geo.intermediate_size)
        else:  # all kept; a MoE layer has no dense neurons (its experts' are in expert_neurons)
            nr = list(range(geo.intermediate_size if _is_sparse(config, i) else src.intermediate_size))
        heads[i], kvs[i], neurons[i] = sorted(q), kv, nr

    experts, expert_neurons = _moe_kept(config, S, src, geo, layers) if src.is_moe else ({}, {})
    info = dict(info, depth_metric=depth_metric, depth_mode=depth_mode)
    plan = Plan(source=dict(src.as_dict(), family=view_cls.family), target=dict(geo.as_dict(), family=view_cls.family),
                layers=layers, hidden=hidden, heads=heads, kv_heads=kvs, neurons=neurons, info=info,
                experts=experts, expert_neurons=expert_neurons)
    validate_plan(plan, config)
    return plan


def _is_sparse(config: Any, i: int) -> bool:
    """Whether layer ``i`` is a MoE layer (its neurons are per expert, in ``expert_neurons``)."""
    from minitron_fast.models.moe import is_sparse_layer

    return is_sparse_layer(config, i)


def _moe_kept(config: Any, S: Mapping[str, torch.Tensor], src: Geometry, geo: Geometry,
              layers: list[int]) -> tuple[dict[int, list[int]], dict[int, list[list[int]]]]:
    """Per kept MoE layer: its top ``geo.num_experts`` experts by ``layers.{i}.experts`` and,
    per kept expert, its own top ``geo.moe_intermediate_size`` neurons by
    ``layers.{i}.expert_neurons [E, F]``."""
    from minitron_fast.models.moe import is_sparse_layer

    E, F, Et, Ft = src.num_experts, src.moe_intermediate_size, geo.num_experts, geo.moe_intermediate_size
    experts: dict[int, list[int]] = {}
    neurons: dict[int, list[list[int]]] = {}
    for i in layers:
        if not is_sparse_layer(config, i):
            continue
        ex = (top_k(_score(S, f"layers.{i}.experts", E, f"prune experts {E}->{Et}"), Et) if Et < E
              else list(range(E)))
        if Ft < F:
            en = _score(S, f"layers.{i}.expert_neurons", E * F, f"prune expert FFN {F}->{Ft}").view(E, F)
            neurons[i] = [top_k(en[e], Ft) for e in ex]
        else:
            neurons[i] = [list(range(F)) for _ in ex]
        experts[i] = ex
    return experts, neurons


def identity_plan(model_or_config: Any) -> Plan:
    """A plan that keeps everything (useful for tests and for re-exporting)."""
    config = config_of(model_or_config)
    g = view_class_for_config(config).geometry_of(config)
    return make_plan(config, {}, g)
