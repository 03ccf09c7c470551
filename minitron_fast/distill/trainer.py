"""The distillation / teacher-correction trainer on DeepSpeed ZeRO.

One process per rank (``deepspeed --num_gpus N --module minitron_fast.distill ...``), or a single
process that sets up a world of one. The student (or, in ``correct-teacher`` mode, the teacher)
is wrapped in a DeepSpeed engine; the frozen teacher runs in eval mode without gradients (or as
a ZeRO-3 inference engine). The engine wraps ``KDStudent``, whose forward is the one KD step
(``minitron_fast.integrations.kd_step``: decoders, lm_heads gathered under ZeRO-3, one fused-loss
call returning its KD and CE parts); ``minitron_fast.distill.losses`` sets its options from the
recipe and the models.

Output directory layout (``cfg.out``)::

    run.json          recipe, fingerprint, world size (checked by --resume)
    checkpoints/      DeepSpeed checkpoints (tags step<N>, 'latest' written last)
    metrics.jsonl     one record per logged step (rank 0)
    loss.png          loss curve (at the end)
    final/            the trained model as a stock HF checkpoint (+ tokenizer)
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron_fast.distill import losses
from minitron_fast.distill.config import ConfigError, DistillConfig, dump_config
from minitron_fast.distill.launch import free_port
from minitron_fast.distill.sharding import ShardedBlocks, eval_shard
from minitron_fast.errors import MinitronError
from minitron_fast.integrations.kd_step import KDStudent, head_options
from minitron_fast.integrations.zero3 import gathered
from minitron_fast.io import (LOCK, MARKER, RunLock, atomic_write_json, atomic_write_text, clean_stale_tmp_in,
                              peak_rss_mb, same_or_inside, save_figure, write_marker)

log = logging.getLogger("minitron_fast.distill")


class NaNLossError(MinitronError, FloatingPointError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class ResumeError(MinitronError, ValueError):
    """--resume pointed at a directory of a different run, or a fresh run at a used directory."""


# -- distributed setup ----------------------------------------------------------------------------

def init_distributed(on_cuda: bool | None = None) -> tuple[int, int]:
    """Initializes torch.distributed through DeepSpeed: nccl and DeepSpeed's CUDA accelerator when
    ``on_cuda`` (default: when CUDA is available), else gloo and its CPU accelerator
    (``DS_ACCELERATOR=cpu``), also on a machine with CUDA (``device: cpu``). A process started
    without a launcher becomes a world of one. Returns ``(rank, world_size)``."""
    if on_cuda is None:
        on_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed first picks its accelerator
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not on_cuda and get_accelerator().device_name() != "cpu":
        raise ConfigError(f"device=cpu but DeepSpeed's accelerator is {get_accelerator().device_name()} "
                          f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')}); unset DS_ACCELERATOR or set it to cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
        if not on_cuda:
            _unlink_shm_workspace()
    return dist.get_rank(), dist.get_world_size()


SHM_WORKSPACE = "/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def _unlink_shm_workspace() -> None:
    """Removes the name of this rank's DeepSpeed CPU all-reduce workspace from ``/dev/shm``.

    DeepSpeed's CPU communicator (``ops/csrc/cpu/comm/shm.cpp``) creates one 67 MB POSIX shared-
    memory segment per rank, named after the uid, ``MASTER_ADDR``, ``MASTER_PORT`` and the rank,
    and never unlinks it (its ``shared_close`` is never called). Every CPU run therefore left
    67 MB per rank in the RAM-backed ``/dev/shm`` for good (11 GB after a day of runs on a 24 GB
    machine). Each rank maps all ranks' segments inside ``init_distributed``; after a barrier the
    names are no longer needed, and unlinking a mapped segment leaves the mappings valid until the
    process exits, so nothing leaks even when the job is killed later. Called for CPU ranks only
    (DeepSpeed's CPU accelerator, also on a machine with CUDA for ``device: cpu``)."""
    import torch.distributed as dist

    if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
        return
    dist.barrier()  # every rank has opened every other rank's segment
    name = Path(SHM_WORKSPACE.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                                     port=os.environ.get("MASTER_PORT", ""), rank=dist.get_rank()))
    name.unlink(missing_ok=True)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sums the CPU tensor ``t`` over ranks in place (through the current GPU under nccl, which
    reduces only CUDA tensors)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t)
    return t


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resident_memory_mb() -> float | None:
    """Resident set size of this process now (Linux ``/proc/self/statm``), MB; None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of ``device`` (CUDA) or peak resident set size of this process (CPU), MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


@contextlib.contextmanager
def partitioned(ds_config: dict[str, Any] | None):
    """While active, transformers builds models under ``deepspeed.zero.Init`` (its DeepSpeed
    integration, ``HfDeepSpeedConfig``) when ``ds_config`` is ZeRO stage 3: each rank allocates
    only its partition, and ``load_model`` fills it shard file by shard file in the training
    dtype (``models.loading.load_zero3_by_shard``), so no rank ever holds the whole model (with
    ``offload_param`` the partitions live in CPU memory). A no-op for ``None`` or stages 0-2."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference: keep it alive
    try:
        yield keep
    finally:
        unset_hf_deepspeed_config()


