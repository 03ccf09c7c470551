"""Distillation and teacher correction on DeepSpeed ZeRO (CPU, gloo).

Unit tests run in-process (config, sharding, losses, DeepSpeed config checks, CLI errors). The
training tests launch real jobs in subprocesses and share them between assertions, because
each process start (import deepspeed + transformers) costs ~10 s:

- ``single``: one process running, back to back, teacher correction, KD with the fused loss
  (ZeRO-0, grad_accum 2), KD with materialized logits (ZeRO-1, grad_accum 2), and bad inputs;
- ``dist``: one 2-rank ``deepspeed`` launch running ZeRO-2 then ZeRO-3 with a ZeRO-3-partitioned
  teacher (grad_accum 1, so the global batch equals the single-process one);
- ``kill``: a 2-rank ZeRO-2 job started with ``minitron-fast distill --nproc 2``, SIGKILLed
  mid-run, then ``--resume``d; compared with the uninterrupted ZeRO-2 run.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from minitron_fast.distill import kd_setup
from minitron_fast.distill.config import ConfigError, load_config, parse_overrides
from minitron_fast.distill.launch import free_port
from minitron_fast.distill.sharding import ShardedBlocks, eval_shard
from tests import ROOT

STEPS = 8
LM_WEIGHT = 0.5  # every training run mixes the student's CE into KD: both parts come from one fused pass

# -- unit tests -----------------------------------------------------------------------------------


def _recipe(tmp_path, **extra):
    d = {"teacher": "demo", "student": str(tmp_path / "s"), "out": str(tmp_path / "out"), "steps": 5}
    d.update(extra)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_config_yaml_and_overrides(tmp_path):
    p = _recipe(tmp_path, loss={"temperature": 2.0})
    cfg = load_config(p, ["steps=7", "loss.lm_weight=0.5", "ds.zero_stage=3", "deepspeed.bf16=true",
                          "intermediate.pairs=[[0, 1]]", "intermediate.weight=0.1"])
    assert cfg.steps == 7 and cfg.loss.temperature == 2.0 and cfg.loss.lm_weight == 0.5
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.bf16 is True
    assert cfg.intermediate.pairs == [[0, 1]]
    assert parse_overrides(["a.b=1", "c=x"]) == {"a": {"b": 1}, "c": "x"}
    # the fingerprint ignores steps/out/logging but not the trajectory
    base = load_config(p).fingerprint()
    assert load_config(p, ["steps=99", "out=/elsewhere", "save_every=3"]).fingerprint() == base
    assert load_config(p, ["lr=1e-3"]).fingerprint() != base


@pytest.mark.parametrize("override, message", [
    pytest.param("stepz=3", r"unknown recipe key stepz", id="unknown-key"),
    pytest.param("loss.tmperature=2", r"unknown recipe key loss\.tmperature", id="unknown-nested"),
    pytest.param("lr=fast", r"lr must be a number", id="wrong-type"),
    pytest.param("ds.zero_stage=4", r"zero_stage must be 0, 1, 2 or 3", id="bad-stage"),
    pytest.param("ds.offload_param=true", r"offload_param needs zero_stage 3", id="offload-param-stage"),
    pytest.param("loss.divergence=kl", r"divergence='kl' is not one of", id="bad-divergence"),
    pytest.param("micro_batch_size=0", r"micro_batch_size must be at least 1", id="zero-batch"),
    pytest.param("intermediate.weight=1", r"needs intermediate.pairs", id="intermediate-no-pairs"),
    pytest.param("steps", r"not key=value", id="not-key-value"),
])
def test_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_recipe(tmp_path), [override])


def test_shipped_distill_recipes_validate():
    paths = sorted((ROOT / "configs" / "distill").glob("*.yaml"))
    assert len(paths) >= 2
    for p in paths:
        load_config(p)


def test_sharding_is_split_invariant_and_deterministic():
    blocks = torch.arange(37 * 4).view(37, 4)
    one = ShardedBlocks(blocks, world=1, rank=0, micro_batch=2, grad_accum=4, seed=3)
    two = [ShardedBlocks(blocks, world=2, rank=r, micro_batch=2, grad_accum=2, seed=3) for r in range(2)]
    for step in (0, 1, 9, 10):  # 10 * 8 > 37: crosses epochs
        a = torch.cat(one.micro_batches(step))
        b = torch.cat([m for s in two for m in s.micro_batches(step)])
        assert sorted(a[:, 0].tolist()) == sorted(b[:, 0].tolist())
    # an epoch visits every block once
    seen = torch.cat([torch.cat(one.micro_batches(s)) for s in range(4)])[:37 - 37 % 8]
    assert len(set(seen[:, 0].tolist())) == seen.shape[0]
    again = ShardedBlocks(blocks, world=1, rank=0, micro_batch=2, grad_accum=4, seed=3)
    assert torch.equal(torch.cat(again.micro_batches(5)), torch.cat(one.micro_batches(5)))
    # evaluation shards: same batch count on every rank, every block weighted once
    shards = [eval_shard(5, 2, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    weight = {}
    for sh in shards:
        for idx, w in sh:
            for i, x in zip(idx, w):
                weight[i] = weight.get(i, 0) + x
    assert weight == {i: 1.0 for i in range(5)}


def test_rank_slices_are_disjoint_cover_each_epoch_and_resume_in_a_new_process():
    """For both orders (randperm, Feistel): the ranks' micro-batches of a step are disjoint slices
    of the global order; concatenated over steps they read every block once per epoch (no
    drop-last: a step that crosses an epoch's end reads on into the next); a new process (another
    PYTHONHASHSEED) that resumes at step 5 reads exactly the blocks the uninterrupted run reads."""
    n, world, mb, ga, seed, steps = 37, 3, 2, 2, 11, 10
    G = world * mb * ga  # 10 steps: 120 positions, three epochs and a bit
    blocks = torch.arange(n)[:, None].expand(n, 3)
    resumed = {}
    for kind, dense_max in (("randperm", 1 << 20), ("feistel", 0)):
        ranks = [ShardedBlocks(blocks, world=world, rank=r, micro_batch=mb, grad_accum=ga, seed=seed,
                               dense_max=dense_max) for r in range(world)]
        assert ranks[0].order.kind == kind
        stream = []
        for step in range(steps):
            per_slot = {}  # position within the step -> block, from each rank's own micro-batches
            for r, data in enumerate(ranks):
                for m, (idx, rows) in enumerate(zip(data.micro_batch_indices(step), data.micro_batches(step))):
                    assert torch.equal(rows[:, 0], idx)  # the rows read are the indexed blocks
                    per_slot.update({(m * world + r) * mb + j: int(b) for j, b in enumerate(idx)})
            assert sorted(per_slot) == list(range(G))  # disjoint and covering: every slot once
            stream += [per_slot[j] for j in range(G)]
            assert stream[-G:] == ranks[0].order(range(step * G, (step + 1) * G)).tolist()
        for e in range(steps * G // n):
            assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
        assert stream[:n] != stream[n:2 * n]  # a new order each epoch
        one = ShardedBlocks(blocks, world=1, rank=0, micro_batch=mb, grad_accum=world * ga, seed=seed,
                            dense_max=dense_max)
        assert torch.cat(one.micro_batch_indices(4)).tolist() == stream[4 * G:5 * G]  # split-invariant
        resumed[kind] = [torch.cat(ranks[1].micro_batch_indices(s)).tolist() for s in range(5, steps)]
    code = textwrap.dedent(f"""
        import json, torch
        from minitron_fast.distill.sharding import ShardedBlocks
        out = {{}}
        for kind, dense_max in (("randperm", 1 << 20), ("feistel", 0)):
            d = ShardedBlocks(torch.zeros({n}, 3), world={world}, rank=1, micro_batch={mb}, grad_accum={ga}, seed={seed},
                              dense_max=dense_max)
            out[kind] = [torch.cat(d.micro_batch_indices(s)).tolist() for s in range(5, {steps})]
        print(json.dumps(out))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=dict(_env(), PYTHONHASHSEED="12345"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == resumed


def test_resume_over_changed_data_is_named():
    data = ShardedBlocks(torch.zeros(37, 4, dtype=torch.long), world=1, rank=0, micro_batch=2, grad_accum=1, seed=0)
    assert data.position(3) == {"step": 3, "samples": 6, "epoch": 0, "n_blocks": 37, "order": "randperm"}
    assert data.changed_since(data.position(3), 3) == []
    assert data.changed_since({"step": 3, "samples": 6, "epoch": 0, "n_blocks": 37}, 3) == []  # before "order"
    assert data.changed_since(None, 3) == []
    assert data.changed_since({"n_blocks": 40, "order": "feistel"}, 3) == ["n_blocks 40 -> 37", "order feistel -> randperm"]


def test_projection_starts_from_the_plans_kept_channels(tmp_path):
    """Student channel j is teacher channel plan.hidden[j]: the projection maps a width-pruned
    student's embeddings exactly onto the teacher's kept channels (the old identity start mapped
    j -> j, wrong whenever the kept channels are not a prefix)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron_fast.models.export import export_hf
    from minitron_fast.prune import apply_plan, make_plan

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    plan = make_plan(teacher.config, {"channels": torch.rand(64, generator=torch.Generator().manual_seed(1))},
                     "hidden=48")
    assert plan.hidden != list(range(48))
    student = apply_plan(copy.deepcopy(teacher), plan)
    export_hf(student, tmp_path / "s", plan=plan)
    kept = kd_setup.plan_hidden_channels(tmp_path / "s")
    assert kept == (plan.hidden, 64)
    proj = kd_setup.projection(48, 64, kept)
    ids = torch.arange(97)
    with torch.no_grad():
        want = torch.zeros(97, 64)
        want[:, plan.hidden] = teacher.model.embed_tokens(ids)[:, plan.hidden]
        torch.testing.assert_close(proj(student.model.embed_tokens(ids)), want, rtol=0, atol=0)
    # the identity only for equal widths without a plan; nn.Linear's default start otherwise
    assert kd_setup.plan_hidden_channels(tmp_path / "absent") is None
    assert torch.equal(kd_setup.projection(64, 64, None).weight, torch.eye(64))
    w = kd_setup.projection(48, 64, None).weight
    assert (w != 0).float().mean() > 0.9
    with pytest.raises(ConfigError, match=r"keeps 48 of 64 hidden channels, but the student is 48 and the teacher "
                                          r"80 wide"):
        kd_setup.projection(48, 80, kept)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "minitron.json").write_text('{"plan": {"kept": {}}}')
    with pytest.raises(ConfigError, match="malformed prune plan"):
        kd_setup.plan_hidden_channels(tmp_path / "bad")


def test_layer_pairs_and_tokenizers():
    assert kd_setup.layer_pairs([[0, 1], [-1, -1]], 2, 4) == [(0, 1), (1, 3)]
    with pytest.raises(ConfigError, match=r"pair \[2, 0\] is outside the student's 2 / teacher's 4 layers"):
        kd_setup.layer_pairs([[2, 0]], 2, 4)

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    base = {f"t{i}": i for i in range(10)}
    kd_setup.check_tokenizers(Tok(base), Tok(base), "T", "S")
    swapped = dict(base, t3=4, t4=3)  # same size, other ids: a size check cannot see it
    with pytest.raises(kd_setup.KDSetupError, match=r"^teacher T and student S use different tokenizers \(10 vs 10 "
                                                    r"tokens, 4 token/id entries differ") as e:
        kd_setup.check_tokenizers(Tok(base), Tok(swapped), "T", "S")
    assert "\n" not in str(e.value)


def test_deepspeed_config_checks(tmp_path):
    from minitron_fast.distill.engine import deepspeed_config, lr_lambda

    cfg = load_config(_recipe(tmp_path), ["micro_batch_size=2", "grad_accum=3", "ds.zero_stage=3",
                                          "ds.persistence_threshold=0"])
    ds, client = deepspeed_config(cfg, world=4)
    assert ds["train_batch_size"] == 24 and client and "optimizer" not in ds
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "stage3_max_live_parameters" not in ds["zero_optimization"]  # DeepSpeed's default unless set
    from minitron_fast.distill.engine import SUB_GROUP_SIZE

    assert deepspeed_config(cfg, world=4, hidden=64)[0]["zero_optimization"]["sub_group_size"] == SUB_GROUP_SIZE
    lean = load_config(_recipe(tmp_path), ["ds.zero_stage=3", "ds.teacher_zero3=true", "ds.max_live_parameters=0"])
    from minitron_fast.distill.engine import _teacher_ds_config

    for z in (deepspeed_config(lean, world=2)[0]["zero_optimization"], _teacher_ds_config(lean, 2)["zero_optimization"]):
        assert z["stage3_max_live_parameters"] == 0 and z["stage3_max_reuse_distance"] == 0
    with pytest.raises(ConfigError, match="max_live_parameters"):
        load_config(_recipe(tmp_path), ["ds.max_live_parameters=-1"])
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 3}}))
    cfg2 = load_config(_recipe(tmp_path), ["micro_batch_size=2", "grad_accum=3", "ds.zero_stage=3",
                                           f"ds.config_file={user}"])
    with pytest.raises(ConfigError, match=r"train_batch_size=16 but the recipe gives 24"):
        deepspeed_config(cfg2, world=4)
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"uses ZeRO stage 2 but the recipe says"):
        deepspeed_config(cfg2, world=4)
    # warm-up then cosine decay to min_lr
    f = lr_lambda(load_config(_recipe(tmp_path), ["steps=20", "warmup_steps=4", "lr=1e-3", "min_lr=1e-4"]))
    vals = [f(s) for s in range(21)]
    assert vals[0] < vals[3] < vals[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:])) and vals[20] == pytest.approx(0.1)


def test_device_cpu_on_a_machine_with_cuda_is_the_cpu(tmp_path, monkeypatch):
    """``device: cpu`` where CUDA exists: the launched ranks get DeepSpeed's CPU accelerator, the
    trainer the CPU, offloaded memory is not pinned; ``auto`` takes the GPU. (CUDA faked here.)"""
    from minitron_fast.distill.launch import launcher_env
    from minitron_fast.distill.engine import deepspeed_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher_env("cpu")["DS_ACCELERATOR"] == "cpu" and "DS_ACCELERATOR" not in launcher_env("auto")
    cpu = load_config(_recipe(tmp_path), ["device=cpu", "ds.offload_optimizer=true", "ds.offload_param=true",
                                          "ds.zero_stage=3"])
    assert cpu.train_device() == "cpu"
    assert not any(v["pin_memory"] for k, v in deepspeed_config(cpu, world=1)[0]["zero_optimization"].items()
                   if k.startswith("offload"))
    auto = load_config(_recipe(tmp_path), ["ds.offload_optimizer=true"])
    assert auto.train_device() == "cuda:1" and deepspeed_config(auto, world=1)[0]["zero_optimization"][
        "offload_optimizer"]["pin_memory"]


def test_client_optimizer_is_torchs_fused_adamw(tmp_path):
    """The fused kernel updates in place; the per-tensor loop it replaces allocates a temporary of
    each tensor's size (under ZeRO: the rank's whole flat partition). Same update either way."""
    from minitron_fast.distill.engine import adamw

    cfg = load_config(_recipe(tmp_path), ["lr=1e-2", "weight_decay=0.1"])
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(37, 5, dtype=torch.float64).float()) for _ in range(2)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt, slow = adamw(ps, cfg), torch.optim.AdamW(ref, lr=1e-2, betas=tuple(cfg.adam_betas), weight_decay=0.1)
    assert opt.defaults["fused"] is True and not slow.defaults["fused"]
    for _ in range(3):
        for a, b in zip(ps, ref):
            a.grad = b.grad = torch.randn_like(a)
        opt.step()
        slow.step()
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from minitron_fast.cli import main

    assert main(["distill", "--config", str(_recipe(tmp_path)), "stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown recipe key stepz")
    assert main(["distill", "--config", str(_recipe(tmp_path)), "--print-config", "steps=9"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["steps"] == 9


# -- training runs (subprocesses) ---------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, os, sys
    from minitron_fast.distill import load_config, train
    from minitron_fast.errors import MinitronError
    runs = json.load(open(sys.argv[-1]))
    for run in runs:
        if "poison" in run:  # a corrupted teacher: NaN in one lm_head row
            from safetensors.torch import load_file, save_file
            if os.environ.get("RANK", "0") == "0":
                sd = load_file(run["poison"])
                sd["lm_head.weight"][0] = float("nan")
                save_file(sd, run["poison"], metadata={"format": "pt"})
            continue
        try:
            res = train(load_config(None, run["overrides"]), resume=run.get("resume", False), progress=False)
            line = {"name": run["name"], "ok": True, "result": res}
        except MinitronError as exc:
            line = {"name": run["name"], "ok": False, "error": str(exc)}
        if os.environ.get("RANK", "0") == "0":
            print("RESULT " + json.dumps(line), flush=True)
    from minitron_fast.distill.engine import exit_process
    exit_process(0)
""")


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    return env


