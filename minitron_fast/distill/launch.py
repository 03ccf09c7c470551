"""The one place that builds the trainer's command line, for ``minitron-fast distill --nproc N`` and
for the pipeline's training stages.

One process runs ``python -m minitron_fast.distill`` directly (a world of one, no launcher).
Several run under DeepSpeed's launcher, started as ``python -m deepspeed.launcher.runner`` (the
``deepspeed`` script's own entry point, so it works when the venv's ``bin/`` is not on PATH), or
under ``torch.distributed.run --standalone``. DeepSpeed's rendezvous port is a free one unless the
caller gives ``--master_port``: two jobs on one machine never collide on its default 29500.
"""
from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

from minitron_fast.errors import MinitronError

LAUNCHERS = ("auto", "deepspeed", "torchrun", "none")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(config: str | os.PathLike | None, *, num_procs: int = 1, launcher: str = "auto",
                    resume: bool = False, hostfile: str | None = None, launcher_args: Sequence[str] = (),
                    overrides: Sequence[str] = ()) -> list[str]:
    """The command that runs the trainer on ``config`` with ``num_procs`` processes on this node
    (or the hosts of a DeepSpeed ``hostfile``).

    ``launcher``: ``auto`` (DeepSpeed's), ``deepspeed``, ``torchrun`` or ``none`` (always one
    process). ``launcher_args`` go to the launcher, ``overrides`` (``key=value``) to the trainer.

    Example:
        >>> trainer_command("r.yaml", num_procs=2)[1:3]
        ['-m', 'deepspeed.launcher.runner']
    """
    if launcher not in LAUNCHERS:
        raise MinitronError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if num_procs < 1:
        raise MinitronError(f"the number of processes must be at least 1, got {num_procs}")
    if hostfile and not os.path.isfile(hostfile):
        raise MinitronError(f"hostfile {hostfile} does not exist; write one line per node ('node1 slots=8') or "
                            "leave launch.hostfile unset for one node")
    tail = (["--config", os.path.abspath(config)] if config else []) + (["--resume"] if resume else []) + list(overrides)
    if launcher == "none" or (num_procs == 1 and not hostfile):
        return [sys.executable, "-m", "minitron_fast.distill", *tail]
    extra = list(launcher_args)
    port = [] if any(a.startswith("--master_port") for a in extra) else ["--master_port", str(free_port())]
    if launcher == "torchrun":
        if hostfile:
            raise MinitronError("a hostfile needs the deepspeed launcher (launcher=deepspeed or auto), not torchrun")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_procs),
                *extra, "-m", "minitron_fast.distill", *tail]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    if num_procs > 1 or not hostfile:
        cmd += ["--num_gpus", str(num_procs)]
    return cmd + port + extra + ["--module", "minitron_fast.distill", *tail]


def launcher_env(device: str = "auto") -> dict[str, str]:
    """The environment for the launched processes of a trainer on ``device`` (the recipe's
    ``device``): DeepSpeed's CPU accelerator (gloo ranks) for ``cpu``, or when no CUDA device is
    visible, unless the caller chose an accelerator."""
    from minitron_fast.configtools import DeviceConfig

    env = dict(os.environ)
    if not DeviceConfig(device=device).on_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


__all__ = ["LAUNCHERS", "free_port", "launcher_env", "trainer_command"]