def _hidden_size(model: str) -> int:
    from minitron_fast.models import view_class_for_config
    from minitron_fast.models.loading import load_config

    c = load_config(model)
    return view_class_for_config(c).geometry_of(c).hidden_size


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, or None (not glibc). Looked up once: ``find_library`` runs ldconfig."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - not glibc
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def release_freed_memory() -> None:
    """Returns freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere). Building a
    model under ``zero.Init`` allocates and frees every whole parameter once, and each CPU step
    frees its gathered parameters, full-size gradients and temporaries; glibc would otherwise
    keep those pages resident (measured on a 2-rank ZeRO-3 CPU rehearsal, 344 M teacher: the
    resident size between steps grew 2.8 -> 3.1 -> 3.2 GB over three steps; trimmed after each
    step it stays at 2.45 GB)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


MMAP_THRESHOLD = 4 << 20  # bytes: CPU training blocks of this size or more are mapped, and unmapped when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def cap_heap_retention(threshold: int = MMAP_THRESHOLD) -> bool:
    """Makes glibc serve allocations of ``threshold`` bytes or more with their own mappings,
    returned to the OS as soon as they are freed (``mallopt(M_MMAP_THRESHOLD)``). By default
    glibc raises that threshold to the size of each mapped block freed, up to 32 MB, after which
    a ZeRO-3 CPU rank's per-module gathers (4-16 MB each), recomputed activations and loss
    chunks come from the heap and stay resident once freed, unusable by the 100+ MB blocks
    (heads, their gradients) that are mapped anyway. Measured on ``bench scale`` (2 ranks, 1.17 B
    bf16 teacher): each rank's head-loss peak fell from ~5.6 to ~5.15 GB (rss before the step
    4.37 GB), the single process's peak was unchanged. A no-op (False) off glibc, or when the
    user set ``MALLOC_MMAP_THRESHOLD_`` themselves."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1)


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recomputes each decoder layer's activations in the backward pass instead of storing them
    (transformers' non-reentrant gradient checkpointing): activation memory per micro-batch
    drops from every layer's intermediates to one layer's plus the layer inputs. The loss and
    gradients are unchanged (the recomputation is the same forward)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def adamw(params: list[nn.Parameter], cfg: DistillConfig) -> torch.optim.AdamW:
    """The client optimizer: torch's AdamW with its fused kernel (CPU and CUDA, torch >= 2.4). The
    per-tensor loop it replaces allocates a temporary of each tensor's size for the update; under
    ZeRO that tensor is the rank's whole flat partition (measured on a 2-rank ZeRO-3 CPU
    rehearsal, 344 M teacher, fp32: the optimizer step's peak RSS fell from 3.3-3.4 GB to
    2.7-2.8 GB). Falls back to the default implementation where fused is not available."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
           for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError):  # pragma: no cover - older torch
            pass
    return torch.optim.AdamW(params, **kw)


# -- schedule ------------------------------------------------------------------------------------

def lr_lambda(cfg: DistillConfig):
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine/linear decay to ``min_lr`` at
    ``steps`` (or constant). Returns the multiplier of ``lr`` for a step."""
    floor = cfg.min_lr / cfg.lr

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "linear":
            return floor + (1 - floor) * (1 - frac)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


# -- DeepSpeed config -----------------------------------------------------------------------------

SUB_GROUP_SIZE = 2 * 10**7  # ZeRO-3 optimizer sub-group: an fp32 gradient of at most 80 MB per update step


def _size_buckets(zero: dict[str, Any], hidden: int | None) -> None:
    """Communication buckets sized to the model, as transformers' ``"auto"`` does (hidden^2
    elements; DeepSpeed's defaults are 5e8 elements: a 2 GB fp32 gradient bucket on every rank
    whatever the model's size, more than a small model's whole partition)."""
    if not hidden:
        return
    stage = zero.get("stage", 0)
    if stage >= 2:
        zero.setdefault("reduce_bucket_size", hidden * hidden)
        zero.setdefault("allgather_bucket_size", hidden * hidden)
    if stage == 3:  # (the prefetch bucket stays DeepSpeed's: a smaller one leaves the tied lm_head in flight
        # when the loss's GatheredParameters exits)
        zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)
        # the optimizer steps the partition in sub-groups, each with an fp32 gradient built for the
        # update: DeepSpeed's 1e9-element default builds the whole partition's at once
        zero.setdefault("sub_group_size", SUB_GROUP_SIZE)