def _results(stdout: str) -> dict[str, dict]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT "):])
            out[rec["name"]] = rec
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in _metrics(out) if "loss" in r]


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_model_dir):
    """A tiny teacher (untied, peaked random logits) and a narrower tied student sharing the real
    SmolLM2 tokenizer (49,152 tokens), plus a student whose lm_head has 8 padding rows and one
    whose tokenizer swaps two token ids (same size: only a token/id comparison sees it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron_fast.models.export import copy_tokenizer_files

    root = tmp_path_factory.mktemp("distill_models")
    specs = {"teacher": (64, 128, False, 0.2, 49152), "student": (48, 96, True, 0.02, 49152),
             "student_padded_vocab": (48, 96, True, 0.02, 49160)}
    for i, (name, (h, f, tied, std, vocab)) in enumerate(specs.items()):
        torch.manual_seed(i + 1)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=f, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=tied, initializer_range=std))
        m.save_pretrained(root / name)
        copy_tokenizer_files(demo_model_dir, root / name)
    # the student carries a prune plan (48 of the teacher's 64 channels): the intermediate-state
    # projection starts from it, and distill's export carries it on
    kept = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(0))[:48].tolist())
    (root / "student" / "minitron.json").write_text(json.dumps({"plan": {"version": 1, "source": {"hidden_size": 64},
                                                                          "kept": {"hidden": kept}}}))
    shutil.copytree(root / "student", root / "student_other_tokenizer")
    tj = root / "student_other_tokenizer" / "tokenizer.json"
    tok = json.loads(tj.read_text())
    vocab = tok["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    tj.write_text(json.dumps(tok))
    return root


def _common(models: Path, out: Path, **kw) -> list[str]:
    d = {"teacher": models / "teacher", "student": models / "student", "out": out, "steps": STEPS,
         "micro_batch_size": 2, "grad_accum": 1, "data.seq_len": 32, "data.max_blocks": 64, "data.eval_blocks": 4,
         "eval_every": 4, "save_every": 2, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "export": False,
         "threads": 1, "loss.lm_weight": LM_WEIGHT}
    d.update(kw)
    return [f"{k}={v}" for k, v in d.items()]


def _write_runs(path: Path, runs: list[dict]) -> Path:
    path.write_text(json.dumps([{**r, "overrides": [str(o) for o in r.get("overrides", [])]} for r in runs]))
    return path


@pytest.fixture(scope="module")
def dist_runs(models, tmp_path_factory):
    """One 2-rank deepspeed launch: ZeRO-2 (with export) then ZeRO-3 (every parameter partitioned)."""
    root = tmp_path_factory.mktemp("distill_dist")
    (root / "worker.py").write_text(WORKER)
    runs = [{"name": "z2", "overrides": _common(models, root / "z2")},
            {"name": "z3", "overrides": _common(models, root / "z3", export=True,
                                                **{"ds.zero_stage": 3, "ds.persistence_threshold": 0,
                                                   "ds.teacher_zero3": True})},
            # on-policy (GKD) under ZeRO-3: on about half the steps the student writes the last 8
            # tokens of each block (every rank generating in step) and the loss covers those only
            {"name": "onp", "overrides": _common(models, root / "onp", **{
                "ds.zero_stage": 3, "ds.persistence_threshold": 0, "on_policy.lmbda": 0.5,
                "on_policy.max_new_tokens": 8})}]
    port = free_port()
    (root / "master_port").write_text(str(port))
    ds = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
          str(root / "worker.py"), str(_write_runs(root / "runs.json", runs))]
    proc = subprocess.run(ds, env=_env(), capture_output=True, text=True, timeout=600, cwd=root)
    res = _results(proc.stdout)
    assert proc.returncode == 0 and len(res) == len(runs), proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, res


@pytest.fixture(scope="module")
def single_runs(models, tmp_path_factory):
    """One single-process job running several configurations back to back."""
    root = tmp_path_factory.mktemp("distill_single")
    (root / "worker.py").write_text(WORKER)
    single = {"grad_accum": 2, "ds.zero_stage": 0}  # 1 rank x 2 micro-batches = the 2-rank global batch
    (root / "used").mkdir()
    (root / "used" / "file.txt").write_text("x")
    runs = [
        {"name": "correct", "overrides": _common(models, root / "correct", mode="correct-teacher", student="null",
                                                 export=True, **{"data.eval_blocks": 8})},
        {"name": "fused", "overrides": _common(models, root / "fused", **single)},
        {"name": "materialized", "overrides": _common(models, root / "materialized",
                                                      **{**single, "loss.materialized": True, "ds.zero_stage": 1})},
        {"name": "inter", "overrides": _common(models, root / "inter", steps=4, save_every=4,
                                               **{"intermediate.pairs": "[[0,0],[1,1]]", "intermediate.weight": 1.0,
                                                  "ds.zero_stage": 2})},
        {"name": "other_run", "resume": True, "overrides": _common(models, root / "fused", lr=1e-3, **single)},
        {"name": "used_dir", "overrides": _common(models, root / "used")},
        {"name": "padded_vocab", "overrides": _common(models, root / "padded_vocab", steps=2, eval_every=2,
                                                      student=models / "student_padded_vocab")},
        {"name": "other_tokenizer", "overrides": _common(models, root / "other_tokenizer",
                                                         student=models / "student_other_tokenizer")},
        {"name": "nan_before", "overrides": _common(models, root / "nan", teacher=root / "teacher_copy", steps=2)},
        {"name": "poison", "poison": str(root / "teacher_copy" / "model.safetensors")},
        {"name": "nan", "resume": True, "overrides": _common(models, root / "nan", teacher=root / "teacher_copy", steps=4)},
    ]
    shutil.copytree(models / "teacher", root / "teacher_copy")
    proc = subprocess.run([sys.executable, str(root / "worker.py"), str(_write_runs(root / "runs.json", runs))],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=root)
    res = _results(proc.stdout)
    assert proc.returncode == 0 and len(res) == len(runs) - 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, res


ON_A_CUDA_MACHINE = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.cuda.is_available = lambda: True  # as on a machine with a GPU (there is none here)
    from minitron_fast.distill import load_config, trainer
    seen = []
    step = trainer.Trainer._step
    def spy(self, engine, ids, *args, **kw):
        seen.append(sorted({str(ids.device)} | {str(p.device) for p in engine.module.parameters()}
                           | {str(p.device) for p in self.teacher.model.parameters()}))
        return step(self, engine, ids, *args, **kw)
    trainer.Trainer._step = spy
    capped, cap = [], trainer.cap_heap_retention
    trainer.cap_heap_retention = lambda *a: capped.append(cap(*a)) or capped[-1]
    res = trainer.train(load_config(None, json.load(open(sys.argv[-1]))), progress=False)
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    print("RESULT " + json.dumps({"backend": dist.get_backend(), "accelerator": get_accelerator().device_name(),
                                  "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"), "seen": seen,
                                  "steps": res["steps"], "capped": capped}), flush=True)
""")


