"""The uniform view of a decoder-only HF causal LM that every stage works through.

Families differ in attribute names, biases and how head_dim is configured; a ``ModelView``
hides that. Stages never touch family-specific attribute names: they ask the view.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """The shape of a model: everything width and depth pruning can change, plus the vocabulary."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int

    def replace(self, **kw: int) -> "Geometry":
        d = self.as_dict()
        unknown = set(kw) - set(d)
        if unknown:
            raise ValueError(f"unknown geometry keys {sorted(unknown)}; known: {sorted(d)}")
        d.update(kw)
        return Geometry(**d)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class LayerView:
    """One decoder layer: its attention and MLP projections and its two norms."""

    index: int
    module: nn.Module
    attn: nn.Module
    mlp: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    input_norm: nn.Module
    post_attn_norm: nn.Module

    def linears(self) -> dict[str, nn.Linear]:
        return {n: getattr(self, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


class ModelView:
    """Uniform access to a supported HF causal LM (``LlamaForCausalLM`` and friends).

    Attributes:
        family: adapter name ("llama", "mistral", "qwen2").
        model: the wrapped ``PreTrainedModel`` (not copied).
        layers: one ``LayerView`` per decoder layer, in order.
        embed_tokens: ``nn.Embedding [V, H]``; final_norm; lm_head: ``nn.Linear [V, H]``.
        tied: whether lm_head shares its weight with embed_tokens.

    Example:
        >>> view = get_view(model)
        >>> view.geometry().num_key_value_heads, view.layers[0].q_proj.weight.shape
    """

    family: ClassVar[str] = "base"
    hf_classes: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        inner = model.model
        self.decoder_layers: nn.ModuleList = inner.layers
        self.embed_tokens: nn.Embedding = inner.embed_tokens
        self.final_norm: nn.Module = inner.norm
        self.lm_head: nn.Linear = model.lm_head
        self.layers = [self._layer_view(i, layer) for i, layer in enumerate(inner.layers)]

    # -- structure ----------------------------------------------------------------------------
    @staticmethod
    def _layer_view(i: int, layer: nn.Module) -> LayerView:
        a, m = layer.self_attn, layer.mlp
        return LayerView(
            index=i, module=layer, attn=a, mlp=m,
            q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj, o_proj=a.o_proj,
            gate_proj=m.gate_proj, up_proj=m.up_proj, down_proj=m.down_proj,
            input_norm=layer.input_layernorm, post_attn_norm=layer.post_attention_layernorm,
        )

    def refresh(self) -> "ModelView":
        """Re-reads the layers after surgery (layers dropped or replaced)."""
        self.__init__(self.model)
        return self

    @property
    def tied(self) -> bool:
        """Whether lm_head and the input embedding share one weight (transformers ties them by
        making them the same Parameter)."""
        return self.lm_head.weight is self.embed_tokens.weight

    # -- geometry -------------------------------------------------------------------------------
    @classmethod
    def head_dim_of(cls, config: Any) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // config.num_attention_heads

    @classmethod
    def geometry_of(cls, config: Any) -> Geometry:
        return Geometry(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=cls.head_dim_of(config),
            num_hidden_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
        )

    def geometry(self) -> Geometry:
        return self.geometry_of(self.config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.geometry().num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_of(self.config)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @classmethod
    def final_logit_softcap_of(cls, config: Any) -> float | None:
        """The final-logit softcap ``c`` (logits become ``c * tanh(z / c)``; Gemma 2/3), or None."""
        c = getattr(config, "final_logit_softcapping", None)
        return float(c) if c else None

    @property
    def final_logit_softcap(self) -> float | None:
        return self.final_logit_softcap_of(self.config)

    # -- biases (family-specific) ---------------------------------------------------------------
    @classmethod
    def biases_of(cls, config: Any) -> dict[str, bool]:
        """Which projections carry biases: keys qkv, o, mlp."""
        return {"qkv": bool(getattr(config, "attention_bias", False)),
                "o": bool(getattr(config, "attention_bias", False)),
                "mlp": bool(getattr(config, "mlp_bias", False))}

    # -- parameter counts -----------------------------------------------------------------------
    @classmethod
    def count_params(cls, config: Any, geometry: Geometry | None = None) -> dict[str, int]:
        """Parameter counts by component for ``config``'s family at ``geometry`` (default: the
        config's own), computed analytically: keys embed, lm_head (0 when tied), attention, mlp,
        norms, total."""
        g = geometry or cls.geometry_of(config)
        b = cls.biases_of(config)
        H, F, nq, nkv, hd, L, V = (g.hidden_size, g.intermediate_size, g.num_attention_heads,
                                   g.num_key_value_heads, g.head_dim, g.num_hidden_layers, g.vocab_size)
        attn = H * nq * hd + 2 * H * nkv * hd + nq * hd * H
        attn += (nq * hd + 2 * nkv * hd) * b["qkv"] + H * b["o"]
        mlp = 3 * H * F + (2 * F + H) * b["mlp"]
        norms = 2 * H * L + H
        embed = V * H
        lm_head = 0 if getattr(config, "tie_word_embeddings", False) else V * H
        out = {"embed": embed, "lm_head": lm_head, "attention": attn * L, "mlp": mlp * L, "norms": norms}
        out["total"] = sum(out.values())
        return out

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by component, read off the live modules (tied weights counted once)."""
        def n(mods: list[nn.Module]) -> int:
            seen, total = set(), 0
            for mod in mods:
                for p in mod.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        total += p.numel()
            return total

        out = {
            "embed": n([self.embed_tokens]),
            "lm_head": 0 if self.tied else n([self.lm_head]),
            "attention": n([lv.attn for lv in self.layers]),
            "mlp": n([lv.mlp for lv in self.layers]),
            "norms": n([lv.input_norm for lv in self.layers] + [lv.post_attn_norm for lv in self.layers] + [self.final_norm]),
        }
        out["total"] = sum(out.values())
        return out

    # -- describing a new shape -----------------------------------------------------------------
    @classmethod
    def config_for(cls, config: Any, geometry: Geometry) -> Any:
        """A deep copy of ``config`` describing ``geometry`` exactly. head_dim is always written
        explicitly, since hidden_size // heads no longer holds after width pruning."""
        new = copy.deepcopy(config)
        g = geometry
        new.hidden_size = g.hidden_size
        new.intermediate_size = g.intermediate_size
        new.num_attention_heads = g.num_attention_heads
        new.num_key_value_heads = g.num_key_value_heads
        new.head_dim = g.head_dim
        new.num_hidden_layers = g.num_hidden_layers
        new.vocab_size = g.vocab_size
        if getattr(new, "layer_types", None) is not None:
            new.layer_types = list(new.layer_types)[: g.num_hidden_layers]
        return new

    def info(self) -> dict[str, Any]:
        """The ``minitron-fast info`` record."""
        return info_record(self.family, self.config, self.param_counts()["total"])


def info_record(family: str, config: Any, num_parameters: int) -> dict[str, Any]:
    g = ModelView.geometry_of(config)
    return {"family": family, **{k: v for k, v in g.as_dict().items()}, "num_parameters": int(num_parameters)}


def parameter_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
