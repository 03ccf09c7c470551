"""The one target/budget grammar: pruning targets ``hidden=3072,ffn=9216,...`` and parameter
budgets ``4.5e9`` / ``4.5B`` / ``90M`` / ``0.7x``, and their resolution to a shape.

Every reader of a target or a budget goes through this module: the recipe (checked when it
loads), ``minitron-fast prune --target``, ``minitron-fast search --params`` and the pipeline's
search and prune stages, so a string one accepts the others accept too.

A target names any of the five prunable axes; a missing axis keeps the source value. A parameter
budget (``params=4.5e9``, ``params=90M`` or ``params=0.5x`` for a fraction of the source) is
resolved to a shape by shrinking the chosen axes (width: hidden and FFN by one common factor;
depth: layers) until the analytic parameter count fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minitron_fast.errors import MinitronError

# ``minitron_fast.models`` (torch, transformers) is imported inside the functions that resolve a
# target against a model, so the grammar stays importable by configs and the CLI parser.

# target key -> Geometry field
TARGET_KEYS = {
    "hidden": "hidden_size",
    "ffn": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "layers": "num_hidden_layers",
    # mixture-of-experts models only (models/moe.py)
    "experts": "num_experts",
    "expert_ffn": "moe_intermediate_size",
}
MOE_TARGET_KEYS = ("experts", "expert_ffn")
_ALIASES = {"hidden_size": "hidden", "intermediate_size": "ffn", "num_attention_heads": "heads",
            "num_key_value_heads": "kv_heads", "num_hidden_layers": "layers", "kv": "kv_heads",
            "n_heads": "heads", "n_layers": "layers", "num_experts": "experts",
            "moe_intermediate_size": "expert_ffn"}
BUDGET_AXES = ("width", "ffn", "depth", "experts")  # experts: MoE models only
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
BUDGET_EXAMPLES = "4.5e9, 4.5B, 90M or 0.7x (a fraction of the source model)"


class TargetError(MinitronError, ValueError):
    """A target or budget that cannot be parsed or cannot be reached from the source model."""


@dataclass(frozen=True)
class Budget:
    """A parameter budget: an absolute ``count`` or a ``fraction`` of the source model."""

    count: int | None = None
    fraction: float | None = None

    def resolve(self, source_params: int) -> int:
        """The budget in parameters for a source model of ``source_params``."""
        return self.count if self.count is not None else int(self.fraction * source_params)


def parse_budget_spec(text: str | int | float) -> Budget:
    """``4.5e9``, ``4.5B``, ``90M``, ``0.7x`` -> :class:`Budget`. Raises TargetError on anything
    else: a non-number, a count below 1, a fraction outside (0, 1]."""
    s = str(text).strip().lower().replace("_", "")
    try:
        if s.endswith("x"):
            f = float(s[:-1])
        else:
            v = float(s[:-1]) * _SUFFIX[s[-1]] if s and s[-1] in _SUFFIX else float(s)
    except ValueError:
        raise TargetError(f"budget {text!r} is not a parameter count (e.g. {BUDGET_EXAMPLES})") from None
    if s.endswith("x"):
        if not 0 < f <= 1:
            raise TargetError(f"budget {text!r}: a fraction of the source must lie in (0, 1]")
        return Budget(fraction=f)
    if not 1 <= v < float("inf"):
        raise TargetError(f"budget {text!r} must be a positive parameter count (e.g. {BUDGET_EXAMPLES})")
    return Budget(count=int(v))


def parse_budget(text: str | int | float, source_params: int) -> int:
    """A parameter budget in parameters: ``4.5e9``, ``4.5B``, ``90M`` or ``0.7x`` (a fraction of
    ``source_params``). Raises TargetError on anything else."""
    return parse_budget_spec(text).resolve(source_params)


def parse_target(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """Parses ``"hidden=3072,ffn=9216,heads=32,kv_heads=8,layers=32"`` (or ``params=4.5e9`` /
    ``params=90M`` / ``params=0.5x``) into ``{"hidden": 3072, ...}``, with ``params`` as a
    :class:`Budget`. Raises TargetError naming the entry for an unknown key, a non-integer or
    non-positive size, an empty entry (``hidden=3072,,ffn=9216``) or a key given twice.

    Example:
        >>> parse_target("hidden=3072,ffn=9216")
        {'hidden': 3072, 'ffn': 9216}
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if isinstance(text, dict):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                raise TargetError(f"target {text!r} has an empty entry; write key=value pairs separated by single "
                                  "commas (e.g. hidden=3072,ffn=9216)")
            if "=" not in part:
                raise TargetError(f"target entry {part!r} is not key=value (e.g. hidden=3072,layers=24)")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out: dict[str, Any] = {}
    for k, v in items:
        k = _ALIASES.get(k, k)
        if k in out:
            raise TargetError(f"target key {k!r} is given twice; give each axis once")
        if k == "params":
            out["params"] = v if isinstance(v, Budget) else parse_budget_spec(v)
            continue
        if k not in TARGET_KEYS:
            raise TargetError(f"unknown target key {k!r}; known: {', '.join(list(TARGET_KEYS) + ['params'])}")
        if isinstance(v, bool):
            raise TargetError(f"target {k}={v!r} is not an integer")
        try:
            n = int(v)
            if isinstance(v, float) and n != v:
                raise ValueError
        except (TypeError, ValueError):
            raise TargetError(f"target {k}={v!r} is not an integer") from None
        if n <= 0:
            raise TargetError(f"target {k}={n} must be a positive integer")
        out[k] = n
    return out