@pytest.mark.slow
def test_device_cpu_trains_on_the_cpu_where_cuda_exists(models, tmp_path):
    """``device: cpu`` on a machine with CUDA (faked: torch.cuda.is_available() is True in the
    worker, which starts without DS_ACCELERATOR): the trainer runs gloo on DeepSpeed's CPU
    accelerator, and the batches, the student and the teacher all live on the CPU."""
    (tmp_path / "worker.py").write_text(ON_A_CUDA_MACHINE)
    args = tmp_path / "overrides.json"
    args.write_text(json.dumps([str(o) for o in _common(models, tmp_path / "out", steps=2, save_every=2,
                                                         eval_every=2, device="cpu")]))
    env = _env()
    env.pop("DS_ACCELERATOR")
    proc = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    assert (res["backend"], res["accelerator"], res["DS_ACCELERATOR"], res["steps"]) == ("gloo", "cpu", "cpu", 2)
    assert res["seen"] == [["cpu"], ["cpu"]]  # one micro-batch per step, everything on the CPU
    assert res["capped"] == [True]  # a CPU run returns freed blocks of 4 MB and more to the OS


def _falls(ls: list[float]) -> bool:
    return ls[-1] < ls[0] - 0.005 and min(ls[-3:]) < min(ls[:3])


