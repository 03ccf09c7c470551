"""The prune plan file: which units of each axis to keep, in the source model's numbering.

A plan records the source and target geometry and every kept index: the kept layers, the kept
hidden channels, and per kept layer the kept query heads, KV groups and MLP neurons (and, per
kept MoE layer, the kept experts and each kept expert's own neurons). It is JSON
(``Plan.save`` / ``Plan.load``), validated against the source model's config before any surgery
(:func:`validate_plan`). Choosing the indices from importance scores is the prune stage's job
(``minitron_fast.prune.make_plan``); this module owns only the file and its checks.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from minitron_fast.artifacts.targets import TargetError, check_geometry
from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_write_json
from minitron_fast.models import Geometry, ModelView, view_class_for_config

PLAN_VERSION = 1


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
                      (("experts", "num_experts"), ("top_k", "num_experts_per_tok"),
                       ("expert_ffn", "moe_intermediate_size"))]
        return ", ".join(parts)


def config_of(model_or_config: Any) -> Any:
    if isinstance(model_or_config, ModelView):
        return model_or_config.config
    return getattr(model_or_config, "config", model_or_config)


def validate_plan(plan: Plan, model_or_config: Any) -> Geometry:
    """Checks ``plan`` against the source model's config before any surgery: same source shape,
    a reachable target, and every kept index list in range, sorted, unique and of the target's
    length, with uniform GQA groups. Returns the target geometry. Raises PlanError."""
    config = config_of(model_or_config)
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


__all__ = ["PLAN_VERSION", "Plan", "PlanError", "validate_plan"]
