"""The importance scores file: one safetensors file (fp32 tensors) plus JSON metadata.

This module is the only reader and writer of the file: the importance stage writes it with
:func:`save_scores`; :func:`load_scores` reads a whole, validated file back as
:class:`ImportanceScores`; pruning and search read the tensors they need through
:func:`scores_tensors` (which also takes an in-memory dict, so tests and callers can pass
partial scores). Both readers go through :func:`read_scores_file`.

Keys (``i`` = decoder layer index, 0-based; **higher means more important everywhere**):

================================  ====================  ==============================================
key                               shape                 meaning
================================  ====================  ==============================================
``layers.{i}.heads``              ``[n_heads]``         query heads: norm of each head's output before
                                                        ``o_proj``, aggregated over sequence and batch
``layers.{i}.kv_groups``          ``[n_kv_heads]``      sum of the scores of the query heads sharing
                                                        that KV head
``layers.{i}.neurons``            ``[intermediate]``    MLP neurons: ``|act(gate) * up|`` (the input
                                                        of ``down_proj``), aggregated
``layers.{i}.channels``           ``[hidden]``          ``|norm output|`` aggregated, summed over the
                                                        layer's two norms (input and post-attention)
``channels``                      ``[hidden]``          sum of ``layers.{i}.channels`` over all layers
``depth.block_importance``        ``[n_layers]``        BI = 1 - mean cos(layer input, layer output)
                                                        over calibration tokens (higher: the layer
                                                        changes the residual stream more)
``layers.{i}.experts``            ``[num_experts]``     MoE layers only: REAP, the mean over the tokens
                                                        routed to each expert of router weight x
                                                        ||expert output||
``layers.{i}.expert_neurons``     ``[num_experts,       MoE layers only: per expert, the mean over its
                                  expert_ffn]``         routed tokens of router weight x
                                                        ``|act(gate) * up|``
``layers.{i}.expert_mass``        ``[num_experts]``     MoE layers only: the router's mean softmax
                                                        probability of each expert over all tokens
``layers.{i}.shared_neurons``     ``[shared_ffn]``      MoE layers with a shared expert: its neurons,
                                                        aggregated like ``neurons``
``depth.lm_loss``  (optional)     ``[n_layers]``        held-out LM loss (nats/token) of the model with
                                                        that one layer skipped (higher: removing it
                                                        hurts more); the full model's loss is in the
                                                        metadata (``depth_lm_loss.base``)
``depth.lm_loss_block``           ``[n_layers-k+1]``    held-out LM loss with layers ``[s, s+k)``
(optional)                                              skipped, for each start ``s``; ``k`` and the
                                                        best start are in the metadata
================================  ====================  ==============================================

Metadata: the safetensors header metadata ``{"minitron_fast": "<json>"}`` with at least
``format`` (1), ``source_model``, ``family``, ``geometry``, ``calib_tokens``, ``calib_samples``,
``seq_len``, ``seq_agg``, ``batch_agg``, ``dtype``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_write_bytes

FORMAT = 1
META_KEY = "minitron_fast"


class ScoresFileError(MinitronError, ValueError):
    """A missing, malformed or inconsistent importance scores file."""


@dataclass
class ImportanceScores:
    """Importance scores of one model (all fp32, CPU). Higher means more important.

    Attributes:
        heads: per layer ``[n_heads]``; kv_groups: per layer ``[n_kv_heads]``;
        neurons: per layer ``[intermediate_size]``; layer_channels: per layer ``[hidden_size]``;
        channels: ``[hidden_size]``; block_importance: ``[n_layers]``;
        lm_loss: ``[n_layers]`` or None; block_lm_loss: ``[n_layers - k + 1]`` or None;
        meta: JSON-able metadata (see the module docstring).
    """

    heads: list[torch.Tensor]
    kv_groups: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layer_channels: list[torch.Tensor]
    channels: torch.Tensor
    block_importance: torch.Tensor
    lm_loss: torch.Tensor | None = None
    block_lm_loss: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # MoE layers only, keyed by layer index (see the table above)
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    shared_neurons: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The flat ``{key: fp32 tensor}`` dict of the file format."""
        t: dict[str, torch.Tensor] = {}
        for i in range(self.num_layers):
            t[f"layers.{i}.heads"] = self.heads[i]
            t[f"layers.{i}.kv_groups"] = self.kv_groups[i]
            t[f"layers.{i}.neurons"] = self.neurons[i]
            t[f"layers.{i}.channels"] = self.layer_channels[i]
        for key, d in _MOE_KEYS.items():
            for i, v in getattr(self, d).items():
                t[f"layers.{i}.{key}"] = v
        t["channels"] = self.channels
        t["depth.block_importance"] = self.block_importance
        if self.lm_loss is not None:
            t["depth.lm_loss"] = self.lm_loss
        if self.block_lm_loss is not None:
            t["depth.lm_loss_block"] = self.block_lm_loss
        return {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in t.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None,
                     *, where: str = "scores") -> "ImportanceScores":
        """Builds and validates scores from the flat dict of the file format."""
        def need(k: str) -> torch.Tensor:
            if k not in tensors:
                raise ScoresFileError(f"{where}: missing key {k!r}; not a minitron_fast importance scores file?")
            return tensors[k].to(torch.float32)

        n = 0
        while f"layers.{n}.heads" in tensors:
            n += 1
        if n == 0:
            raise ScoresFileError(f"{where}: no 'layers.0.heads' key; not a minitron_fast importance scores file")
        s = cls(
            heads=[need(f"layers.{i}.heads") for i in range(n)],
            kv_groups=[need(f"layers.{i}.kv_groups") for i in range(n)],
            neurons=[need(f"layers.{i}.neurons") for i in range(n)],
            layer_channels=[need(f"layers.{i}.channels") for i in range(n)],
            channels=need("channels"),
            block_importance=need("depth.block_importance"),
            lm_loss=tensors["depth.lm_loss"].float() if "depth.lm_loss" in tensors else None,
            block_lm_loss=tensors["depth.lm_loss_block"].float() if "depth.lm_loss_block" in tensors else None,
            meta=dict(meta or {}),
            **{d: {i: tensors[f"layers.{i}.{key}"].float() for i in range(n) if f"layers.{i}.{key}" in tensors}
               for key, d in _MOE_KEYS.items()},
        )
        s.validate(where=where)
        return s

    def validate(self, *, where: str = "scores") -> None:
        """Raises ScoresFileError on inconsistent shapes or non-finite values."""
        n = self.num_layers
        for name, seq in (("heads", self.heads), ("kv_groups", self.kv_groups), ("neurons", self.neurons),
                          ("channels", self.layer_channels)):
            if len(seq) != n:
                raise ScoresFileError(f"{where}: {len(seq)} layers of {name} but {n} of heads")
            shapes = {tuple(t.shape) for t in seq}
            if len(shapes) != 1 or len(next(iter(shapes))) != 1:
                raise ScoresFileError(f"{where}: layers.*.{name} must be 1-D and equal across layers, got {sorted(shapes)}")
        h = self.heads[0].numel()
        kv = self.kv_groups[0].numel()
        if kv == 0 or h % kv:
            raise ScoresFileError(f"{where}: {h} heads do not split into {kv} KV groups")
        if tuple(self.channels.shape) != tuple(self.layer_channels[0].shape):
            raise ScoresFileError(f"{where}: channels {tuple(self.channels.shape)} != layers.0.channels "
                                  f"{tuple(self.layer_channels[0].shape)}")
        for key, t in (("depth.block_importance", self.block_importance), ("depth.lm_loss", self.lm_loss)):
            if t is not None and tuple(t.shape) != (n,):
                raise ScoresFileError(f"{where}: {key} has shape {tuple(t.shape)}, expected ({n},)")
        for i, e in self.experts.items():
            if e.dim() != 1 or i not in self.expert_neurons or self.expert_neurons[i].dim() != 2 \
                    or self.expert_neurons[i].shape[0] != e.numel():
                raise ScoresFileError(f"{where}: layers.{i}.experts must be [num_experts] with "
                                      f"layers.{i}.expert_neurons [num_experts, expert_ffn]")
        for k, t in self.to_tensors().items():
            if not torch.isfinite(t).all():
                raise ScoresFileError(f"{where}: {k} holds NaN or inf")

    def geometry_summary(self) -> dict[str, int]:
        return {"num_hidden_layers": self.num_layers, "num_attention_heads": self.heads[0].numel(),
                "num_key_value_heads": self.kv_groups[0].numel(), "intermediate_size": self.neurons[0].numel(),
                "hidden_size": self.channels.numel()}