@pytest.mark.slow
def test_zero2_and_zero3_losses_fall(models, dist_runs):
    root, res = dist_runs
    for name in ("z2", "z3"):
        assert res[name]["ok"], res[name]
        ls = _train_losses(root / name)
        assert len(ls) == STEPS and all(math.isfinite(x) for x in ls)
        assert _falls(ls), (name, ls)
        recs = _metrics(root / name)
        assert {"step", "kd", "lm", "loss", "lr", "tokens_per_s", "peak_mem_mb", "rss_mb"} <= set(recs[-1])
        for r in recs[1:]:  # the logged parts are the parts of the loss that was trained
            assert r["loss"] == pytest.approx(r["kd"] + LM_WEIGHT * r["lm"], rel=1e-5)
        assert 0 < recs[-1]["rss_mb"] <= recs[-1]["peak_mem_mb"] * 1.01
        assert recs[1]["lr"] == pytest.approx(3e-3)  # the lr the step applied (constant schedule)
        assert recs[-1]["tokens"] == 4 * 31  # 2 ranks x 2 blocks x 31 next-token targets
        evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
        assert len(evals) == 3  # steps 0, 4, 8
        assert (root / name / "loss.png").stat().st_size > 1000
    # the ZeRO-3 student was gathered and exported: stock transformers reproduces its held-out loss
    from transformers import AutoModelForCausalLM

    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.models.loading import load_tokenizer

    final = root / "z3" / "final"
    plan = json.loads((models / "student" / "minitron.json").read_text())["plan"]
    assert json.loads((final / "minitron.json").read_text())["plan"] == plan
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.config.hidden_size == 48 and model.config.tie_word_embeddings
    blocks = token_blocks(load_tokenizer(final), "demo", "heldout", 32, max_blocks=4)
    assert lm_loss(model, blocks, progress=False) == pytest.approx(_metrics(root / "z3")[-1]["eval_loss"], rel=1e-4)


