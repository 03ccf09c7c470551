"""Mixture-of-experts support, shared by every MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE).

A family file only names what differs (the config key of the expert width, whether a shared
expert exists, the names ``save_pretrained`` writes); everything else lives here:

- the layer view: a sparse layer's ``MoEBlock`` (router ``[E, H]``, stacked experts, optional
  shared expert and its sigmoid gate); dense layers among MoE layers keep the plain MLP fields;
- the geometry (``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``), the
  analytic parameter count, and the config of a pruned shape, with ``mlp_only_layers`` /
  ``decoder_sparse_step`` remapped so each kept layer keeps its own type (dense or MoE);
- the expert tensors' layout and the per-expert names on disk.

transformers 5 keeps experts as stacked 3-D tensors in memory (``experts.gate_up_proj
[E, 2F, H]``: gate rows, then up rows; ``experts.down_proj [E, H, F]``; router ``gate.weight
[E, H]``), while ``save_pretrained`` writes one 2-D tensor per expert under the names of the
original checkpoints (Mixtral ``block_sparse_moe.experts.{e}.w1/w2/w3``, Qwen
``mlp.experts.{e}.gate_proj/up_proj/down_proj``); both are handled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from minitron_fast.models.base import Geometry, LayerView, ModelView


@dataclass
class MoEBlock:
    """The sparse MLP of one layer.

    Attributes:
        module: the sparse block (``layer.mlp``); router: ``.weight [E, H]``; experts: stacked
        ``.gate_up_proj [E, 2F, H]`` and ``.down_proj [E, H, F]`` with ``.act_fn``; shared: the
        shared expert (a dense MLP) or None; shared_gate: its ``nn.Linear [1, H]`` or None.
    """

    module: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None = None
    shared_gate: nn.Linear | None = None

    @property
    def router_weight(self) -> nn.Parameter:
        """``[E, H]``: one row per expert."""
        return self.router.weight

    @property
    def gate_up_weight(self) -> nn.Parameter:
        """``[E, 2F, H]``: each expert's gate rows, then its up rows."""
        return self.experts.gate_up_proj

    @property
    def down_weight(self) -> nn.Parameter:
        """``[E, H, F]``."""
        return self.experts.down_proj

    @property
    def shared_down(self) -> nn.Linear | None:
        """The shared expert's down projection (its input is the shared expert's neurons), or None."""
        return None if self.shared is None else self.shared.down_proj

    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0])

    @property
    def ffn(self) -> int:
        return int(self.down_weight.shape[-1])

    @staticmethod
    def router_logits(router_output: Any) -> torch.Tensor:
        """The ``[N, E]`` logits in the router's output ``(logits, top-k weights, top-k indices)``."""
        return router_output[0]

    def expert_mlp(self, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e`` on tokens ``x [n, H]``: ``(act(gate) * up [n, F], output [n, H])``."""
        gate, up = nn.functional.linear(x, self.gate_up_weight[e]).chunk(2, dim=-1)
        h = self.experts.act_fn(gate) * up
        return h, nn.functional.linear(h, self.down_weight[e])


@dataclass
class MoELayerView(LayerView):
    """A decoder layer of a MoE family: ``moe`` is set on sparse layers (whose ``gate_proj`` /
    ``up_proj`` / ``down_proj`` are None), None on dense ones.

    ``sliced_params`` describes every parameter but the router and the stacked experts, whose
    rules (an expert axis, and each expert its own neurons) come from
    ``prune.surgery.moe_layer_rules``; the shared expert and its gate lose hidden channels only."""

    moe: MoEBlock | None = None

    def sliced_params(self):
        yield from super().sliced_params()
        if self.moe is None:
            return
        if self.moe.shared is not None:
            s = self.moe.shared
            yield s.gate_proj.weight, None, ("hidden",)
            yield s.up_proj.weight, None, ("hidden",)
            yield s.down_proj.weight, ("hidden",), None
        if self.moe.shared_gate is not None:
            yield self.moe.shared_gate.weight, None, ("hidden",)


def sparse_layers(config: Any, n: int | None = None) -> list[bool]:
    """Whether each of the first ``n`` (default all) decoder layers of ``config`` is a MoE layer
    (transformers' own rule: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step ==
    0``; Mixtral: every layer)."""
    n = config.num_hidden_layers if n is None else n
    if (getattr(config, "num_experts", 0) or 0) <= 0:
        return [False] * n
    only = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return [i not in only and (i + 1) % step == 0 for i in range(n)]


def is_sparse_layer(config: Any, i: int) -> bool:
    """Whether decoder layer ``i`` of ``config`` is a MoE layer (see ``sparse_layers``)."""
    return sparse_layers(config, i + 1)[i]


class MoEModelView(ModelView):
    """``ModelView`` of a MoE family. Subclasses set the class attributes below."""

    expert_ffn_key: ClassVar[str] = "moe_intermediate_size"  # config key of each expert's width
    has_shared_expert: ClassVar[bool] = False
    saved_moe_prefix: ClassVar[str] = "mlp"  # the sparse block's name in saved checkpoints
    # role -> the per-expert tensor name save_pretrained writes (under {saved_moe_prefix}.experts.{e}.)
    saved_expert_names: ClassVar[dict[str, str]] = {"gate": "gate_proj.weight", "up": "up_proj.weight",
                                                    "down": "down_proj.weight"}
    # the in-memory (state-dict) names of a sparse block's router and stacked experts, after "{layer}."
    memory_names: ClassVar[dict[str, str]] = {"router": "mlp.gate.weight", "gate_up": "mlp.experts.gate_up_proj",
                                              "down": "mlp.experts.down_proj"}
    # the config keys surgery rewrites: also the expert axes and which layers are MoE
    pruned_config_keys: ClassVar[tuple[str, ...]] = ModelView.pruned_config_keys + (
        "num_experts", "num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step")

    def layer_view(self, i: int, layer: nn.Module) -> LayerView:
        a, m = layer.self_attn, layer.mlp
        sparse = hasattr(m, "experts")
        moe = MoEBlock(module=m, router=m.gate, experts=m.experts, shared=getattr(m, "shared_expert", None),
                       shared_gate=getattr(m, "shared_expert_gate", None)) if sparse else None
        return MoELayerView(
            index=i, module=layer, attn=a, mlp=m,
            q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj, o_proj=a.o_proj,
            gate_proj=None if sparse else m.gate_proj, up_proj=None if sparse else m.up_proj,
            down_proj=None if sparse else m.down_proj, act_fn=m.experts.act_fn if sparse else m.act_fn,
            input_norm=layer.input_layernorm, post_attn_norm=layer.post_attention_layernorm,
            head_norms=tuple(n for n in (getattr(a, "q_norm", None), getattr(a, "k_norm", None)) if n is not None),
            moe=moe,
        )

    # -- geometry ---------------------------------------------------------------------------------
    @classmethod
    def geometry_of(cls, config: Any) -> Geometry:
        g = super().geometry_of(config)
        return g.replace(num_experts=int(config.num_experts), num_experts_per_tok=int(config.num_experts_per_tok),
                         moe_intermediate_size=int(getattr(config, cls.expert_ffn_key)))

    @classmethod
    def normalize_geometry(cls, config: Any, g: Geometry) -> Geometry:
        """``g`` made consistent for this family; ``num_experts_per_tok`` is capped at the
        number of experts. (Mixtral overrides it: its FFN and expert widths are one field.)"""
        return g.replace(num_experts_per_tok=min(g.num_experts_per_tok, g.num_experts))

    @classmethod
    def active_ffn_of(cls, config: Any, geometry: Geometry) -> int:
        g = geometry
        active = g.moe_intermediate_size * g.num_experts_per_tok
        if cls.has_shared_expert:
            active += int(config.shared_expert_intermediate_size)
        return max(g.intermediate_size, active)  # (dense layers among the MoE ones keep intermediate_size)

    @classmethod
    def count_params(cls, config: Any, geometry: Geometry | None = None) -> dict[str, int]:
        g = cls.normalize_geometry(config, geometry or cls.geometry_of(config))
        out = super().count_params(config, g)
        H, F, E, Fm = g.hidden_size, g.intermediate_size, g.num_experts, g.moe_intermediate_size
        b = cls.biases_of(config)["mlp"]
        dense = 3 * H * F + (2 * F + H) * b
        sparse = E * H + E * 3 * H * Fm
        if cls.has_shared_expert:
            Fs = int(config.shared_expert_intermediate_size)
            sparse += 3 * H * Fs + H
        n_sparse = sum(sparse_layers(config, g.num_hidden_layers))
        out["mlp"] = n_sparse * sparse + (g.num_hidden_layers - n_sparse) * dense
        out["total"] = sum(v for k, v in out.items() if k != "total")
        return out

    @classmethod
    def config_for(cls, config: Any, geometry: Geometry, kept_layers: list[int] | None = None) -> Any:
        """Also the expert axes, and each kept layer keeps its own type (dense or MoE): with
        dense layers among MoE layers, ``mlp_only_layers`` lists the kept dense ones explicitly
        and ``decoder_sparse_step`` becomes 1."""
        g = cls.normalize_geometry(config, geometry)
        new = super().config_for(config, g, kept_layers)
        new.num_experts = g.num_experts
        new.num_experts_per_tok = g.num_experts_per_tok
        setattr(new, cls.expert_ffn_key, g.moe_intermediate_size)
        if hasattr(config, "mlp_only_layers"):
            kept = list(range(g.num_hidden_layers)) if kept_layers is None else list(kept_layers)
            types = sparse_layers(config)
            new.mlp_only_layers = [j for j, i in enumerate(kept) if not types[i]]
            new.decoder_sparse_step = 1
        return new

    def info(self) -> dict[str, Any]:
        rec = super().info()
        rec.update(num_experts=int(self.config.num_experts), num_experts_per_tok=int(self.config.num_experts_per_tok),
                   moe_intermediate_size=int(getattr(self.config, self.expert_ffn_key)),
                   moe_layers=sum(lv.moe is not None for lv in self.layers))
        if self.has_shared_expert:
            rec["shared_expert_intermediate_size"] = int(self.config.shared_expert_intermediate_size)
        return rec

    # -- updating module attributes after surgery -----------------------------------------------
    def sync_modules_(self) -> None:
        """Also the cached sizes of the MoE modules (experts, top-k, widths)."""
        super().sync_modules_()
        geo = self.geometry()
        for lv in self.layers:
            if lv.moe is None:
                continue
            for mod in (lv.moe.router, lv.moe.experts, lv.moe.module):
                if hasattr(mod, "num_experts"):
                    mod.num_experts = geo.num_experts
                if hasattr(mod, "top_k"):
                    mod.top_k = geo.num_experts_per_tok
                if hasattr(mod, "hidden_dim"):
                    mod.hidden_dim = geo.hidden_size
            lv.moe.experts.intermediate_dim = geo.moe_intermediate_size
        for name, v in (("num_experts", geo.num_experts), ("num_experts_per_tok", geo.num_experts_per_tok)):
            if hasattr(self.model, name):
                setattr(self.model, name, v)

    # -- names on disk -----------------------------------------------------------------------------
    @classmethod
    def saved_expert_pattern(cls) -> re.Pattern:
        """Matches ``{i}.{saved_moe_prefix}.experts.{e}.{name}`` after the layer-list prefix;
        groups: layer, expert, name."""
        names = "|".join(re.escape(n) for n in cls.saved_expert_names.values())
        return re.compile(rf"^(\d+)\.{re.escape(cls.saved_moe_prefix)}\.experts\.(\d+)\.({names})$")

    @classmethod
    def saved_expert_name(cls, e: int, name: str) -> str:
        """The on-disk name of expert ``e``'s tensor ``name`` after ``"{layer}."``."""
        return f"{cls.saved_moe_prefix}.experts.{e}.{name}"

    @classmethod
    def saved_router_name(cls) -> str:
        return f"{cls.saved_moe_prefix}.gate.weight"


__all__ = ["MoEBlock", "MoELayerView", "MoEModelView", "is_sparse_layer", "sparse_layers"]