_MOE_KEYS = {"experts": "experts", "expert_neurons": "expert_neurons", "expert_mass": "expert_mass",
             "shared_neurons": "shared_neurons"}  # file key suffix -> ImportanceScores field


def save_scores(scores: ImportanceScores, path: str | os.PathLike) -> Path:
    """Writes ``scores`` atomically to ``path`` (safetensors + JSON metadata). Returns the path."""
    from safetensors.torch import save

    scores.validate(where=str(path))
    meta = {"format": FORMAT, **scores.meta}
    data = save(scores.to_tensors(), metadata={META_KEY: json.dumps(meta, sort_keys=True, default=_json_default)})
    atomic_write_bytes(path, data)
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a scores file (without reading the tensors)."""
    from safetensors import safe_open

    p = _check_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ScoresFileError(f"cannot read scores file {p}: not a safetensors file ({exc})") from exc
    if raw is None:
        raise ScoresFileError(f"{p} has no minitron_fast metadata; not an importance scores file")
    return _parse_meta(p, raw)


def _parse_meta(p: Path, raw: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ScoresFileError(f"{p}: its minitron_fast metadata is not JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ScoresFileError(f"{p}: scores format {meta.get('format')!r}, this minitron_fast reads {FORMAT}")
    return meta


def read_scores_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The one reader of a scores file: ``({key: fp32 tensor}, metadata)``. The metadata is
    ``{}`` for a safetensors file written without it (hand-made scores); when present, its
    ``format`` must be this module's. Raises ScoresFileError (one line) for a missing or unreadable
    file."""
    from safetensors import safe_open

    p = _check_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header or truncated data
        raise ScoresFileError(f"cannot read scores file {p}: not a safetensors file ({exc})") from exc
    return tensors, ({} if raw is None else _parse_meta(p, raw))