@pytest.mark.slow
def test_on_policy_steps_train_on_the_students_own_tokens(dist_runs):
    """2 ranks, ZeRO-3: the on-policy steps are the seeded draws, count only the written tokens
    (2 ranks x 2 blocks x 8), and train; the others are ordinary steps over every token."""
    from minitron_fast.distill.on_policy import on_policy_step

    root, res = dist_runs
    assert res["onp"]["ok"], res["onp"]
    recs = [r for r in _metrics(root / "onp") if "loss" in r]
    assert len(recs) == STEPS and all(math.isfinite(r["loss"]) for r in recs)
    want = [int(on_policy_step(0.5, 0, s)) for s in range(STEPS)]
    assert [r["on_policy"] for r in recs] == want and 0 < sum(want) < STEPS
    for r in recs:
        assert r["tokens"] == (2 * 2 * 8 if r["on_policy"] else 4 * 31), r


@pytest.mark.slow
def test_cpu_ranks_leave_nothing_in_dev_shm(dist_runs):
    """DeepSpeed's CPU communicator never unlinks its per-rank 67 MB /dev/shm workspace; the
    trainer does, so a finished 2-rank job leaves no segment of its port behind."""
    from minitron_fast.distill.cpu_memory import SHM_WORKSPACE

    root, res = dist_runs
    assert res["z3"]["ok"], res["z3"]
    port = (root / "master_port").read_text()
    pattern = Path(SHM_WORKSPACE.format(uid=os.getuid(), addr="*", port=port, rank="*"))
    assert Path("/dev/shm").is_dir()
    assert sorted(Path(pattern.parent).glob(pattern.name)) == []