def _stage3_residency(zero: dict[str, Any], d: Any) -> None:
    """How much of a ZeRO-3 model a rank keeps gathered: parameters below
    ``persistence_threshold`` elements are never partitioned, and ``max_live_parameters`` bounds
    both the gathered elements a rank holds at once and the reuse distance below which a gathered
    parameter is kept for its next use (DeepSpeed's ``stage3_max_live_parameters`` and
    ``stage3_max_reuse_distance``). DeepSpeed's default, 1e9 elements, keeps a whole student of up
    to 1e9 parameters gathered from its forward to its backward (measured: all 125 M parameters
    of a 344 M-teacher rehearsal's student, on each rank); 0 re-gathers each module when used."""
    if d.persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = d.persistence_threshold
    if d.max_live_parameters is not None:
        zero["stage3_max_live_parameters"] = d.max_live_parameters
        zero["stage3_max_reuse_distance"] = d.max_live_parameters


def deepspeed_config(cfg: DistillConfig, world: int, hidden: int | None = None) -> tuple[dict[str, Any], bool]:
    """The DeepSpeed config for ``cfg`` on ``world`` ranks: the user's JSON (checked against the
    recipe) or one generated from the recipe (communication buckets sized by the trained model's
    ``hidden`` size when given). Returns ``(config, uses_client_optimizer)``."""
    d = cfg.deepspeed
    want = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world}
    if d.config_file:
        p = Path(d.config_file)
        try:
            user = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read DeepSpeed config {p}: {exc}") from exc
        for k, v in want.items():
            if k in user and user[k] != "auto" and int(user[k]) != v:
                raise ConfigError(
                    f"DeepSpeed config {p} sets {k}={user[k]} but the recipe gives {v} (micro_batch_size "
                    f"{cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x {world} ranks); make them agree")
        ds = dict(user)
        ds.update(want)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage != d.zero_stage:
            raise ConfigError(f"DeepSpeed config {p} uses ZeRO stage {stage} but the recipe says deepspeed.zero_stage="
                              f"{d.zero_stage}; make them agree")
        for k in ("scheduler",):
            if k in ds:
                raise ConfigError(f"DeepSpeed config {p} has a {k!r} section; the recipe owns the schedule "
                                  "(lr, min_lr, warmup_steps, schedule): remove it")
        client = "optimizer" not in ds
        if client:
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
        return ds, client
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.on_cuda()}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.on_cuda()}
    if d.zero_stage == 3:
        _stage3_residency(zero, d)
    _size_buckets(zero, hidden)
    ds = dict(want, zero_optimization=zero, gradient_clipping=d.gradient_clipping, steps_per_print=10**9,
              wall_clock_breakdown=False, bf16={"enabled": bool(d.bf16)})
    client = d.optimizer == "torch_adamw"
    if client:
        ds["zero_force_ds_cpu_optimizer"] = False
        ds["zero_allow_untested_optimizer"] = True
    else:
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.adam_betas),
                                                         "weight_decay": cfg.weight_decay}}
    return ds, client


