"""Per-stage artifact caching: each stage writes into ``<out>/<stage>/`` and records, in
``stage.json``, a hash of everything its output depends on (its recipe section, the upstream
stages' hashes, the input model's files). A rerun with the same hash reuses the artifact; a
different hash redoes the stage and says which inputs changed (the stale artifact is kept as
``<stage>.stale/`` until the next change); a stage killed midway is redone (the trainer stages
resume from their last DeepSpeed checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from minitron_fast.io import atomic_write_json

STAGE_FORMAT = 1


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    """The cache key of stage ``name`` run on ``inputs`` (its config and its upstream artifacts)."""
    return stable_hash({"format": STAGE_FORMAT, "stage": name, "inputs": inputs})


def model_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a checkpoint directory without reading its weights: the config's text and
    each weight file's name, size and modification time."""
    p = Path(path)
    out: dict[str, Any] = {"path": str(p.resolve())}
    cfg = p / "config.json"
    out["config"] = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else None
    files = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin")))
    out["weights"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    parts = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts) or "stage format changed"


@dataclass
class StageResult:
    name: str
    key: str
    status: str                 # "ran", "cached", "skipped"
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0        # wall time of the run that produced the artifact
    message: str = ""


class StageCache:
    """Runs stages under ``out`` with hash-keyed caching (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, *, log: Callable[[str], None] = print, force: tuple[str, ...] = ()):
        self.out = Path(out)
        self.log = log
        self.force = set(force)
        self.results: dict[str, StageResult] = {}

    def dir(self, name: str) -> Path:
        return self.out / name

    def run(self, name: str, inputs: dict[str, Any], fn: Callable[[Path, bool], dict[str, Any]]) -> StageResult:
        """Runs ``fn(stage_dir, resume)`` unless ``<out>/<name>/stage.json`` records the same
        inputs hash. ``fn`` returns the stage's outputs (JSON-able); ``resume`` is True when a
        previous run with the same inputs was interrupted."""
        d = self.dir(name)
        key = stage_key(name, inputs)
        marker = d / "stage.json"
        started = d / "stage.started.json"
        resume = False
        if marker.is_file():
            try:
                rec = json.loads(marker.read_text())
            except json.JSONDecodeError:
                rec = {}
            if rec.get("key") == key and name not in self.force:
                res = StageResult(name, key, "cached", rec.get("outputs", {}), rec.get("seconds", 0.0),
                                  "artifact exists for the same inputs")
                self.log(f"[{name}] cached: reusing {d} (inputs {key})")
                self.results[name] = res
                return res
            why = "forced by --redo" if name in self.force else \
                f"inputs changed ({describe_changes(rec.get('inputs', {}), inputs)})"
            self.log(f"[{name}] stale artifact in {d}: {why}; redoing the stage (old artifact kept in {d.name}.stale/)")
            self._retire(d)
        elif started.is_file():
            try:
                rec = json.loads(started.read_text())
            except json.JSONDecodeError:
                rec = {}
            if rec.get("key") == key and name not in self.force:
                resume = True
                self.log(f"[{name}] resuming: a previous run with the same inputs was interrupted")
            else:
                self.log(f"[{name}] an interrupted run with other inputs left {d}; starting the stage over")
                self._retire(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(started, {"key": key, "inputs": inputs})
        self.log(f"[{name}] running (inputs {key})")
        t0 = time.perf_counter()
        outputs = fn(d, resume) or {}
        dt = time.perf_counter() - t0
        atomic_write_json(marker, {"key": key, "inputs": inputs, "outputs": outputs, "seconds": dt,
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        started.unlink(missing_ok=True)
        self.log(f"[{name}] done in {dt:.1f} s")
        res = StageResult(name, key, "ran", outputs, dt)
        self.results[name] = res
        return res

    def skip(self, name: str, message: str) -> StageResult:
        self.log(f"[{name}] skipped: {message}")
        res = StageResult(name, "", "skipped", {}, 0.0, message)
        self.results[name] = res
        return res

    def _retire(self, d: Path) -> None:
        stale = d.with_name(d.name + ".stale")
        if stale.exists():
            shutil.rmtree(stale)
        if d.exists():
            os.replace(d, stale)