@pytest.mark.slow
def test_zero3_matches_zero2_and_single_process(dist_runs, single_runs):
    (droot, _), (sroot, sres) = dist_runs, single_runs
    assert sres["fused"]["ok"], sres["fused"]
    z2, z3, one = (_train_losses(p) for p in (droot / "z2", droot / "z3", sroot / "fused"))
    for other in (z3, one):
        torch.testing.assert_close(torch.tensor(other[:4]), torch.tensor(z2[:4]), rtol=1e-5, atol=1e-6)
    # the whole trajectory stays together too
    torch.testing.assert_close(torch.tensor(z3), torch.tensor(z2), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fused_and_materialized_same_trajectory(single_runs):
    root, res = single_runs
    assert res["materialized"]["ok"], res["materialized"]
    fused, mat = _train_losses(root / "fused"), _train_losses(root / "materialized")
    assert len(fused) == len(mat) == STEPS
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(mat), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_teacher_correction_lowers_teacher_loss(single_runs):
    root, res = single_runs
    assert res["correct"]["ok"], res["correct"]
    recs = _metrics(root / "correct")
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.05, evals
    assert _falls([r["lm"] for r in recs if "lm" in r])
    # the corrected teacher is a stock HF checkpoint: reloads and reproduces the held-out loss
    from transformers import AutoModelForCausalLM

    final = root / "correct" / "final"
    assert (final / "tokenizer.json").is_file() and (final / "minitron.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.models.loading import load_tokenizer

    blocks = token_blocks(load_tokenizer(final), "demo", "heldout", 32, max_blocks=8)
    assert lm_loss(model, blocks, progress=False) == pytest.approx(evals[-1], rel=1e-4)


@pytest.mark.slow
def test_intermediate_state_loss(single_runs):
    root, res = single_runs
    assert res["inter"]["ok"], res["inter"]
    recs = [r for r in _metrics(root / "inter") if "loss" in r]
    for r in recs:  # total = kd + 0.5 * lm + 1.0 * inter
        assert r["loss"] == pytest.approx(r["kd"] + LM_WEIGHT * r["lm"] + r["inter"], rel=1e-5)
    inter = [r["inter"] for r in recs]
    assert inter[-1] < inter[0], inter


@pytest.mark.slow
def test_bad_inputs_fail_clearly_and_lose_nothing(single_runs):
    root, res = single_runs
    assert not res["other_run"]["ok"] and "belongs to a different run" in res["other_run"]["error"]
    assert not res["used_dir"]["ok"] and "is not empty" in res["used_dir"]["error"]
    assert (root / "used" / "file.txt").read_text() == "x"
    other = res["other_tokenizer"]
    assert not other["ok"] and "use different tokenizers (49152 vs 49152 tokens, 4 token/id entries" in other["error"]
    # a student head with padding rows beyond the tokenizer trains on the shared 49,152 rows
    assert res["padded_vocab"]["ok"], res["padded_vocab"]
    assert all(math.isfinite(x) for x in _train_losses(root / "padded_vocab"))
    # NaN loss (a teacher corrupted between a run and its resume): stop at once, keep the last good
    # checkpoint and say which step
    nan = res["nan"]
    assert res["nan_before"]["ok"] and not nan["ok"], nan
    assert "loss is nan at step 3" in nan["error"] and "step2" in nan["error"], nan
    assert (root / "nan" / "checkpoints" / "latest").read_text().strip() == "step2"
    assert [r["step"] for r in _metrics(root / "nan") if "loss" in r] == [1, 2]
    # the refused resume left the earlier run intact
    assert len(_train_losses(root / "fused")) == STEPS


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(models, dist_runs, tmp_path):
    droot, _ = dist_runs
    out = tmp_path / "killed"
    recipe = tmp_path / "recipe.yaml"
    common = _common(models, out)
    recipe.write_text(yaml.safe_dump(parse_overrides([o for o in common if not o.startswith("save_every=")])))
    cli = [sys.executable, "-m", "minitron_fast", "distill", "--config", str(recipe), "--nproc", "2",
           f"--launcher-args=--master_port {free_port()}"]
    proc = subprocess.Popen(cli + ["save_every=2"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        mp = out / "metrics.jsonl"
        steps = [r["step"] for r in _metrics(out)] if mp.is_file() else []
        if steps and max(steps) >= 3:  # past the step-2 checkpoint, mid-way to step 4's
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < STEPS, proc.stdout.read()[-3000:]
    resumed = subprocess.run(cli + ["--resume", "save_every=2"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # no step lost or repeated in the record
    torch.testing.assert_close(torch.tensor(_train_losses(out)), torch.tensor(_train_losses(droot / "z2")),
                               rtol=1e-6, atol=1e-7)
    client = torch.load(out / "checkpoints" / f"step{STEPS}" / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["data"]["samples"] == STEPS * 4 and client["step"] == STEPS
