"""The trainer's run directory: input and output checks, ``run.json`` and ``--resume``, DeepSpeed
checkpoints loaded with ``weights_only`` (an allowlist of DeepSpeed's plain records), half-written
checkpoints removed, the metrics of a killed run truncated to its last checkpoint (moved out of
``trainer.py``), and the check that every rank sees the run directory rank 0 writes."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from minitron_fast.distill.config import DistillConfig
from minitron_fast.distill.engine import _all_reduce, _barrier
from minitron_fast.errors import MinitronError
from minitron_fast.io import LOCK, MARKER, atomic_write_text, same_or_inside


class ResumeError(MinitronError, ValueError):
    """--resume pointed at a directory of a different run, or a fresh run at a used directory."""


# -- run directory --------------------------------------------------------------------------------

def _check_inputs(cfg: DistillConfig, out: Path) -> None:
    """The run directory must not overlap an input model directory (checked before anything is
    created in it)."""
    for src in (cfg.teacher, cfg.student, cfg.teacher_logits):
        if src and src != "demo" and (same_or_inside(out, src) or same_or_inside(src, out)):
            what = "stored teacher logits" if src == cfg.teacher_logits else "model"
            raise ResumeError(f"refusing to write into the input {what} directory {src}; choose another out")
    if out.exists() and not out.is_dir():
        raise ResumeError(f"out {out} is a file; choose a directory")


_OWN_FILES = (LOCK, MARKER)  # present in a run directory before anything is recorded


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"--resume: {path} is unreadable or corrupt ({exc}); {what}") from None
    if not isinstance(rec, dict):
        raise ResumeError(f"--resume: {path} is not a JSON object; {what}")
    return rec


def read_latest(ckpt_dir: Path) -> int | None:
    """The step of the last complete checkpoint (``checkpoints/latest``), or None; a corrupt
    ``latest`` or one naming a missing checkpoint is a one-line error."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ResumeError(f"--resume: cannot read {latest} ({exc})") from None
    if not (tag.startswith("step") and tag[4:].isdigit()):
        raise ResumeError(f"--resume: {latest} is corrupt (holds {tag[:40]!r}, not a tag like step50); write the tag "
                          f"of a complete checkpoint in {ckpt_dir} into it, or start the run over in another out")
    if not (ckpt_dir / tag).is_dir():
        raise ResumeError(f"--resume: {latest} names {tag}, which is not in {ckpt_dir}; write the tag of a complete "
                          "checkpoint into it, or start the run over in another out")
    return int(tag[4:])


def _check_out_dir(cfg: DistillConfig, out: Path, resume: bool, world: int) -> int | None:
    """Validates the run directory; returns the step to resume from (None: start fresh)."""
    _check_inputs(cfg, out)
    run_json = out / "run.json"
    used = [p for p in out.iterdir() if p.name not in _OWN_FILES] if out.is_dir() else []
    if not resume:
        if used:
            raise ResumeError(f"output directory {out} is not empty; pass --resume to continue that run, "
                              "or choose another out")
        return None
    if not run_json.is_file():
        if any(p.name != "run.json" for p in used):
            raise ResumeError(f"{out} holds no run.json: it is not a minitron_fast distill run directory")
        return None  # killed before anything was written: start fresh
    rec = _read_json(run_json, "start the run over in another out (or delete it to restart this one)")
    if rec.get("fingerprint") != cfg.fingerprint():
        raise ResumeError(f"--resume: {out} belongs to a different run (recipe fingerprint {rec.get('fingerprint')} "
                          f"!= {cfg.fingerprint()}); use the same recipe or another out")
    if rec.get("world_size") != world:
        raise ResumeError(f"--resume: {out} was written by {rec.get('world_size')} ranks, this launch has {world}; "
                          "resume with the same number of processes")
    return read_latest(out / "checkpoints")


# classes DeepSpeed's optimizer checkpoints hold besides tensors and plain data (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, fp32 and bf16): plain
# records, allowed by name; nothing else is ever unpickled.
_DS_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                    "deepspeed.runtime.zero.config.ZeroStageEnum",
                    "deepspeed.utils.tensor_fragment.fragment_address")


def _safe_globals() -> list[Any]:
    import importlib

    out = []
    for name in _DS_SAFE_GLOBALS:
        mod, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            out.append(getattr(importlib.import_module(mod), attr))
    return out


