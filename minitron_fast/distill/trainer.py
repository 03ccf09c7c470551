"""The distillation / teacher-correction trainer on DeepSpeed ZeRO.

One process per rank (``deepspeed --num_gpus N --module minitron_fast.distill ...``), or a single
process that sets up a world of one. The student (or, in ``correct-teacher`` mode, the teacher)
is wrapped in a DeepSpeed engine; the frozen teacher runs in eval mode without gradients (or as
a ZeRO-3 inference engine). The engine wraps ``KDStudent``, whose forward is the one KD step
(``minitron_fast.ops.kd_step``: decoders, lm_heads gathered under ZeRO-3, one fused-loss
call returning its KD and CE parts); ``minitron_fast.distill.kd_setup`` builds its ``KDSpec`` from
the recipe and the models.

Output directory layout (``cfg.out``)::

    run.json          recipe, fingerprint, world size (checked by --resume)
    checkpoints/      DeepSpeed checkpoints (tags step<N>, 'latest' written last)
    metrics.jsonl     one record per logged step (rank 0)
    loss.png          loss curve (at the end)
    final/            the trained model as a stock HF checkpoint (+ tokenizer)
"""
from __future__ import annotations

import contextlib
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

from minitron_fast.distill import kd_setup
from minitron_fast.distill.checkpoints import (_check_inputs, _check_model_inputs, _check_out_dir, check_lock_across_ranks,
                                               check_shared_out_dir,
                                               _clean_tmp_checkpoints, ResumeError, _TMP_CKPT, _truncate_metrics,
                                               weights_only_load)
from minitron_fast.distill.config import DistillConfig, dump_config
from minitron_fast.distill.cpu_memory import (cap_heap_retention, peak_memory_mb, release_freed_memory,
                                              resident_memory_mb)
from minitron_fast.distill.on_policy import on_policy_step, rollout
from minitron_fast.distill.engine import (adamw, _all_reduce, all_reduce_to_host, _barrier, deepspeed_config,
                                          enable_activation_checkpointing, _hidden_size, init_distributed, lr_lambda,
                                          partitioned, _teacher_ds_config)
from minitron_fast.distill.sharding import ShardedBlocks, eval_shard
from minitron_fast.errors import MinitronError
from minitron_fast.ops.kd_step import KDStudent, head_options
from minitron_fast.ops.zero3 import gathered
from minitron_fast.io import (RunLock, atomic_write_json, atomic_write_text, clean_stale_tmp_in, save_figure,
                              write_marker)

log = logging.getLogger("minitron_fast.distill")


