"""Per-stage artifact caching: each stage writes into ``<out>/<stage>/`` and records, in
``stage.json``, a hash of everything its output depends on (its recipe section, the upstream
stages' hashes, the input model's files). A rerun with the same hash reuses the artifact; a
different hash redoes the stage and says which inputs changed (the stale artifact is kept as
``<stage>.stale/`` until the next change); a stage killed midway is redone (the trainer stages
resume from their last DeepSpeed checkpoint).

Safety: the run directory is locked for the run (``io.RunLock``: a second run on it is an error
naming the first one's host and PID); a cached stage is reused only after its artifacts are verified
(each exists and has the sha256 recorded when it was written); input models are identified by
the sha256 of their files (cached by file identity, ``io.content_digest``); hidden temporary
files of killed runs are removed when the next run starts.
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

from minitron_fast.io import LOCK, MARKER, RunLock, atomic_write_json, clean_stale_tmp_in, content_digest, write_marker

STAGE_FORMAT = 1


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    """The cache key of stage ``name`` run on ``inputs`` (its config and its upstream artifacts)."""
    return stable_hash({"format": STAGE_FORMAT, "stage": name, "inputs": inputs})


def model_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a checkpoint directory by content: the sha256 of its config and of each weight
    file (``io.content_digest``: hashed once, then cached by file identity, so an unchanged 16 GB
    checkpoint costs a stat per run while any rewrite, even one keeping size and mtime, is seen)."""
    p = Path(path)
    out: dict[str, Any] = {"path": str(p.resolve())}
    cfg = p / "config.json"
    out["config"] = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.is_file() else None
    files = sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin")))
    out["weights"] = [[f.name, content_digest(f)[:16]] for f in files]
    return out


def normalize(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings), so a recorded
    input compares equal to the same input in memory."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def artifact_digests(root: Path, outputs: dict[str, Any]) -> dict[str, str]:
    """sha256 of every file of every output that is a path inside ``root`` (a file, or a
    directory's files), keyed by path relative to ``root``."""
    root = root.resolve()
    out: dict[str, str] = {}

    def add(f: Path) -> None:
        if f.name in (LOCK, MARKER):
            return
        out[str(f.resolve().relative_to(root))] = content_digest(f)

    for v in _flat(outputs).values():
        if not isinstance(v, str) or "\n" in v or len(v) > 4096:
            continue
        p = Path(v)
        try:
            rp = p.resolve()
        except OSError:
            continue
        if root not in rp.parents or not rp.exists():
            continue
        if rp.is_file():
            add(rp)
        else:
            for f in sorted(rp.rglob("*")):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(rp).parts):
                    add(f)
    return out


def verify_artifacts(root: Path, digests: dict[str, str]) -> str | None:
    """None when every recorded artifact exists with its recorded sha256; else what is wrong."""
    for rel, want in sorted(digests.items()):
        f = root / rel
        if not f.is_file():
            return f"{f} is missing"
        if content_digest(f) != want:
            return f"{f} changed since it was written"
    return None


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
        self._lock: RunLock | None = None

    def acquire(self) -> None:
        """Locks the run directory for this run (a second run gets an error naming this host and PID),
        marks it as minitron_fast's, and removes what killed runs left half-written."""
        if self._lock is None:
            self._lock = RunLock(self.out).acquire()
            write_marker(self.out)
            for d in [self.out] + [p for p in self.out.iterdir() if p.is_dir() and not p.name.startswith(".")]:
                for p in clean_stale_tmp_in(d):
                    self.log(f"removed {p}, left by an interrupted run")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def dir(self, name: str) -> Path:
        return self.out / name

    def run(self, name: str, inputs: dict[str, Any], fn: Callable[[Path, bool], dict[str, Any]]) -> StageResult:
        """Runs ``fn(stage_dir, resume)`` unless ``<out>/<name>/stage.json`` records the same
        inputs hash. ``fn`` returns the stage's outputs (JSON-able); ``resume`` is True when a
        previous run with the same inputs was interrupted."""
        d = self.dir(name)
        inputs = normalize(inputs)
        key = stage_key(name, inputs)
        marker = d / "stage.json"
        started = d / "stage.started.json"
        resume = False
        if marker.is_file():
            try:
                rec = json.loads(marker.read_text())
            except json.JSONDecodeError:
                rec = {}
            bad = None
            if rec.get("key") == key and name not in self.force:
                bad = verify_artifacts(self.out, rec.get("artifacts") or {}) if "artifacts" in rec else \
                    "no artifact hashes were recorded (written by an older minitron_fast)"
                if bad is None:
                    res = StageResult(name, key, "cached", rec.get("outputs", {}), rec.get("seconds", 0.0),
                                      "artifact exists for the same inputs")
                    self.log(f"[{name}] cached: reusing {d} (inputs {key}, artifacts verified)")
                    self.results[name] = res
                    return res
            why = "forced by --redo" if name in self.force else \
                f"its artifact cannot be trusted ({bad})" if bad else \
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
                                   "artifacts": artifact_digests(self.out, outputs),
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
