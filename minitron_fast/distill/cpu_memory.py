"""The trainer's memory policy on CPU ranks: DeepSpeed's ``/dev/shm`` workspace unlinked, freed heap
returned to the OS (glibc ``malloc_trim``), large blocks mapped and unmapped when freed
(``mallopt(M_MMAP_THRESHOLD)``), and the resident / peak memory the metrics report. Moved out of
``trainer.py`` unchanged."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from minitron_fast.ops.zero3 import gathered
from minitron_fast.io import peak_rss_mb


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


# the allocator policy lives in minitron_fast.io (importance uses it too); re-exported here
from minitron_fast.io import (MMAP_THRESHOLD, _libc, cap_heap_retention,  # noqa: E402,F401
                              release_freed_memory)