def check_budget_axes(axes: str) -> str:
    if axes not in BUDGET_AXES:
        raise TargetError(f"budget axes {axes!r} must be one of {', '.join(BUDGET_AXES)}")
    return axes


def target_geometry(config: Any, target: str | dict[str, Any] | Geometry, *, budget_axes: str = "width",
                    round_to: int | None = None) -> Geometry:
    """The target ``Geometry`` for ``config``: the source geometry with the target's keys
    replaced, or a parameter budget resolved by ``resolve_budget``. Checked against the source."""
    from minitron_fast.models import Geometry, view_class_for_config

    view_cls = view_class_for_config(config)
    src = view_cls.geometry_of(config)
    if isinstance(target, Geometry):
        geo = target
    else:
        t = parse_target(target)
        budget = t.pop("params", None)
        _check_moe_keys(view_cls, src, t)
        geo = src.replace(**{TARGET_KEYS[k]: v for k, v in t.items()})
        if budget is not None:
            n = budget.resolve(view_cls.count_params(config)["total"])
            geo = resolve_budget(config, n, axes=budget_axes, start=geo, round_to=round_to)
    if hasattr(view_cls, "normalize_geometry"):  # MoE: top-k <= experts; Mixtral's one FFN field
        geo = view_cls.normalize_geometry(config, geo)
    check_geometry(config, geo)
    return geo


def check_geometry(config: Any, geo: Geometry) -> None:
    """Raises TargetError naming the numbers when ``geo`` cannot be cut from ``config``'s model."""
    from minitron_fast.models import view_class_for_config

    view_cls = view_class_for_config(config)
    src = view_cls.geometry_of(config)
    _check_moe_keys(view_cls, src, {k: getattr(geo, TARGET_KEYS[k]) for k in MOE_TARGET_KEYS
                                    if getattr(geo, TARGET_KEYS[k]) != getattr(src, TARGET_KEYS[k])})
    if src.is_moe and not 1 <= geo.num_experts_per_tok <= geo.num_experts:
        raise TargetError(f"num_experts_per_tok={geo.num_experts_per_tok} must lie in [1, experts={geo.num_experts}]")
    for key, field in TARGET_KEYS.items():
        if key in MOE_TARGET_KEYS and not src.is_moe:
            continue
        s, t = getattr(src, field), getattr(geo, field)
        if t > s:
            raise TargetError(f"target {key}={t} is larger than the source model's {key}={s}; pruning only shrinks")
        if t <= 0:
            raise TargetError(f"target {key}={t} must be positive")
    if geo.head_dim != src.head_dim or geo.vocab_size != src.vocab_size:
        raise TargetError(f"head_dim and vocab_size cannot be pruned (source {src.head_dim}, {src.vocab_size}; "
                          f"target {geo.head_dim}, {geo.vocab_size})")
    if geo.num_attention_heads % geo.num_key_value_heads:
        raise TargetError(f"target heads={geo.num_attention_heads} is not divisible by kv_heads="
                          f"{geo.num_key_value_heads}; every KV group must keep the same number of query heads")
    group_src = src.num_attention_heads // src.num_key_value_heads
    group_t = geo.num_attention_heads // geo.num_key_value_heads
    if group_t > group_src:
        raise TargetError(f"target heads={geo.num_attention_heads} with kv_heads={geo.num_key_value_heads} needs "
                          f"{group_t} query heads per KV group, but the source has only {group_src} "
                          f"({src.num_attention_heads} heads / {src.num_key_value_heads} KV heads)")
    # Can the family's config express this shape? Round-trip it through the config's dict form.
    try:
        new = view_cls.config_for(config, geo)
        back = type(config).from_dict(new.to_dict())
    except Exception as exc:  # noqa: BLE001  transformers 5 strict-config validators raise their own types
        cause = getattr(exc, "__cause__", None) or exc
        raise TargetError(f"the {view_cls.family} config cannot express hidden={geo.hidden_size} with "
                          f"heads={geo.num_attention_heads} (head_dim={geo.head_dim}): {str(cause).strip()}") from None
    got = view_cls.geometry_of(back)
    if got != geo:
        raise TargetError(f"the {view_cls.family} config cannot express hidden={geo.hidden_size} with "
                          f"heads={geo.num_attention_heads}, head_dim={geo.head_dim} (it reads back as {got})")