class NaNLossError(MinitronError, FloatingPointError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


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
            kd_setup.check_tokenizers(t_tok, load_tokenizer(cfg.student), cfg.teacher, cfg.student)
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
            self.spec = kd_setup.kd_spec(cfg.loss, **head_options(student)).lm_only()
            return None
        if cfg.teacher_logits:  # stored rows of the teacher's vocabulary; a padded student head is cut to it
            opts = head_options(student)
            if student.config.vocab_size > self.stored_logits.vocab_size:
                opts["vocab_size"] = self.stored_logits.vocab_size
            self.spec = kd_setup.kd_spec(cfg.loss, **opts)
            return None
        proj = None
        if cfg.intermediate.weight > 0:
            self.pairs = kd_setup.layer_pairs(cfg.intermediate.pairs, student.config.num_hidden_layers,
                                              teacher.config.num_hidden_layers)
            student_dir = resolve_model_path(cfg.student)
            proj = kd_setup.projection(student.config.hidden_size, teacher.config.hidden_size,
                                       kd_setup.plan_hidden_channels(student_dir), where=str(student_dir),
                                       dtype=next(student.parameters()).dtype, device=self.device)
        self.spec = kd_setup.kd_spec(cfg.loss, inter_weight=cfg.intermediate.weight if self.pairs else 0.0,
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
        # The run lock: taken by global rank 0 on the shared out (released when run() returns or
        # dies), and checked by every other node's local rank 0 once the process group is up. In
        # a world of one a lock error is raised at once; with more ranks rank 0 keeps it and still
        # joins the rendezvous, so that every rank fails together, in one line, instead of the
        # others waiting for rank 0 until the rendezvous times out.
        self._lock, lock_error = None, None
        if env_rank == 0:
            try:
                self._lock = RunLock(out).acquire()
            except (MinitronError, OSError) as exc:
                if env_world <= 1:
                    raise
                lock_error = exc
        try:
            try:
                resume_step = _check_out_dir(cfg, out, self.resume, env_world)
            except MinitronError:
                if lock_error is not None:  # the other ranks fail on the same check, before the rendezvous
                    raise lock_error from None
                raise
            if self.device.type == "cuda":  # NCCL and the object collectives use the current device
                torch.cuda.set_device(self.device)
            rank, world = init_distributed(on_cuda=self.device.type == "cuda")
            self.rank, self.world = rank, world
            check_lock_across_ranks(out, self._lock, lock_error, rank, world)
            check_shared_out_dir(out, rank, world)  # node-local run directories fail here, on every rank
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
    def _step(self, engine, ids: torch.Tensor, blocks: torch.Tensor, num_items: float,
              labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch (train blocks ``blocks``), each ``sum / num_items``: the
        KD step (``ops.kd_step``) run as the engine's forward, so ZeRO-3 gathers the
        student's lm_head and projection inside it and again for backward. The teacher comes from
        its source (``distill.teacher``): the model, or top-k rows (stored, or made online).
        ``labels``: an on-policy micro-batch's (the written tokens only); None: every token."""
        ids = ids.to(self.device)
        teacher = self.teacher.for_batch(ids, blocks) if self.teacher is not None else None
        kw = {} if labels is None else {"labels": labels.to(self.device)}
        return engine(ids, teacher, spec=self.spec, num_items=num_items, pairs=self.pairs, **kw)

    def _micro_batches(self, engine, step: int, data: ShardedBlocks) -> tuple[list, list, list, bool]:
        """This step's micro-batches ``(blocks, their train-block indices, labels, on_policy)``: the
        data's, or on an on-policy step (``on_policy.lmbda``) the student's rollouts of them, whose
        labels cover the written tokens only (None: every token)."""
        cfg = self.cfg
        block_ids = data.micro_batch_indices(step)
        micros = [data.blocks[i] for i in block_ids]
        op = cfg.on_policy
        if not on_policy_step(op.lmbda, cfg.seed, step):
            return micros, block_ids, [None] * len(micros), False
        model = engine.module.model
        synced = cfg.deepspeed.zero_stage == 3 and self.world > 1
        outs = [rollout(model, m.to(self.device), max_new_tokens=op.max_new_tokens, temperature=op.temperature,
                        seed=hash((cfg.seed, step, self.rank, j)) & 0x7FFFFFFF, synced=synced)
                for j, m in enumerate(micros)]
        return [o[0] for o in outs], block_ids, [o[1] for o in outs], True

    # ----- training loop
    def _loop(self, engine, data: ShardedBlocks, eval_blocks, start: int, ckpt_dir: Path, metrics_path: Path):
        from tqdm.auto import tqdm

        cfg = self.cfg
        rank, world = self.rank, self.world
        last_eval = None
        if start == 0 and eval_blocks is not None:
            last_eval = self.evaluate(engine, eval_blocks)
            self._log(metrics_path, {"step": 0, "eval_loss": last_eval})
        bar = tqdm(total=cfg.steps, initial=start, desc=progress_label(cfg, world),
                   disable=not (self.progress and rank == 0), dynamic_ncols=True)
        final_loss = None
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr_now = engine.get_lr()[0] if engine.get_lr() else None  # the lr this step applies
            micros, block_ids, labels, on_policy = self._micro_batches(engine, step, data)
            n_local = sum(((m if lab is None else lab)[:, 1:] != kd_setup.IGNORE_INDEX).sum().item()
                          for m, lab in zip(micros, labels))
            num_items = float(_all_reduce(torch.tensor([float(n_local)], dtype=torch.float64))[0])
            sums: dict[str, float] = {}
            for ids, blk, lab in zip(micros, block_ids, labels):
                parts = self._step(engine, ids, blk, num_items, lab)
                # the parts come from the same pass as the loss: summed over ranks and read to the
                # host together, the micro-batch's one sync (the NaN check reads the same numbers)
                keys = [k for k in ("loss", "kd", "lm", "inter") if k in parts]
                got = dict(zip(keys, all_reduce_to_host(
                    torch.stack([parts[k].detach().reshape(()) for k in keys]).to(torch.float64))))
                if not math.isfinite(got["loss"]):
                    raise NaNLossError(
                        f"loss is {got['loss']} at step {step + 1}; stopped before applying it. The last good "
                        f"checkpoint is {self._latest(ckpt_dir)}; lower lr or check the data and models")
                # DeepSpeed averages gradients over ranks: multiply by world so the update is the
                # gradient of sum(loss) / num_items over the whole step (scale_wrt_gas=False: our
                # num_items already spans the micro-batches).
                engine.backward(parts["loss"] * world, scale_wrt_gas=False)
                engine.step()
                for k, v in got.items():
                    sums[k] = sums.get(k, 0.0) + v
            if self.device.type == "cpu":  # the step's freed gathers and temporaries go back to the OS
                release_freed_memory()
            rec: dict[str, Any] = {"step": step + 1}
            if cfg.on_policy.lmbda > 0:
                rec["on_policy"] = int(on_policy)
            rec.update({k: sums[k] for k in sorted(sums)})
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
                labels[torch.tensor(wts) == 0] = kd_setup.IGNORE_INDEX  # padding repeats count for nothing
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
                plan = kd_setup.plan_record(self.tokenizer_dir)  # the trained model's prune plan, carried on
                if plan is not None:
                    record["plan"] = plan
                export_hf(model, final, tokenizer_from=self.tokenizer_dir, record=record, overwrite=True,
                          protect=[p for p in (self.cfg.teacher, self.cfg.student, self.cfg.teacher_logits)
                                   if p and p != "demo"])
        _barrier()


def progress_label(cfg: DistillConfig, world: int) -> str:
    """What the progress bar calls the run: its label (the pipeline's stage: teacher correction,
    distillation, the from-scratch baseline), else its mode, with the ZeRO stage and rank count."""
    return f"{cfg.label or cfg.mode} (ZeRO-{cfg.deepspeed.zero_stage}, {world} rank{'s' if world > 1 else ''})"


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
