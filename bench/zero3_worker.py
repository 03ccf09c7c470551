"""A 2-rank DeepSpeed ZeRO-3 distillation with the fused loss, run under torchrun: a tiny student
(lm_head partitioned) through the integration, through the functional API and through the TRL
divergence (the teacher a ZeRO-3 inference engine, partitioned too); rank 0 writes the per-step
losses and each final lm_head to OUT. :func:`reference` is the same run in one process without
DeepSpeed, the judge.

Two callers: tests/integrations/test_zero3.py (2 CPU processes, gloo, ``DS_ACCELERATOR=cpu``) and
``bench device_check`` where 2 GPUs are visible (``DS_ACCELERATOR=cuda``, NCCL, rank ``r`` on
``cuda:r``)::

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2 bench/zero3_worker.py OUT
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402


def tiny(hidden, layers, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=131, hidden_size=hidden, intermediate_size=hidden * 2,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, tie_word_embeddings=False))


def batches(steps, world, device="cpu"):
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 131, (2 * world, 12), generator=g).to(device) for _ in range(steps)]


def on_cuda() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cuda"


def _functional_loss(engine, teacher, ids, fn):
    """The functional API as a DeepSpeed user calls it: final hidden states, then
    ``fused_linear_kd_loss(hidden, <the lm_head module>, teacher_hidden, <teacher lm_head>)``."""
    from minitron_fast.integrations.hf_trainer import decoder_and_head
    from minitron_fast.ops.kd_loss import fused_linear_kd_loss

    s_base, s_head = decoder_and_head(engine)
    t_base, t_head = decoder_and_head(teacher)
    hs = s_base(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    with torch.no_grad():
        ht = t_base(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    return fused_linear_kd_loss(hs, s_head, ht, t_head, labels=ids[:, 1:], temperature=fn.temperature)


PROMPT = 4  # the first PROMPT positions of each row are a prompt: masked out of the TRL-style loss


def trl_inputs(ids):
    """TRL's view of a batch: the completion tokens (every position after the first) and a loss
    mask that leaves the prompt out."""
    completion = ids[:, 1:]
    mask = torch.ones_like(completion)
    mask[:, : PROMPT - 1] = 0
    return completion, mask


def _trl_loss(engine, teacher, ids, fn):
    """minitron_fast.integrations.trl's divergence on the hidden states TRL hands it, the student's
    and the teacher's lm_heads both partitioned (the teacher a ZeRO-3 inference engine, as TRL
    prepares it)."""
    from minitron_fast.ops.kd_step import decoder_and_head, unwrap
    from minitron_fast.integrations.trl import fused_divergence_loss

    s_base, s_head = decoder_and_head(engine)
    t_base, t_head = decoder_and_head(teacher)
    hs = s_base(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    with torch.no_grad():
        ht = t_base(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    completion, mask = trl_inputs(ids)
    loss, _ = fused_divergence_loss(unwrap(engine), unwrap(teacher), hs, ht, completion, mask, beta=0.5,
                                    temperature=fn.temperature)
    return loss


def _train(mode, rank, world, device):
    import deepspeed

    from minitron_fast.integrations.hf_trainer import causal_lm_kd_loss
    from minitron_fast.losses import FusedLinearKDLoss

    student, teacher = tiny(32, 1, 0), tiny(48, 1, 1).eval().to(device)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=cfg)
    if mode == "trl":  # TRL prepares the teacher as a ZeRO-3 inference engine: its lm_head partitioned too
        teacher, *_ = deepspeed.initialize(model=teacher, config={"train_micro_batch_size_per_gpu": 2,
                                                                   "zero_optimization": {"stage": 3}})
        teacher.eval()
    head = engine.module.get_output_embeddings().weight
    partitioned = bool(hasattr(head, "ds_id") and head.data.numel() < head.ds_shape.numel())
    fn = FusedLinearKDLoss(temperature=2.0)
    losses = []
    for ids in batches(3, world, device):
        mine = ids[2 * rank: 2 * rank + 2]
        if mode == "functional":
            loss = _functional_loss(engine, teacher, mine, fn)
        elif mode == "trl":
            loss = _trl_loss(engine, teacher, mine, fn)
        else:
            loss = causal_lm_kd_loss(engine, teacher, mine, loss_fn=fn)
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        losses.append(float(t) / world)
    with deepspeed.zero.GatheredParameters([head]):
        w = head.detach().clone().cpu()
    return losses, partitioned, w


def main(out):
    """Two runs in one launch: through the integration (``causal_lm_kd_loss``) and through the
    functional API handed the partitioned lm_head module."""
    import deepspeed

    device = torch.device("cpu")
    if on_cuda():   # each rank on its own GPU before the process group forms (as the trainer does)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda() else "gloo")  # as a DeepSpeed user does
    torch.autograd.set_detect_anomaly(bool(os.environ.get("Z3_ANOMALY")))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    res = {"world": world, "device": str(device)}
    for mode in ("integration", "functional", "trl"):
        losses, partitioned, w = _train(mode, rank, world, device)
        res[mode] = {"losses": losses, "partitioned": partitioned}
        if rank == 0:
            torch.save(w, f"{out}.{mode}.pt")
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    from minitron_fast.distill.cpu_memory import _unlink_shm_workspace

    _unlink_shm_workspace()  # DeepSpeed never removes its /dev/shm workspace (see the trainer)


def reference(steps=3, world=2, mode="integration", device="cpu"):
    """The same run in one process without DeepSpeed: the whole batch, plain AdamW. Returns the
    per-step losses and the final lm_head (on the CPU)."""
    from minitron_fast.integrations.hf_trainer import causal_lm_kd_loss
    from minitron_fast.losses import FusedLinearKDLoss

    student, teacher = tiny(32, 1, 0).to(device), tiny(48, 1, 1).eval().to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    fn = FusedLinearKDLoss(temperature=2.0)
    losses = []
    for ids in batches(steps, world, device):
        if mode == "trl":  # the TRL-style loss of the whole batch (equal valid counts: the mean of rank means)
            from minitron_fast.integrations.trl import fused_divergence_loss

            hs = student.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            with torch.no_grad():
                ht = teacher.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            loss, _ = fused_divergence_loss(student, teacher, hs, ht, *trl_inputs(ids), beta=0.5,
                                            temperature=fn.temperature)
        else:
            loss = causal_lm_kd_loss(student, teacher, ids, loss_fn=fn)  # equal token counts: mean of rank means
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, student.get_output_embeddings().weight.detach().cpu()


def compare(res: dict, out: str, *, device="cpu", rtol=1e-4, atol=1e-7) -> dict[str, dict]:
    """Per mode: whether the lm_head was partitioned, the largest loss difference to the one-process
    reference (relative), whether the final lm_heads agree, and whether the head trained at all."""
    found = {}
    for mode in ("integration", "functional", "trl"):
        ref_losses, ref_head = reference(mode="trl" if mode == "trl" else "integration", device=device)
        losses = res[mode]["losses"]
        err = max(abs(a - b) / (abs(b) + atol / rtol) for a, b in zip(losses, ref_losses))
        head = torch.load(f"{out}.{mode}.pt")
        found[mode] = {"partitioned": bool(res[mode]["partitioned"]), "loss_rel_err": err,
                       "losses_match": len(losses) == len(ref_losses) and err <= rtol,
                       "head_matches": bool(torch.allclose(head, ref_head, atol=1e-5, rtol=rtol)),
                       "trained": not torch.allclose(head, tiny(32, 1, 0).get_output_embeddings().weight)}
    return found



def launch(out: str | os.PathLike, accelerator: str = "cpu", *, timeout: float = 900) -> dict:
    """Runs this worker under ``torchrun --standalone --nproc_per_node 2`` with
    ``DS_ACCELERATOR=accelerator`` (``cpu``: gloo, one thread a rank; ``cuda``: NCCL on cuda:0 and
    cuda:1). Returns ``{"rc", "stderr", "res"}``, ``res`` rank 0's results (None when it failed)."""
    env = dict(os.environ, DS_ACCELERATOR=accelerator)
    if accelerator == "cpu":
        env["OMP_NUM_THREADS"] = "1"
        env.pop("TRITON_INTERPRET", None)   # the CPU path, not the interpreted kernels
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(Path(__file__).resolve()), str(out)], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return {"rc": None, "stderr": f"timed out after {timeout:.0f} s", "res": None}
    res = json.loads(Path(out).read_text()) if proc.returncode == 0 and Path(out).is_file() else None
    return {"rc": proc.returncode, "stderr": proc.stderr[-3000:], "res": res}

if __name__ == "__main__":
    main(sys.argv[1])
    from minitron_fast.distill.engine import exit_process

    exit_process(0)  # results are written; skip the teardown that can abort a gloo rank (see exit_process)
