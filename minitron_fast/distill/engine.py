"""Set-up of the trainer's DeepSpeed engine: torch.distributed through DeepSpeed, the DeepSpeed config
(generated from the recipe or the user's JSON, checked against it), models built partitioned under
ZeRO-3, the client optimizer, the learning-rate schedule and activation checkpointing. Moved out of
``trainer.py`` unchanged."""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron_fast.distill.config import ConfigError, DistillConfig
from minitron_fast.distill.cpu_memory import _unlink_shm_workspace
from minitron_fast.distill.launch import free_port
from minitron_fast.ops.zero3 import gathered


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


def all_reduce_to_host(t: torch.Tensor) -> list[float]:
    """Sums ``t`` (1-D, on the training device) over ranks and reads it to the host: one collective
    and one device-to-host read, where the tensor lives (nccl reduces CUDA tensors, gloo CPU ones).
    The trainer reads each micro-batch's loss parts this way: one sync per micro-batch, not one
    per part plus the NaN check's."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        on_gpu = dist.get_backend() == "nccl"
        if on_gpu != t.is_cuda:
            t = t.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        dist.all_reduce(t)
    return t.tolist()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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


def exit_process(code: int = 0) -> None:
    """Ends a rank's process with ``code`` once its work is written, without the interpreter's
    teardown. On CPU (gloo) ranks a native thread of the communicator was seen destroyed still
    joinable during that teardown ("terminate called without an active exception": SIGABRT after a
    run had finished and exported, about one launch in three on a loaded 2-core machine, with or
    without ``destroy_process_group``), and the launcher then reports the whole job failed. Every
    file the trainer writes is complete (written through a temporary name, renamed); standard
    streams and logging are flushed here first."""
    import logging
    import sys

    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (a broken group at exit must not turn success into failure)
        pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code))

