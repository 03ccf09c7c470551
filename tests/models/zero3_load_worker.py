"""Worker of ``test_zero3_loading.py`` (2 CPU ranks under torch.distributed.run): loads each
checkpoint given on the command line with ``load_model`` under ZeRO-3 (``partitioned``), gathers
every parameter and writes, on rank 0, the values and which loader ran."""
from __future__ import annotations

import json
import sys

import torch


def main(out: str, *paths: str) -> None:
    import deepspeed

    from minitron_fast.distill.cpu_memory import _unlink_shm_workspace
    from minitron_fast.distill.engine import partitioned
    from minitron_fast.models import loading

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    by_shard = []
    real = loading.load_zero3_by_shard

    def spy(*a, **k):
        m = real(*a, **k)
        by_shard.append(m is not None)
        return m

    loading.load_zero3_by_shard = spy
    ds = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2, "zero_optimization": {"stage": 3,
          "stage3_param_persistence_threshold": 0}}
    res = {}
    for i, path in enumerate(paths):
        with partitioned(ds):
            m = loading.load_model(path, dtype=torch.float32)
        values, split = {}, []
        for name, p in m.named_parameters():
            split.append(p.numel() < p.ds_numel)
            with deepspeed.zero.GatheredParameters([p]):
                values[name] = p.detach().clone()
        if rank == 0:
            torch.save(values, f"{out}.{i}.pt")
        res[path] = {"by_shard": by_shard[-1], "partitioned": all(split), "eval": not m.training}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    _unlink_shm_workspace()  # DeepSpeed never removes its /dev/shm workspace (see the trainer)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
    from minitron_fast.distill.engine import exit_process

    exit_process(0)  # results are written; skip the teardown that once aborted rank 0 (see exit_process)