def load_scores(path: str | os.PathLike) -> ImportanceScores:
    """Reads and validates a scores file written by :func:`save_scores`.

    Example:
        >>> s = load_scores("scores.safetensors")
        >>> keep = s.neurons[0].argsort(descending=True)[:1024]
    """
    tensors, meta = read_scores_file(path)
    if not meta:
        raise ScoresFileError(f"{path} has no minitron_fast metadata; not an importance scores file")
    return ImportanceScores.from_tensors(tensors, meta, where=str(path))


def scores_tensors(scores: str | os.PathLike | ImportanceScores | Mapping[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The flat ``{key: fp32 tensor}`` dict of ``scores`` (a file path, an :class:`ImportanceScores`
    or such a dict, possibly partial) and provenance ``info``: for a file its path, sha256 and
    metadata (recorded in prune plans), else ``{"scores_file": None}``. Readers check the keys
    they need themselves (pruning needs only the axes it cuts)."""
    if isinstance(scores, ImportanceScores):
        scores = scores.to_tensors()
    if isinstance(scores, Mapping):
        return {k: torch.as_tensor(v).float() for k, v in scores.items()}, {"scores_file": None}
    from minitron_fast.models.export import file_sha256

    tensors, meta = read_scores_file(scores)
    p = Path(scores)
    return tensors, {"scores_file": str(p), "scores_sha256": file_sha256(p), "scores_metadata": meta}


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ScoresFileError(f"scores file {p} does not exist; create it with `minitron-fast importance --out {p}`")
    return p


__all__ = ["ImportanceScores", "ScoresFileError", "save_scores", "load_scores", "read_metadata", "read_scores_file",
           "scores_tensors", "FORMAT"]