def _check_moe_keys(view_cls: Any, src: Geometry, t: dict[str, Any]) -> None:
    """One-line errors for the MoE keys: on a dense model, or growing an axis."""
    for k in MOE_TARGET_KEYS:
        if k not in t:
            continue
        if not src.is_moe:
            raise TargetError(f"target {k}={t[k]} applies to mixture-of-experts models only; this "
                              f"{view_cls.family} model is dense (prune ffn= instead)")
        have = src.num_experts if k == "experts" else src.moe_intermediate_size
        if t[k] > have:
            what = "experts per MoE layer" if k == "experts" else "neurons per expert"
            raise TargetError(f"target {k}={t[k]} is larger than the model's {have} {what}; pruning only shrinks")


def resolve_budget(config: Any, n_params: int, *, axes: str = "width", start: Geometry | None = None,
                   round_to: int | None = None) -> Geometry:
    """The largest shape of ``config``'s family with at most ``n_params`` parameters.

    ``axes="width"`` shrinks hidden size and FFN size by one common factor (the Minitron 4B-Width
    recipe keeps heads and layers), rounded down to multiples of ``round_to`` (default 64 when
    the source hidden size is at least 1024, else 8); ``axes="depth"`` removes layers;
    ``axes="ffn"`` shrinks the FFN only; ``axes="experts"`` (MoE models) removes experts from every
    MoE layer (top-k capped at the count). ``start`` is the geometry to shrink from (other target
    keys already applied). Raises TargetError when even the smallest shape is over budget.
    """
    from minitron_fast.models import view_class_for_config

    view_cls = view_class_for_config(config)
    g0 = start or view_cls.geometry_of(config)
    count = lambda g: view_cls.count_params(config, g)["total"]  # noqa: E731
    if count(g0) <= n_params:
        return g0
    if round_to is None:
        round_to = 64 if g0.hidden_size >= 1024 else 8
    if check_budget_axes(axes) == "experts":
        if not g0.is_moe:
            raise TargetError(f"budget axes 'experts' apply to mixture-of-experts models only; this "
                              f"{view_cls.family} model is dense (use width, ffn or depth)")
        norm = view_cls.normalize_geometry
        for n in range(g0.num_experts, 0, -1):
            g = norm(config, g0.replace(num_experts=n))
            if count(g) <= n_params:
                return g
        raise TargetError(f"a budget of {n_params:,} parameters cannot be met by removing experts "
                          f"(one expert per MoE layer already has {count(norm(config, g0.replace(num_experts=1))):,})")
    if check_budget_axes(axes) == "depth":
        for n in range(g0.num_hidden_layers, 0, -1):
            g = g0.replace(num_hidden_layers=n)
            if count(g) <= n_params:
                return g
        raise TargetError(f"a budget of {n_params:,} parameters cannot be met by removing layers "
                          f"(one layer already has {count(g0.replace(num_hidden_layers=1)):,})")

    def shape(s: float) -> Geometry:
        f = max(round_to, int(g0.intermediate_size * s) // round_to * round_to)
        h = g0.hidden_size if axes == "ffn" else max(round_to, int(g0.hidden_size * s) // round_to * round_to)
        return g0.replace(hidden_size=min(h, g0.hidden_size), intermediate_size=min(f, g0.intermediate_size))

    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection on the common factor; count() is monotone in s
        mid = (lo + hi) / 2
        if count(shape(mid)) <= n_params:
            lo = mid
        else:
            hi = mid
    g = shape(lo)
    if count(g) > n_params:
        raise TargetError(f"a budget of {n_params:,} parameters cannot be met by shrinking {axes} "
                          f"(the smallest shape has {count(g):,}); try axes=depth or a larger budget")
    return g