def _teacher_ds_config(cfg: DistillConfig, world: int, hidden: int | None = None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": 3}
    _stage3_residency(zero, cfg.deepspeed)
    _size_buckets(zero, hidden)
    if cfg.deepspeed.offload_param or cfg.deepspeed.teacher_offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.on_cuda()}
    return {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.micro_batch_size * world, "zero_optimization": zero,
            "bf16": {"enabled": bool(cfg.deepspeed.bf16)}, "steps_per_print": 10**9}


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


# -- the trainer ----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: DistillConfig, *, resume: bool = False, progress: bool = True):
        self.cfg = cfg.validate()
        self.resume = resume
        self.progress = progress

    # ----- setup
    def _load(self):
        from minitron_fast.models.loading import load_model, load_tokenizer, resolve_model_path

        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
        dev = self.device
        if cfg.teacher_logits:
            return self._load_offline(dtype, dev)
        t_tok = load_tokenizer(cfg.teacher)
        self.n_tokens = len(t_tok)
        if cfg.mode == "distill":
            losses.check_tokenizers(t_tok, load_tokenizer(cfg.student), cfg.teacher, cfg.student)
        self.tokenizer_dir = resolve_model_path(cfg.student if cfg.mode == "distill" else cfg.teacher)
        trained = cfg.student if cfg.mode == "distill" else cfg.teacher
        self.hidden = {"student": _hidden_size(trained), "teacher": _hidden_size(cfg.teacher)}
        s_ds = deepspeed_config(cfg, self.world, self.hidden["student"])[0] if cfg.deepspeed.zero_stage == 3 else None
        t_ds = _teacher_ds_config(cfg, self.world, self.hidden["teacher"]) if cfg.deepspeed.teacher_zero3 else None
        with partitioned(t_ds if cfg.mode == "distill" else s_ds):
            teacher = load_model(cfg.teacher, dtype=dtype, device=dev, attn_implementation=cfg.attn_implementation)
        if cfg.mode == "distill":
            with partitioned(s_ds):
                student = load_model(cfg.student, dtype=dtype, device=dev,
                                     attn_implementation=cfg.attn_implementation)
        else:
            student, teacher = teacher, None
        if cfg.deepspeed.zero_stage == 3 or cfg.deepspeed.teacher_zero3:
            release_freed_memory()
        blocks, eval_blocks = self._data(t_tok)
        return student, teacher, blocks, eval_blocks

    def _load_offline(self, dtype: torch.dtype, dev: torch.device):
        """Student and data for a run from stored teacher logits: the teacher is never loaded;
        the logits' manifest is checked against this run's tokenizer, data, seq_len (and teacher,
        when the recipe names one). Returns ``(student, None, blocks, eval_blocks)``."""
        from minitron_fast.artifacts import teacher_logits as tl
        from minitron_fast.models.loading import load_model, load_tokenizer, resolve_model_path

        cfg = self.cfg
        reader = tl.TeacherLogits(cfg.teacher_logits)
        tok = load_tokenizer(cfg.student)
        self.n_tokens = len(tok)
        self.tokenizer_dir = resolve_model_path(cfg.student)
        self.hidden = {"student": _hidden_size(cfg.student), "teacher": None}  # no teacher is built
        s_ds = deepspeed_config(cfg, self.world, self.hidden["student"])[0] if cfg.deepspeed.zero_stage == 3 else None
        with partitioned(s_ds):
            student = load_model(cfg.student, dtype=dtype, device=dev, attn_implementation=cfg.attn_implementation)
        if s_ds is not None:
            release_freed_memory()
        teacher_digest = tl.model_digest(resolve_model_path(cfg.teacher)) if cfg.teacher else None
        run = tl.RunIdentity(seq_len=cfg.data.seq_len, tokenizer_digest=tl.tokenizer_digest(tok),
                             vocab_size=int(student.config.vocab_size), data_source=str(cfg.data.source),
                             text_field=cfg.data.text_field, teacher_digest=teacher_digest)
        reader.check_run(run)  # cheap checks first, then the data itself
        blocks, eval_blocks = self._data(tok, max_blocks=reader.n_blocks if cfg.data.max_blocks is None else None)
        # every block is checked against its stored hash as it is read; here, early, the first 1,024
        reader.check_run(run, tl.block_hashes(blocks, limit=1024), n_blocks=len(blocks))
        self.stored_logits = reader
        return student, None, blocks, eval_blocks

    def _loss_setup(self, student: nn.Module, teacher: nn.Module | None, n_tokens: int) -> nn.Module | None:
        """The KD step's options (``self.spec``), the intermediate pairs and the student->teacher
        projection (returned; None without pairs), from the recipe and both models."""
        from minitron_fast.models.loading import resolve_model_path

        cfg = self.cfg
        self.pairs: list[tuple[int, int]] = []
        if cfg.mode == "correct-teacher":
            self.spec = losses.kd_spec(cfg.loss, **head_options(student)).lm_only()
            return None
        if cfg.teacher_logits:  # stored rows of the teacher's vocabulary; a padded student head is cut to it
            opts = head_options(student)
            if student.config.vocab_size > self.stored_logits.vocab_size:
                opts["vocab_size"] = self.stored_logits.vocab_size
            self.spec = losses.kd_spec(cfg.loss, **opts)
            return None
        proj = None
        if cfg.intermediate.weight > 0:
            self.pairs = losses.layer_pairs(cfg.intermediate.pairs, student.config.num_hidden_layers,
                                            teacher.config.num_hidden_layers)
            student_dir = resolve_model_path(cfg.student)
            proj = losses.projection(student.config.hidden_size, teacher.config.hidden_size,
                                     losses.plan_hidden_channels(student_dir), where=str(student_dir),
                                     dtype=next(student.parameters()).dtype, device=self.device)
        self.spec = losses.kd_spec(cfg.loss, inter_weight=cfg.intermediate.weight if self.pairs else 0.0,
                                   **head_options(student, teacher, n_tokens))
        return proj

    def _data(self, tokenizer, *, max_blocks: int | None = None):
        """The training split as memory-mapped ``TokenBlocks`` (each rank reads only the blocks of
        its micro-batches) and the held-out blocks (a small ``[n, T]`` tensor, or None)."""
        from minitron_fast.data import TokenBlocks, token_blocks

        d = self.cfg.data
        blocks = TokenBlocks.open(tokenizer, d.source, "train", d.seq_len, max_blocks=max_blocks or d.max_blocks,
                                  text_field=d.text_field, cache=d.cache_dir,
                                  progress=self.progress and int(os.environ.get("RANK", "0")) == 0).require_one()
        eval_blocks = None
        if d.eval_blocks > 0:
            eval_blocks = token_blocks(tokenizer, d.source, "heldout", d.seq_len, max_blocks=d.eval_blocks,
                                       text_field=d.text_field, cache=d.cache_dir)
        return blocks, eval_blocks

    def _check_memory_plan(self) -> None:
        """On a GPU, says before loading anything when the memory plan does not fit the device,
        and names the knobs (``minitron-fast memory`` prints the whole plan)."""
        if self.device.type != "cuda" or self.cfg.teacher_logits:  # the plan models a live teacher only
            return
        from minitron_fast.distill.memory import plan_config

        try:
            p = plan_config(self.cfg, self.world, gpu_mem=torch.cuda.get_device_properties(self.device).total_memory)
        except (MinitronError, OSError, ValueError) as exc:  # a plan is advice: never block training on it
            log.info("no memory plan (%s)", exc)
            return
        if p.fits is False:
            log.warning("memory plan: %.1f GB per GPU does not fit this %.0f GB GPU; change %s",
                        p.total / 1e9, p.gpu_mem / 1e9, "; or ".join(p.advice(self.cfg)) or "the micro-batch")

    # ----- main entry
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # cuda:LOCAL_RANK, or the CPU (also where CUDA exists, for device: cpu); cuda without CUDA
        # is a one-line error here, before anything loads
        self.device = torch.device(cfg.train_device())
        if self.device.type == "cpu":  # freed gathers and temporaries go back to the OS (before anything loads)
            cap_heap_retention()
        # Inputs and the run directory are checked before the process group starts (ranks and
        # world size as the launcher sets them), and nothing is recorded until they pass.
        out = Path(cfg.out)
        ckpt_dir = out / "checkpoints"
        _check_inputs(cfg, out)
        _check_model_inputs(cfg)
        env_rank, env_world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self._lock = RunLock(out).acquire() if env_rank == 0 else None  # released when run() returns or dies
        try:
            resume_step = _check_out_dir(cfg, out, self.resume, env_world)
            rank, world = init_distributed(on_cuda=self.device.type == "cuda")
            self.rank, self.world = rank, world
            import deepspeed

            return self._run(out, ckpt_dir, rank, world, deepspeed, resume_step)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _run(self, out: Path, ckpt_dir: Path, rank: int, world: int, deepspeed: Any,
             resume_step: int | None) -> dict[str, Any]:
        cfg = self.cfg
        if rank == 0:
            clean_stale_tmp_in(out)
            _clean_tmp_checkpoints(ckpt_dir)
        _barrier()

        torch.manual_seed(cfg.seed)
        if rank == 0:
            self._check_memory_plan()
        student, teacher, blocks, eval_blocks = self._load()
        if rank == 0:  # recorded only now that every input loaded: a run that failed validation reruns as is
            write_marker(out)
            atomic_write_json(out / "run.json", {"fingerprint": cfg.fingerprint(), "world_size": world,
                                                 "recipe": cfg.to_dict()})
            atomic_write_text(out / "recipe.yaml", dump_config(cfg))
        _barrier()
        proj = self._loss_setup(student, teacher, self.n_tokens)
        student.train()
        student.config.use_cache = False
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(student)
        wrapped = KDStudent(student, proj)

        ds_cfg, client = deepspeed_config(cfg, world, self.hidden["student"])
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = None
        if client:
            optimizer = adamw(params, cfg)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
            engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_cfg)
        else:
            def sched(opt):
                return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

            engine, _, _, _ = deepspeed.initialize(model=wrapped, model_parameters=params, lr_scheduler=sched,
                                                   config=ds_cfg)
        self.engine = engine

        t_engine = None
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            if cfg.deepspeed.teacher_zero3:
                t_engine, _, _, _ = deepspeed.initialize(model=teacher, config=_teacher_ds_config(cfg, world,
                                                                                          self.hidden["teacher"]))
                t_engine.eval()
                teacher = t_engine.module
        from minitron_fast.distill.teacher import LiveTeacher, StoredTeacher

        L = cfg.loss
        if cfg.teacher_logits:  # the teacher's source: stored rows, or the (optionally top-k) live model
            self.teacher = StoredTeacher(self.stored_logits, topk=L.topk, semantics=L.topk_semantics)
        elif teacher is not None:
            self.teacher = LiveTeacher(teacher, topk=L.topk, semantics=L.topk_semantics)
        else:
            self.teacher = None

        data = ShardedBlocks(blocks, world=world, rank=rank, micro_batch=cfg.micro_batch_size,
                             grad_accum=cfg.grad_accum, seed=cfg.data.seed)
        start = 0
        if resume_step is not None:
            with weights_only_load():
                _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=f"step{resume_step}")
            if client_state is None:
                raise ResumeError(f"--resume: checkpoint step{resume_step} in {ckpt_dir} could not be loaded")
            if client_state.get("fingerprint") != cfg.fingerprint():
                raise ResumeError(f"--resume: checkpoint in {ckpt_dir} belongs to a different run")
            start = int(client_state["step"])
            changed = data.changed_since(client_state.get("data"), start)
            if changed:
                raise ResumeError(f"--resume: the training data changed since checkpoint step{start} in {ckpt_dir} "
                                  f"({', '.join(changed)}); resume with the run's data, or start a new run")
            if "torch_rng" in client_state:
                torch.set_rng_state(client_state["torch_rng"])
            if rank == 0:
                log.info("resumed from %s/step%d (data position %s)", ckpt_dir, resume_step, client_state.get("data"))
        metrics_path = out / "metrics.jsonl"
        if rank == 0:
            _truncate_metrics(metrics_path, start)
        _barrier()

        result = self._loop(engine, data, eval_blocks, start, ckpt_dir, metrics_path)

        if cfg.export:
            self._export(engine, out / "final", start)
        if rank == 0:
            try:
                plot_metrics(metrics_path, out / "loss.png")
            except ImportError:
                log.info("matplotlib is not installed: no loss.png")
        _barrier()
        return result

    # ----- one micro-batch
    def _step(self, engine, ids: torch.Tensor, blocks: torch.Tensor, num_items: float) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch (train blocks ``blocks``), each ``sum / num_items``: the
        KD step (``integrations.kd_step``) run as the engine's forward, so ZeRO-3 gathers the
        student's lm_head and projection inside it and again for backward. The teacher comes from
        its source (``distill.teacher``): the model, or top-k rows (stored, or made online)."""
        ids = ids.to(self.device)
        teacher = self.teacher.for_batch(ids, blocks) if self.teacher is not None else None
        return engine(ids, teacher, spec=self.spec, num_items=num_items, pairs=self.pairs)

    # ----- training loop
    def _loop(self, engine, data: ShardedBlocks, eval_blocks, start: int, ckpt_dir: Path, metrics_path: Path):
        from tqdm.auto import tqdm

        cfg = self.cfg
        rank, world = self.rank, self.world
        last_eval = None
        if start == 0 and eval_blocks is not None:
            last_eval = self.evaluate(engine, eval_blocks)
            self._log(metrics_path, {"step": 0, "eval_loss": last_eval})
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.mode} (ZeRO-{cfg.deepspeed.zero_stage}, {world} rank"
                   f"{'s' if world > 1 else ''})", disable=not (self.progress and rank == 0), dynamic_ncols=True)
        final_loss = None
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr_now = engine.get_lr()[0] if engine.get_lr() else None  # the lr this step applies
            block_ids = data.micro_batch_indices(step)
            micros = [data.blocks[i] for i in block_ids]
            n_local = sum((m[:, 1:] != losses.IGNORE_INDEX).sum().item() for m in micros)
            num_items = float(_all_reduce(torch.tensor([float(n_local)], dtype=torch.float64))[0])
            sums: dict[str, float] = {}
            for ids, blk in zip(micros, block_ids):
                parts = self._step(engine, ids, blk, num_items)
                check = _all_reduce(parts["loss"].detach().float().reshape(1).clone())
                if not torch.isfinite(check).all():
                    raise NaNLossError(
                        f"loss is {float(check[0])} at step {step + 1}; stopped before applying it. The last good "
                        f"checkpoint is {self._latest(ckpt_dir)}; lower lr or check the data and models")
                # DeepSpeed averages gradients over ranks: multiply by world so the update is the
                # gradient of sum(loss) / num_items over the whole step (scale_wrt_gas=False: our
                # num_items already spans the micro-batches).
                engine.backward(parts["loss"] * world, scale_wrt_gas=False)
                engine.step()
                for k in ("loss", "kd", "lm", "inter"):  # the parts come from the same pass as the loss
                    if k in parts:
                        sums[k] = sums.get(k, 0.0) + float(parts[k].detach())
            if self.device.type == "cpu":  # the step's freed gathers and temporaries go back to the OS
                release_freed_memory()
            red = _all_reduce(torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64))
            rec: dict[str, Any] = {"step": step + 1}
            rec.update({k: float(v) for k, v in zip(sorted(sums), red)})
            dt = time.perf_counter() - t0
            rec.update(lr=None if lr_now is None else float(lr_now), tokens=int(num_items),
                       tokens_per_s=data.global_batch * data.seq_len / dt, step_s=dt,
                       peak_mem_mb=peak_memory_mb(self.device), rss_mb=resident_memory_mb())
            final_loss = rec["loss"]
            done = step + 1
            if eval_blocks is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                last_eval = rec["eval_loss"] = self.evaluate(engine, eval_blocks)
            if done % cfg.log_every == 0 or done == cfg.steps or "eval_loss" in rec:
                self._log(metrics_path, rec)
            if done % cfg.save_every == 0 or done == cfg.steps:
                self._save(engine, ckpt_dir, done, data)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        bar.close()
        return {"final_loss": final_loss, "eval_loss": last_eval, "steps": cfg.steps, "world_size": world}

    def _latest(self, ckpt_dir: Path) -> str:
        p = ckpt_dir / "latest"
        return str(ckpt_dir / p.read_text().strip()) if p.is_file() else "none (no checkpoint was written yet)"

    def _log(self, path: Path, rec: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def _save(self, engine, ckpt_dir: Path, step: int, data: ShardedBlocks) -> None:
        state = {"step": step, "fingerprint": self.cfg.fingerprint(), "data": data.position(step),
                 "torch_rng": torch.get_rng_state()}
        # written under a hidden temporary tag, renamed when every rank is done, then 'latest':
        # a kill mid-save never leaves a stepN/ that looks complete
        tmp_tag, tag = f"{_TMP_CKPT}{step}", f"step{step}"
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=state, save_latest=False)
        _barrier()
        if self.rank == 0:
            final = ckpt_dir / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(ckpt_dir / tmp_tag, final)
            atomic_write_text(ckpt_dir / "latest", tag)
        _barrier()

    @torch.no_grad()
    def evaluate(self, engine, eval_blocks: torch.Tensor) -> float:
        """Held-out next-token loss (nats/token) of the trained model, over all ranks."""
        engine.eval()
        spec = self.spec.lm_only()
        total = torch.zeros(2, dtype=torch.float64)
        try:
            for idx, wts in eval_shard(eval_blocks.shape[0], self.world, self.rank, self.cfg.micro_batch_size):
                ids = eval_blocks[idx].to(self.device)
                labels = ids.clone()
                labels[torch.tensor(wts) == 0] = losses.IGNORE_INDEX  # padding repeats count for nothing
                parts = engine(ids, None, labels=labels, spec=spec, num_items=1.0)  # the summed NLL
                total[0] += float(parts["lm"])
                total[1] += float(parts["tokens"])
        finally:
            engine.train()
        _all_reduce(total)
        return float(total[0] / total[1])

    def _export(self, engine, final: Path, start: int) -> None:
        from minitron_fast.models.export import export_hf

        model = engine.module.model
        params = list(model.parameters())
        ctx = gathered(*params)
        with ctx:
            if self.rank == 0:
                record = {"stage": "distill", "mode": self.cfg.mode, "teacher": self.cfg.teacher,
                          "student": self.cfg.student, "steps": self.cfg.steps, "recipe": self.cfg.to_dict()}
                plan = losses.plan_record(self.tokenizer_dir)  # the trained model's prune plan, carried on
                if plan is not None:
                    record["plan"] = plan
                export_hf(model, final, tokenizer_from=self.tokenizer_dir, record=record, overwrite=True,
                          protect=[p for p in (self.cfg.teacher, self.cfg.student, self.cfg.teacher_logits)
                                   if p and p != "demo"])
        _barrier()


def train(cfg: DistillConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Runs distillation or teacher correction as ``cfg`` describes (this process is one rank of
    the launched world, or a world of one). Returns ``{final_loss, eval_loss, steps, world_size}``.

    Example:
        >>> from minitron_fast.distill import load_config, train
        >>> train(load_config("configs/distill/demo.yaml", ["steps=20"]))
    """
    return Trainer(cfg, resume=resume, progress=progress).run()


# -- records ---------------------------------------------------------------------------------------

def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def plot_metrics(metrics: str | os.PathLike, png: str | os.PathLike) -> None:
    """The loss curve (training loss per step and held-out loss) of a ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    parts = [k for k in ("kd", "lm", "inter") if any(k in r for r in recs)]
    for k in parts if len(parts) > 1 else ():
        ax.plot(*zip(*[(r["step"], r[k]) for r in recs if k in r]), label=k, alpha=0.6)
    ev = [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out LM loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)
