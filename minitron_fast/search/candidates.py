"""Candidate architectures at a parameter budget (pure arithmetic, no weights).

Every candidate is a ``Geometry`` cut from the teacher's: hidden and FFN sizes on
hardware-friendly multiples (64 for models with hidden >= 1024, else 8: SmolLM2's 9 heads and
Llama's config check hidden % heads == 0 leave few multiples of 32), query heads a multiple of
the (kept) KV heads with every group the same size, layers from 1 to the teacher's, and only
shapes the family's HF config accepts (transformers' LlamaConfig rejects a hidden size that is not
a multiple of the head count, even with an explicit head_dim). Parameters
are counted with ``ModelView.count_params`` for the teacher's family, so biases, tied embeddings
and Mistral-NeMo's explicit head_dim are all accounted for.

Kinds (every shape belongs to exactly one):
- ``width``: layers and KV groups kept; at least one of hidden, FFN, query heads (or experts)
  shrunk (4B-Width);
- ``depth``: only layers removed (4B-Depth);
- ``mixed``: layers removed and some width shrunk, KV groups kept;
- ``kv``: whole KV groups removed (1 to all but one of the teacher's KV heads, each kept group
  keeping the same number of query heads), with any other width or depth cut. Only a teacher
  with more than one KV head has such shapes; leaving ``kv`` out of the kinds keeps every KV head.

On mixture-of-experts teachers the expert count is one more width axis: every count from the
router's top-k to the teacher's is tried (``experts=N`` in the candidate's target).

For each (hidden, heads, layers) the FFN size is solved for directly (parameters are linear in
it): the largest multiple that fits the budget. Candidates must land in
``[budget * (1 - tolerance), budget]`` and keep the FFN/hidden ratio within 2x of the teacher's
(very lopsided shapes are not worth retraining). From each kind at most ``max_per_kind`` are kept,
spread over the hidden sizes (for each hidden size and depth: the most query heads, then the count
closest to the budget), largest first.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterable

from minitron_fast.models import Geometry, view_class_for_config
from minitron_fast.search.config import KINDS, SearchError


@dataclass(frozen=True)
class Candidate:
    kind: str
    geometry: Geometry
    params: int

    @property
    def name(self) -> str:
        g = self.geometry
        return (f"{self.kind}-h{g.hidden_size}-f{g.intermediate_size}-q{g.num_attention_heads}"
                f"kv{g.num_key_value_heads}-l{g.num_hidden_layers}" + (f"-e{g.num_experts}" if g.is_moe else ""))

    def target(self) -> str:
        """The pruning target string (``hidden=...,ffn=...,heads=...,kv_heads=...,layers=...``)."""
        g = self.geometry
        return (f"hidden={g.hidden_size},ffn={g.intermediate_size},heads={g.num_attention_heads},"
                f"kv_heads={g.num_key_value_heads},layers={g.num_hidden_layers}"
                + (f",experts={g.num_experts}" if g.is_moe else ""))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": self.params, "target": self.target(),
                **self.geometry.as_dict()}


def default_multiple(hidden_size: int) -> int:
    return 64 if hidden_size >= 1024 else 8


def _expressible(view_cls: Any, config: Any, g: Geometry) -> bool:
    """Whether the family's config class accepts ``g`` (round trip through its dict form)."""
    try:
        back = type(config).from_dict(view_cls.config_for(config, g).to_dict())
        return view_cls.geometry_of(back) == g
    except Exception:  # transformers raises its own validation error types
        return False