@contextlib.contextmanager
def weights_only_load():
    """Within the block, every ``torch.load`` (DeepSpeed's checkpoint loader calls it with
    ``weights_only=False``) runs with ``weights_only=True`` and an allowlist of DeepSpeed's plain
    record classes: a checkpoint that would execute code on unpickling is refused in one line."""
    import pickle

    real = torch.load
    allowed = _safe_globals()

    def load(f, *args: Any, **kw: Any):
        kw["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return real(f, *args, **kw)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ResumeError(f"--resume: {f} holds more than tensors and plain data ({first}); minitron_fast never "
                              "unpickles code from a run directory: resume only from checkpoints it wrote") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


_TMP_CKPT = ".tmp-step"


def _clean_tmp_checkpoints(ckpt_dir: Path) -> None:
    """Removes checkpoints a killed run left half-written (hidden ``.tmp-stepN``)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(f"{_TMP_CKPT}*"):
            shutil.rmtree(p, ignore_errors=True)


def _check_model_inputs(cfg: DistillConfig) -> None:
    """The models' configs read, are of a supported family, and fit ``data.seq_len``."""
    from minitron_fast.models.loading import check_seq_len, load_config

    for role in ("teacher", "student") if cfg.mode == "distill" else ("teacher",):
        if getattr(cfg, role) is None:  # distillation from stored teacher logits names no teacher model
            continue
        check_seq_len(load_config(getattr(cfg, role)), cfg.data.seq_len, what=f"data.seq_len ({role})")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops the records a killed run wrote after its last checkpoint (``step``; 0: all)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in keep))


SHARED_PROBE = ".minitron_fast.shared-probe"


def check_shared_out_dir(out: Path, rank: int, world: int) -> None:
    """Every rank must see the run directory rank 0 writes: ``run.json``, the checkpoint renames
    and ``latest`` are written by global rank 0 alone, so on node-local directories the other
    nodes' ranks would resume from nothing while node 0 waits for them in a collective. Rank 0
    writes a nonce into ``out``, the nonce is broadcast, every rank reads the file back, and the
    count of ranks that did not see it is summed over the world: every rank then fails together,
    in one line, instead of one node failing and the rest hanging until the timeout. Called after
    the process group starts; a no-op for a world of one."""
    if world <= 1:
        return
    import secrets
    import socket

    import torch.distributed as dist

    probe = out / SHARED_PROBE
    nonce = secrets.token_hex(16) if rank == 0 else None
    if rank == 0:
        atomic_write_text(probe, nonce + "\n")
    box = [nonce]
    dist.broadcast_object_list(box, src=0)  # after rank 0's write: the file is complete when a rank reads it
    try:
        seen = probe.read_text().strip() == box[0]
    except (OSError, UnicodeDecodeError):
        seen = False
    missing = _all_reduce(torch.tensor([0.0 if seen else 1.0]))
    _barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    n_missing = int(missing.item())
    if n_missing:
        where = "" if seen else f" (this one, rank {rank} on {socket.gethostname()}, among them)"
        raise ResumeError(f"{n_missing} of {world} ranks cannot see the output directory {out} that rank 0 writes"
                          f"{where}: a multi-node run needs out on a filesystem every node mounts at the same path "
                          "(NFS, Lustre, ...); see docs/scale.md")


def check_lock_across_ranks(out: Path, lock: Any, lock_error: BaseException | None, rank: int, world: int) -> None:
    """The run lock across nodes, before rank 0 writes anything into ``out``: rank 0 broadcasts its
    lock record (or the error it got taking the lock); each other node's local rank 0 reads the
    lock file and checks that it records this launch (fcntl locks may not reach across the nodes
    of an NFS mount: the record is what every node reads); rank 0 checks that nobody wrote over
    it. Every rank learns every finding, so all fail together, in one line. A world of one has
    raised its lock error already."""
    if world <= 1:
        if lock_error is not None:
            raise lock_error
        return
    import os

    import torch.distributed as dist

    from minitron_fast.io import check_run_lock

    box = [lock.record if lock is not None else None, None if lock_error is None else str(lock_error)]
    dist.broadcast_object_list(box, src=0)
    found = None
    if box[0] is not None and box[1] is None:
        try:
            if rank == 0:
                lock.verify()
            elif int(os.environ.get("LOCAL_RANK", "0")) == 0:
                check_run_lock(out, box[0])
        except MinitronError as exc:
            found = str(exc)
    findings: list[str | None] = [None] * world
    dist.all_gather_object(findings, found)
    first = box[1] or next((f for f in findings if f), None)
    if lock_error is not None:
        raise lock_error
    if first is not None:
        raise MinitronError(first)

