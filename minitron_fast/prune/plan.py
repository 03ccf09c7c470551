"""Prune plans: which units of each axis to keep, chosen from importance scores.

A plan records the source and target geometry and every kept index (in the source's
numbering): the kept layers, the kept hidden channels, and per kept layer the kept query heads,
KV groups and MLP neurons. It is JSON, validated against the source model before any surgery.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_write_json
from minitron_fast.models import Geometry, ModelView, view_class_for_config
from minitron_fast.models.export import file_sha256
from minitron_fast.prune.targets import TargetError, check_geometry, target_geometry

PLAN_VERSION = 1
DEPTH_METRICS = ("block_importance", "lm_loss", "lm_loss_block")
DEPTH_MODES = ("contiguous", "top")


class PlanError(MinitronError, ValueError):
    """A plan or scores file that does not fit the model."""


@dataclass
class Plan:
    """What to keep. Indices are in the source model's numbering and sorted.

    Attributes:
        source: source geometry (``Geometry.as_dict()``) plus ``family``.
        target: target geometry dict.
        layers: kept decoder layers ``[n_layers_t]``.
        hidden: kept hidden channels ``[hidden_t]``.
        heads / kv_heads / neurons: per kept layer (keyed by source index), kept query heads
            ``[heads_t]``, KV groups ``[kv_heads_t]``, neurons ``[ffn_t]``.
        info: free-form provenance (scores file hash, depth metric, ...).
        experts: per kept MoE layer, kept experts ``[num_experts_t]`` (router rows go with them).
        expert_neurons: per kept MoE layer, per kept expert (in ``experts`` order), its own kept
            neurons ``[moe_intermediate_size_t]``. Both empty on dense models.
    """

    source: dict[str, Any]
    target: dict[str, Any]
    layers: list[int]
    hidden: list[int]
    heads: dict[int, list[int]]
    kv_heads: dict[int, list[int]]
    neurons: dict[int, list[int]]
    info: dict[str, Any] = field(default_factory=dict)
    experts: dict[int, list[int]] = field(default_factory=dict)
    expert_neurons: dict[int, list[list[int]]] = field(default_factory=dict)

    # -- (de)serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION, "source": self.source, "target": self.target, "info": self.info,
            "kept": {
                "layers": self.layers, "hidden": self.hidden,
                "per_layer": {str(i): {"heads": self.heads[i], "kv_heads": self.kv_heads[i], "neurons": self.neurons[i],
                                       **({"experts": self.experts[i], "expert_neurons": self.expert_neurons[i]}
                                          if i in self.experts else {})}
                              for i in self.layers},
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        try:
            if d.get("version") != PLAN_VERSION:
                raise PlanError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
            kept = d["kept"]
            per = {int(k): v for k, v in kept["per_layer"].items()}
            layers = [int(i) for i in kept["layers"]]
            return cls(source=dict(d["source"]), target=dict(d["target"]), layers=layers,
                       hidden=[int(i) for i in kept["hidden"]],
                       heads={i: [int(x) for x in per[i]["heads"]] for i in layers},
                       kv_heads={i: [int(x) for x in per[i]["kv_heads"]] for i in layers},
                       neurons={i: [int(x) for x in per[i]["neurons"]] for i in layers},
                       info=dict(d.get("info", {})),
                       experts={i: [int(x) for x in per[i]["experts"]] for i in layers if "experts" in per[i]},
                       expert_neurons={i: [[int(x) for x in e] for e in per[i]["expert_neurons"]]
                                       for i in layers if "experts" in per[i]})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"malformed prune plan: missing or bad field ({type(exc).__name__}: {exc})") from exc

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except FileNotFoundError:
            raise PlanError(f"plan file {p} does not exist") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {p} is not valid JSON: {exc}") from exc

    def target_geometry(self) -> Geometry:
        return Geometry(**{k: int(v) for k, v in self.target.items() if k in Geometry.__dataclass_fields__})

    def source_geometry(self) -> Geometry:
        return Geometry(**{k: int(v) for k, v in self.source.items() if k in Geometry.__dataclass_fields__})

    def summary(self) -> str:
        s, t = self.source_geometry(), self.target_geometry()
        parts = [f"{k} {getattr(s, f)}->{getattr(t, f)}" for k, f in
                 (("hidden", "hidden_size"), ("ffn", "intermediate_size"), ("heads", "num_attention_heads"),
                  ("kv_heads", "num_key_value_heads"), ("layers", "num_hidden_layers"))]
        if s.is_moe:
            parts += [f"{k} {getattr(s, f)}->{getattr(t, f)}" for k, f in
                      (("experts", "num_experts"), ("top_k", "num_experts_per_tok"), ("expert_ffn", "moe_intermediate_size"))]
        return ", ".join(parts)


# -- scores ---------------------------------------------------------------------------------------

def load_scores(scores: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads an importance scores file (safetensors, fp32, see DESIGN.md) or takes a dict (or an
    in-memory scores object with ``to_tensors()`` giving that dict, as the importance stage returns).
    Returns ``(tensors, info)`` where ``info`` holds the file's sha256, path and metadata."""
    if hasattr(scores, "to_tensors"):
        scores = scores.to_tensors()
    if isinstance(scores, Mapping):
        return {k: torch.as_tensor(v).float() for k, v in scores.items()}, {"scores_file": None}
    from safetensors import SafetensorError, safe_open

    p = Path(scores)
    if not p.is_file():
        raise PlanError(f"scores file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PlanError(f"cannot read scores file {p} as safetensors: {exc}") from exc
    return tensors, {"scores_file": str(p), "scores_sha256": file_sha256(p), "scores_metadata": meta}


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

def _config_of(model_or_config: Any) -> Any:
    if isinstance(model_or_config, ModelView):
        return model_or_config.config
    return getattr(model_or_config, "config", model_or_config)


def make_plan(model_or_config: Any, scores: str | os.PathLike | Mapping[str, torch.Tensor],
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
    config = _config_of(model_or_config)
    view_cls = view_class_for_config(config)
    src = view_cls.geometry_of(config)
    geo = target_geometry(config, target, budget_axes=budget_axes)
    if depth_metric not in DEPTH_METRICS:
        raise PlanError(f"depth metric {depth_metric!r} is not one of {DEPTH_METRICS}")
    if depth_mode not in DEPTH_MODES:
        raise PlanError(f"depth mode {depth_mode!r} is not one of {DEPTH_MODES}")
    S, info = load_scores(scores)
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


def validate_plan(plan: Plan, model_or_config: Any) -> Geometry:
    """Checks ``plan`` against the source model's config before any surgery: same source shape,
    a reachable target, and every kept index list in range, sorted, unique and of the target's
    length, with uniform GQA groups. Returns the target geometry. Raises PlanError."""
    config = _config_of(model_or_config)
    view_cls = view_class_for_config(config)
    src = view_cls.geometry_of(config)
    if plan.source_geometry() != src:
        raise PlanError(f"the plan was made for another model: plan source {plan.source_geometry()} "
                        f"but this model is {src}")
    geo = plan.target_geometry()
    try:
        check_geometry(config, geo)
    except TargetError as exc:
        raise PlanError(str(exc)) from exc

    def idx(name: str, xs: list[int], n: int, limit: int) -> None:
        if len(xs) != n:
            raise PlanError(f"plan keeps {len(xs)} {name} but its target says {n}")
        if any(not 0 <= x < limit for x in xs):
            raise PlanError(f"plan {name} indices must lie in [0, {limit})")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise PlanError(f"plan {name} indices must be strictly increasing")

    idx("layers", plan.layers, geo.num_hidden_layers, src.num_hidden_layers)
    idx("hidden channels", plan.hidden, geo.hidden_size, src.hidden_size)
    gsize = src.num_attention_heads // src.num_key_value_heads
    gsize_t = geo.num_attention_heads // geo.num_key_value_heads
    for i in plan.layers:
        if i not in plan.heads or i not in plan.kv_heads or i not in plan.neurons:
            raise PlanError(f"plan has no per-layer entry for kept layer {i}")
        idx(f"layer {i} query heads", plan.heads[i], geo.num_attention_heads, src.num_attention_heads)
        idx(f"layer {i} KV heads", plan.kv_heads[i], geo.num_key_value_heads, src.num_key_value_heads)
        idx(f"layer {i} neurons", plan.neurons[i], geo.intermediate_size, src.intermediate_size)
        for g in plan.kv_heads[i]:
            n = sum(1 for h in plan.heads[i] if h // gsize == g)
            if n != gsize_t:
                raise PlanError(f"layer {i}: KV group {g} keeps {n} query heads, expected {gsize_t} "
                                "(every kept group keeps the same number)")
    if src.is_moe:
        from minitron_fast.models.moe import is_sparse_layer

        for i in plan.layers:
            if not is_sparse_layer(config, i):
                if i in plan.experts:
                    raise PlanError(f"plan keeps experts of layer {i}, a dense layer")
                continue
            if i not in plan.experts or i not in plan.expert_neurons:
                raise PlanError(f"plan has no experts for kept MoE layer {i}")
            idx(f"layer {i} experts", plan.experts[i], geo.num_experts, src.num_experts)
            if len(plan.expert_neurons[i]) != len(plan.experts[i]):
                raise PlanError(f"layer {i}: {len(plan.expert_neurons[i])} expert neuron lists for "
                                f"{len(plan.experts[i])} kept experts")
            for e, nr in zip(plan.experts[i], plan.expert_neurons[i]):
                idx(f"layer {i} expert {e} neurons", nr, geo.moe_intermediate_size, src.moe_intermediate_size)
    elif plan.experts:
        raise PlanError("the plan keeps experts but this model is dense")
    return geo


def identity_plan(model_or_config: Any) -> Plan:
    """A plan that keeps everything (useful for tests and for re-exporting)."""
    config = _config_of(model_or_config)
    g = view_class_for_config(config).geometry_of(config)
    return make_plan(config, {}, g)