def _expert_counts(top_k: int, n: int, most: int = 16) -> list[int]:
    """Expert counts a search tries: from ``top_k`` to ``n``, every one when few, else evenly
    spaced (always including ``n``)."""
    lo = max(1, top_k)
    step = max(1, -(-(n - lo) // most))
    return sorted({*range(n, lo - 1, -step)})


def _sizes(full: int, m: int) -> list[int]:
    out = list(range(m, full + 1, m))
    if not out or out[-1] != full:
        out.append(full)  # the teacher's own size is always allowed, multiple or not
    return out


def enumerate_candidates(config: Any, budget: int, *, tolerance: float = 0.05,
                         kinds: Iterable[str] = KINDS, multiple: int | None = None, prune_heads: bool = True,
                         max_per_kind: int | None = 6,
                         max_ratio_change: float = 2.0) -> list[Candidate]:
    """Candidate student shapes of ``config``'s model with ``budget * (1 - tolerance) <= params <= budget``.

    Args:
        config: the teacher's HF config (a supported family).
        budget: parameter budget (total, embeddings included, tied weights once).
        tolerance: how far below the budget a candidate may fall, as a fraction.
        kinds: any of ``width``, ``depth``, ``mixed``, ``kv`` (default all four).
        multiple: hidden/FFN multiple (default 64 for hidden >= 1024, else 8).
        prune_heads: also shrink query heads (every kept KV group keeps the same number).
        max_per_kind: keep at most this many per kind (None: all).
        max_ratio_change: FFN/hidden may differ from the teacher's ratio by at most this factor.

    Returns candidates sorted by kind (in the order of ``kinds``) then parameters, descending.
    Raises SearchError (naming the numbers) when the budget is not below the teacher's size or no
    candidate lands in the window.

    Example:
        >>> cands = enumerate_candidates(teacher.config, 90_000_000, tolerance=0.05)
        >>> [c.target() for c in cands][:1]
        ['hidden=512,ffn=1056,heads=9,kv_heads=3,layers=30']
    """
    kinds = list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise SearchError(f"search kinds {kinds} must be a non-empty subset of {', '.join(KINDS)}")
    if not 0 < tolerance < 1:
        raise SearchError(f"tolerance must lie in (0, 1), got {tolerance}")
    view_cls = view_class_for_config(config)
    src = view_cls.geometry_of(config)
    count = lambda g: view_cls.count_params(config, g)["total"]  # noqa: E731
    full = count(src)
    if budget >= full:
        raise SearchError(f"budget {budget:,} is not below the teacher's {full:,} parameters; nothing to prune")
    lo = int(budget * (1 - tolerance))
    m = multiple or default_multiple(src.hidden_size)
    if m < 1:
        raise SearchError(f"multiple must be positive, got {m}")
    H, F, nq, nkv, L = (src.hidden_size, src.intermediate_size, src.num_attention_heads, src.num_key_value_heads,
                        src.num_hidden_layers)
    group = nq // nkv
    # (query heads, KV heads) pairs: every kept KV group keeps the same number of query heads;
    # fewer KV heads only for the kv kind (and only where the teacher has more than one)
    attn_opts = [(kv * g, kv) for kv in (range(1, nkv + 1) if "kv" in kinds else [nkv])
                 for g in (range(1, group + 1) if prune_heads else [group])]
    src_ratio = F / H
    ffn_opts = _sizes(F, m)
    # MoE: expert counts from the router's top-k up to the teacher's (width-like cuts), at most
    # about 16 of them (Qwen3-30B-A3B has 128 experts: every 8th count)
    expert_opts = _expert_counts(src.num_experts_per_tok, src.num_experts) if src.is_moe else [0]
    norm = getattr(view_cls, "normalize_geometry", lambda config, g: g)

    found: dict[str, list[Candidate]] = {k: [] for k in kinds}
    ok_shape = {(h, q, kv): _expressible(view_cls, config, src.replace(hidden_size=h, num_attention_heads=q,
                                                                       num_key_value_heads=kv))
                for h in _sizes(H, m) for q, kv in attn_opts}
    for layers, n_exp in ((la, e) for la in range(1, L + 1) for e in expert_opts):
        for hidden in _sizes(H, m):
            for heads, kv in attn_opts:
                if not ok_shape[(hidden, heads, kv)]:
                    continue
                width_cut = hidden < H or heads < nq or kv < nkv or n_exp < src.num_experts
                base = src.replace(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                                   num_hidden_layers=layers, num_experts=n_exp)
                # params are affine in the FFN size: solve for the largest FFN that fits
                c1, c2 = count(base.replace(intermediate_size=ffn_opts[0])), count(base.replace(intermediate_size=F))
                if c1 > budget:
                    continue
                slope = (c2 - c1) / (F - ffn_opts[0]) if F != ffn_opts[0] else 0.0
                if slope == 0:
                    best = F
                else:
                    i = bisect.bisect_right(ffn_opts, ffn_opts[0] + (budget + 1 - c1) / slope) - 1
                    best = ffn_opts[max(0, i)]
                g = norm(config, base.replace(intermediate_size=best))
                n = count(g)
                while n > budget:  # guard against rounding in the affine solve
                    i = ffn_opts.index(g.intermediate_size)
                    if i == 0:
                        break
                    g = norm(config, g.replace(intermediate_size=ffn_opts[i - 1]))
                    n = count(g)
                if not lo <= n <= budget:
                    continue
                width_cut = width_cut or g.intermediate_size < F
                if kv < nkv:
                    kind = "kv"
                elif layers < L:
                    kind = "mixed" if width_cut else "depth"
                else:
                    kind = "width" if width_cut else None
                if kind not in found:
                    continue
                if kind != "depth":
                    r = g.intermediate_size / g.hidden_size
                    if not src_ratio / max_ratio_change <= r <= src_ratio * max_ratio_change:
                        continue
                found[kind].append(Candidate(kind, g, n))

    out: list[Candidate] = []
    for kind in kinds:
        out += _select(found[kind], max_per_kind)
    if not out:
        single = " (the teacher has a single KV head: no KV group to remove)" if kinds == ["kv"] and nkv == 1 else ""
        raise SearchError(
            f"no {'/'.join(kinds)} candidate of this {view_cls.family} model (teacher {full:,} parameters) has between "
            f"{lo:,} and {budget:,} parameters with hidden/FFN multiples of {m}; widen the tolerance "
            f"(now {tolerance:g}), change the budget, or allow more kinds{single}")
    return out


def _select(cands: list[Candidate], k: int | None) -> list[Candidate]:
    """One candidate per (hidden, layers, KV heads) (most heads, then closest to the budget), then ``k`` of those
    spread evenly over that list ordered from the widest to the narrowest; returned largest first."""
    best: dict[tuple[int, int, int], Candidate] = {}
    for c in cands:
        key = (c.geometry.hidden_size, c.geometry.num_hidden_layers, c.geometry.num_key_value_heads,
               c.geometry.num_experts)
        cur = best.get(key)
        # more query heads first (they cost few parameters, and the papers keep them), then the
        # count closest to the budget
        if cur is None or (c.geometry.num_attention_heads, c.params) > (cur.geometry.num_attention_heads, cur.params):
            best[key] = c
    pool = sorted(best.values(), key=lambda c: (-c.geometry.hidden_size, -c.geometry.num_hidden_layers,
                                                -c.geometry.num_key_value_heads, -c.geometry.num_experts, -c.params))
    if k is not None and len(pool) > k:
        if k == 1:
            pool = [max(pool, key=lambda c: c.params)]
        else:
            idx = sorted({round(i * (len(pool) - 1) / (k - 1)) for i in range(k)})
            pool = [pool[i] for i in idx]
    return sorted(pool, key=lambda c: -c.params)


def format_candidates(cands: list[Candidate], extra: dict[str, dict[str, Any]] | None = None) -> str:
    """A plain-text table of candidates (``extra[name]`` adds columns such as the loss)."""
    extra = extra or {}
    cols = ["#", "kind", "hidden", "ffn", "heads", "kv", "layers", "params"]
    ex_cols: list[str] = []
    for v in extra.values():
        ex_cols += [k for k in v if k not in ex_cols]
    rows = [cols + ex_cols]
    for i, c in enumerate(cands, 1):
        g = c.geometry
        row = [str(i), c.kind, str(g.hidden_size), str(g.intermediate_size), str(g.num_attention_heads),
               str(g.num_key_value_heads), str(g.num_hidden_layers), f"{c.params / 1e6:,.2f}M"]
        for k in ex_cols:
            v = extra.get(c.name, {}).get(k)
            row.append("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        rows.append(row)
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x.rjust(wi) for x, wi in zip(r, w)) for r in rows]
    lines.insert(1, "  ".join("-" * wi for wi in w))
    return "\n".join(lines)
