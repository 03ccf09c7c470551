"""The uniform view of a decoder-only HF causal LM that every stage works through.

Families differ in attribute names, fused projections, biases, extra norms, the embedding scale,
softcaps and how head_dim is configured; a ``ModelView`` hides that. Stages never touch
family-specific attribute names: they ask the view.

What a stage may rely on, for every family:

- ``LayerView``: the attention and MLP projections (separate ``q/k/v_proj`` or a fused
  ``qkv_proj`` with rows ``[q | k | v]``; separate ``gate/up_proj`` or a fused ``gate_up_proj``
  with rows ``[gate | up]``), ``o_proj`` and ``down_proj``; ``act_fn``; ``input_norm`` (before
  attention) and ``post_attn_norm`` (before the MLP); ``extra_norms`` (other ``[hidden]`` norms,
  e.g. Gemma's post-attention and post-feed-forward norms); ``head_norms`` (per-head
  ``[head_dim]`` norms shared by every head, e.g. Qwen3's ``q_norm``/``k_norm``).
- ``LayerView.sliced_params()``: every parameter of the layer with the unit axes along its rows
  and columns. This is the one description surgery, streaming surgery and exports slice by.
- ``ModelView``: ``embed_tokens``, ``final_norm``, ``lm_head``, ``tied``, the embedding scale
  (``embed_scale_of``), the RMSNorm weight offset (``norm_weight_offset``: Gemma's ``(1 + w)``),
  the softcaps, per-layer attention types, and ``sync_modules_`` (module attributes that cache
  sizes, after surgery).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

# Unit axes a parameter dimension can be made of. "heads" and "kv_heads" units are head_dim wide,
# the others one wide. A dimension is a tuple of such segments laid end to end (a fused qkv_proj's
# rows are ("heads", "kv_heads", "kv_heads")), or None when no pruning axis runs along it.
AXES = ("hidden", "heads", "kv_heads", "ffn")
Segments = tuple[str, ...]


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
    # mixture-of-experts axes (0 on dense models, where ``as_dict`` leaves them out); see models/moe.py
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0

    def replace(self, **kw: int) -> "Geometry":
        d = dict(self.__dict__)
        unknown = set(kw) - set(d)
        if unknown:
            raise ValueError(f"unknown geometry keys {sorted(unknown)}; known: {sorted(d)}")
        d.update(kw)
        return Geometry(**d)

    def as_dict(self) -> dict[str, int]:
        d = dict(self.__dict__)
        if not self.num_experts:
            for k in MOE_FIELDS:
                d.pop(k)
        return d

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


@dataclass
class LayerView:
    """One decoder layer: its attention and MLP projections (separate or fused), activation and norms.

    Exactly one of ``q_proj``/``k_proj``/``v_proj`` (all three) or ``qkv_proj`` is set, and one
    of ``gate_proj``/``up_proj`` or ``gate_up_proj``. ``post_attn_norm`` is the norm whose
    output feeds the MLP (Llama's ``post_attention_layernorm``, Gemma's
    ``pre_feedforward_layernorm``).
    """

    index: int
    module: nn.Module
    attn: nn.Module
    mlp: nn.Module
    o_proj: nn.Linear
    down_proj: nn.Linear | None
    input_norm: nn.Module
    post_attn_norm: nn.Module
    q_proj: nn.Linear | None = None
    k_proj: nn.Linear | None = None
    v_proj: nn.Linear | None = None
    qkv_proj: nn.Linear | None = None
    gate_proj: nn.Linear | None = None
    up_proj: nn.Linear | None = None
    gate_up_proj: nn.Linear | None = None
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    extra_norms: tuple[nn.Module, ...] = ()
    head_norms: tuple[nn.Module, ...] = ()
    attn_kind: str | None = None  # the config's layer_types entry: "full_attention", "sliding_attention"

    # -- projections ---------------------------------------------------------------------------
    def linears(self) -> dict[str, nn.Linear]:
        """The layer's linear modules by their view name (fused ones under their fused name)."""
        names = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                 "down_proj")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP's gate and up projections of ``x [..., H]`` (``[..., F]`` each), fused or not."""
        if self.gate_up_proj is not None:
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)
            return g, u
        return self.gate_proj(x), self.up_proj(x)

    def qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (sharing storage) of the q ``[nq*hd, H]``, k and v ``[nkv*hd, H]`` weights."""
        if self.qkv_proj is None:
            return self.q_proj.weight, self.k_proj.weight, self.v_proj.weight
        w = self.qkv_proj.weight
        kv = (w.shape[0] - self.o_proj.weight.shape[1]) // 2
        q = w.shape[0] - 2 * kv
        return w[:q], w[q:q + kv], w[q + kv:]

    def gate_up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (sharing storage) of the gate and up weights ``[F, H]``."""
        if self.gate_up_proj is None:
            return self.gate_proj.weight, self.up_proj.weight
        w = self.gate_up_proj.weight
        return w[: w.shape[0] // 2], w[w.shape[0] // 2:]

    def hidden_norms(self) -> list[nn.Module]:
        """Every ``[hidden]`` norm of the layer: input, pre-MLP, then the extra ones."""
        return [self.input_norm, self.post_attn_norm, *self.extra_norms]

    # -- what pruning slices ---------------------------------------------------------------------
    def sliced_params(self) -> Iterator[tuple[nn.Parameter, Segments | None, Segments | None]]:
        """Every parameter of the layer as ``(param, row_segments, col_segments)`` (dims 0 and 1;
        a 1-D parameter has only rows). Parameters on no pruning axis (``head_norms``, whose
        weight ``[head_dim]`` every head shares) come with ``(None, None)``. Subclasses (MoE
        layers) extend this; every parameter of ``module`` must appear exactly once."""
        def lin(m: nn.Linear, rows: Segments, cols: Segments):
            yield m.weight, rows, cols
            if m.bias is not None:
                yield m.bias, rows, None

        if self.qkv_proj is not None:
            yield from lin(self.qkv_proj, ("heads", "kv_heads", "kv_heads"), ("hidden",))
        else:
            yield from lin(self.q_proj, ("heads",), ("hidden",))
            yield from lin(self.k_proj, ("kv_heads",), ("hidden",))
            yield from lin(self.v_proj, ("kv_heads",), ("hidden",))
        yield from lin(self.o_proj, ("hidden",), ("heads",))
        for norm in self.head_norms:
            for p in norm.parameters(recurse=False):
                yield p, None, None
        if self.gate_up_proj is not None:
            yield from lin(self.gate_up_proj, ("ffn", "ffn"), ("hidden",))
        elif self.gate_proj is not None:
            yield from lin(self.gate_proj, ("ffn",), ("hidden",))
            yield from lin(self.up_proj, ("ffn",), ("hidden",))
        if self.down_proj is not None:
            yield from lin(self.down_proj, ("hidden",), ("ffn",))
        for norm in self.hidden_norms():
            for p in norm.parameters(recurse=False):
                yield p, ("hidden",), None


class ModelView:
    """Uniform access to a supported HF causal LM (``LlamaForCausalLM`` and friends).

    An adapter (one file per family in ``minitron_fast/models/``) sets ``family``, ``hf_classes``
    and ``model_types`` and overrides only what differs from Llama: usually ``layer_view`` (its
    attribute names), and where they apply ``biases_of``, ``norm_weight_offset``,
    ``embed_scale_of``, ``count_params`` terms (``hidden_norms_per_layer``,
    ``head_norms_per_layer``) and ``sync_modules_``.

    Attributes:
        family: adapter name ("llama", "mistral", "qwen2", "qwen3", "gemma2", ...).
        model: the wrapped ``PreTrainedModel`` (not copied).
        layers: one ``LayerView`` per decoder layer, in order.
        embed_tokens: ``nn.Embedding [V, H]``; final_norm; lm_head: ``nn.Linear [V, H]``.
        tied: whether lm_head shares its weight with embed_tokens.

    Example:
        >>> view = get_view(model)
        >>> view.geometry().num_key_value_heads, view.layers[0].o_proj.weight.shape
    """

    family: ClassVar[str] = "base"
    hf_classes: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    # RMSNorm computes x * rstd * (norm_weight_offset + w): 0 for Llama, 1 for Gemma's (1 + w)
    norm_weight_offset: ClassVar[float] = 0.0
    # [hidden] norms per decoder layer and per-head [head_dim] norms per layer (analytic counts)
    hidden_norms_per_layer: ClassVar[int] = 2
    head_norms_per_layer: ClassVar[int] = 0
    # config keys that pruning rewrites (config_for sets them; in-place surgery copies them over)
    pruned_config_keys: ClassVar[tuple[str, ...]] = (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "num_hidden_layers", "vocab_size", "layer_types", "max_window_layers")
    # checkpoint tensors that are not parameters (non-persistent buffers some old checkpoints carry)
    ignored_checkpoint_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    # the attention implementation stages load this family with when flash-attn is not used
    default_attn_implementation: ClassVar[str] = "sdpa"

    @classmethod
    def full_attention_only(cls, config: Any) -> bool:
        """True when every layer of ``config`` is full causal attention (no sliding window), so a
        batch of full blocks needs no mask beyond SDPA's ``is_causal`` (the KD step's mask-free
        forward, ``ops.kd_step._MaskFree``)."""
        types = getattr(config, "layer_types", None)
        if types is not None:
            return all(t == "full_attention" for t in types)
        return (getattr(config, "sliding_window", None) in (None, 0)
                or getattr(config, "use_sliding_window", True) is False)

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        inner = model.model
        self.decoder_layers: nn.ModuleList = inner.layers
        self.embed_tokens: nn.Embedding = inner.embed_tokens
        self.final_norm: nn.Module = inner.norm
        self.lm_head: nn.Linear = model.lm_head
        types = list(getattr(self.config, "layer_types", None) or [])
        self.layers = [self.layer_view(i, layer) for i, layer in enumerate(inner.layers)]
        for lv in self.layers:
            lv.attn_kind = types[lv.index] if lv.index < len(types) else None

    # -- structure ----------------------------------------------------------------------------
    def layer_view(self, i: int, layer: nn.Module) -> LayerView:
        """The ``LayerView`` of decoder layer ``i`` (Llama's attribute names; adapters override)."""
        a, m = layer.self_attn, layer.mlp
        return LayerView(
            index=i, module=layer, attn=a, mlp=m,
            q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj, o_proj=a.o_proj,
            gate_proj=m.gate_proj, up_proj=m.up_proj, down_proj=m.down_proj, act_fn=m.act_fn,
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

    # -- family constants read from the config ------------------------------------------------------
    @classmethod
    def embed_scale_of(cls, config: Any, hidden_size: int | None = None) -> float:
        """The factor the input embedding is multiplied by (Gemma: ``sqrt(hidden_size)``)."""
        return 1.0

    @property
    def final_logit_softcap(self) -> float | None:
        """``logits = cap * tanh(logits / cap)`` after the lm_head (Gemma 2), or None."""
        return getattr(self.config, "final_logit_softcapping", None) or None

    @property
    def attn_logit_softcap(self) -> float | None:
        """Softcap of the attention scores (Gemma 2), or None."""
        return getattr(self.config, "attn_logit_softcapping", None) or None

    @property
    def attn_kinds(self) -> list[str | None]:
        """Each layer's attention type ("full_attention", "sliding_attention") or None."""
        return [lv.attn_kind for lv in self.layers]

    def rmsnorm_of(self, norm: nn.Module) -> tuple[torch.Tensor, float, float] | None:
        """``(weight, eps, weight_offset)`` when ``norm`` claims to be this family's RMSNorm
        (``y = x * rsqrt(mean(x^2) + eps) * (offset + w)``), else None. Callers that replace
        the norm's forward verify the claim on a probe (see ``importance.collect``)."""
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        w = getattr(norm, "weight", None)
        if eps is None or not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
            return None
        return w, float(eps), self.norm_weight_offset

    def set_rmsnorm_eps_(self, norm: nn.Module, eps: float) -> None:
        """Sets the epsilon of an RMSNorm found by ``rmsnorm_of``."""
        setattr(norm, "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps", float(eps))

    def lora_targets(self) -> list[str]:
        """Module names of the projections (for PEFT/LoRA ``target_modules``)."""
        return sorted({n for lv in self.layers[:1] for n in lv.linears()})

    # -- geometry -------------------------------------------------------------------------------
    @classmethod
    def head_dim_of(cls, config: Any) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // config.num_attention_heads

    @classmethod
    def active_ffn_of(cls, config: Any, geometry: Geometry) -> int:
        """The FFN width one token passes through in a layer (the memory plan's activations): the
        MLP's; MoE views count the experts each token is routed to (and a shared expert)."""
        return geometry.intermediate_size

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
        norms, total. Per-head norms count under attention (they live in the attention module)."""
        g = geometry or cls.geometry_of(config)
        b = cls.biases_of(config)
        H, F, nq, nkv, hd, L, V = (g.hidden_size, g.intermediate_size, g.num_attention_heads,
                                   g.num_key_value_heads, g.head_dim, g.num_hidden_layers, g.vocab_size)
        attn = H * nq * hd + 2 * H * nkv * hd + nq * hd * H
        attn += (nq * hd + 2 * nkv * hd) * b["qkv"] + H * b["o"] + cls.head_norms_per_layer * hd
        mlp = 3 * H * F + (2 * F + H) * b["mlp"]
        norms = cls.hidden_norms_per_layer * H * L + H
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
            "norms": n([nm for lv in self.layers for nm in lv.hidden_norms()] + [self.final_norm]),
        }
        out["total"] = sum(out.values())
        return out

    # -- describing a new shape -----------------------------------------------------------------
    @classmethod
    def config_for(cls, config: Any, geometry: Geometry, kept_layers: list[int] | None = None) -> Any:
        """A deep copy of ``config`` describing ``geometry`` exactly. head_dim is always written
        explicitly, since hidden_size // heads no longer holds after width pruning. Per-layer
        settings follow the kept layers (``kept_layers``, default the first ones):
        ``layer_types`` keeps each kept layer's own type and ``max_window_layers`` (Qwen) counts
        the kept layers below the old boundary, so sliding and full layers stay where they were."""
        new = copy.deepcopy(config)
        g = geometry
        new.hidden_size = g.hidden_size
        new.intermediate_size = g.intermediate_size
        new.num_attention_heads = g.num_attention_heads
        new.num_key_value_heads = g.num_key_value_heads
        new.head_dim = g.head_dim
        new.vocab_size = g.vocab_size
        kept = list(range(g.num_hidden_layers)) if kept_layers is None else list(kept_layers)
        if len(kept) != g.num_hidden_layers:
            raise ValueError(f"{len(kept)} kept layers for a geometry of {g.num_hidden_layers}")
        new.num_hidden_layers = g.num_hidden_layers
        if getattr(new, "layer_types", None) is not None:
            new.layer_types = [list(config.layer_types)[i] for i in kept]
        if isinstance(getattr(new, "max_window_layers", None), int):
            new.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)
        return new

    def sync_modules_(self) -> None:
        """After in-place surgery: makes module attributes that cache sizes agree with the
        parameters and ``self.config`` (already describing the new shape)."""
        g = self.geometry()
        for mod in self.model.modules():
            if isinstance(mod, nn.Linear):
                mod.out_features, mod.in_features = mod.weight.shape
            elif isinstance(mod, nn.Embedding):
                mod.num_embeddings, mod.embedding_dim = mod.weight.shape
            elif isinstance(mod, nn.LayerNorm):
                mod.normalized_shape = tuple(mod.weight.shape)
        for new_i, lv in enumerate(self.layers):
            for mod in (lv.module, lv.attn):
                if hasattr(mod, "layer_idx"):
                    mod.layer_idx = new_i
            for name, value in (("num_key_value_groups", g.num_attention_heads // g.num_key_value_heads),
                                ("head_dim", g.head_dim), ("num_key_value_heads", g.num_key_value_heads),
                                ("num_heads", g.num_attention_heads)):
                if isinstance(getattr(lv.attn, name, None), int):
                    setattr(lv.attn, name, value)

    def extras(self) -> dict[str, Any]:
        """Family-specific facts for ``info`` (softcaps, per-layer types, fused projections...)."""
        out: dict[str, Any] = {}
        lv = self.layers[0] if self.layers else None
        if lv is not None and (lv.qkv_proj is not None or lv.gate_up_proj is not None):
            out["fused"] = ",".join(n for n in ("qkv_proj", "gate_up_proj") if getattr(lv, n) is not None)
        if lv is not None and lv.head_norms:
            out["head_norms"] = len(lv.head_norms)
        types = [t for t in self.attn_kinds if t]
        if types and len(set(types)) > 1:
            out["layer_types"] = ", ".join(f"{t} x{types.count(t)}" for t in sorted(set(types)))
        for k, v in (("final_logit_softcap", self.final_logit_softcap), ("attn_logit_softcap", self.attn_logit_softcap)):
            if v:
                out[k] = v
        if self.embed_scale_of(self.config) != 1.0:
            out["embed_scale"] = round(self.embed_scale_of(self.config), 6)
        return out

    def info(self) -> dict[str, Any]:
        """The ``minitron-fast info`` record."""
        return info_record(self.family, self.config, self.param_counts()["total"], self.extras())


def info_record(family: str, config: Any, num_parameters: int, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    g = ModelView.geometry_of(config)
    return {"family": family, **{k: v for k, v in g.as_dict().items()}, "num_parameters": int(num_parameters),
            **(extras or {})}


def parameter_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
