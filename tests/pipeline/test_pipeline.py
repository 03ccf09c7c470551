"""The stage runner: hash-keyed caching, stale artifacts redone with a message, interrupted
stages resumed, and one end-to-end run of every stage on a tiny model (slow: it starts the
DeepSpeed trainer three times)."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from bench.common import make_tiny_teacher
from minitron_fast.distill.launch import trainer_command
from minitron_fast.errors import MinitronError
from minitron_fast.pipeline.report import REPORT_KEYS
from minitron_fast.pipeline.runner import trainer_tokens
from minitron_fast.pipeline.stages import StageCache, describe_changes, model_fingerprint


def test_stage_cache_reuses_redoes_and_resumes(tmp_path):
    logs: list[str] = []
    cache = StageCache(tmp_path, log=logs.append)
    calls = []

    def fn(d: Path, resume: bool):
        calls.append(resume)
        (d / "artifact.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    r1 = cache.run("s", {"a": 1, "b": {"c": 2}}, fn)
    assert r1.status == "ran" and r1.outputs == {"n": 1} and calls == [False]
    r2 = StageCache(tmp_path, log=logs.append).run("s", {"a": 1, "b": {"c": 2}}, fn)
    assert r2.status == "cached" and r2.outputs == {"n": 1} and r2.key == r1.key and len(calls) == 1
    assert any("cached" in m for m in logs)

    # different inputs: redone, with the changed key named, the old artifact kept aside
    logs.clear()
    r3 = StageCache(tmp_path, log=logs.append).run("s", {"a": 1, "b": {"c": 3}}, fn)
    assert r3.status == "ran" and r3.key != r1.key and r3.outputs == {"n": 2}
    assert any("stale artifact" in m and "b.c: 2 -> 3" in m for m in logs)
    assert (tmp_path / "s.stale" / "artifact.txt").read_text() == "1"
    assert (tmp_path / "s" / "artifact.txt").read_text() == "2"

    # killed midway (started, never finished): the same inputs resume, other inputs start over
    def boom(d: Path, resume: bool):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageCache(tmp_path, log=logs.append).run("t", {"x": 1}, boom)
    assert (tmp_path / "t" / "stage.started.json").is_file() and not (tmp_path / "t" / "stage.json").exists()
    r4 = StageCache(tmp_path, log=logs.append).run("t", {"x": 1}, fn)
    assert r4.status == "ran" and calls[-1] is True
    with pytest.raises(KeyboardInterrupt):
        StageCache(tmp_path, log=logs.append, force=("t",)).run("t", {"x": 1}, boom)
    StageCache(tmp_path, log=logs.append).run("t", {"x": 2}, fn)
    assert calls[-1] is False

    # --redo forces a cached stage
    logs.clear()
    r5 = StageCache(tmp_path, log=logs.append, force=("s",)).run("s", {"a": 1, "b": {"c": 3}}, fn)
    assert r5.status == "ran" and any("forced by --redo" in m for m in logs)


def test_describe_changes_and_fingerprint(tmp_path):
    assert describe_changes({"a": {"b": 1}}, {"a": {"b": 2}, "c": 3}) == "a.b: 1 -> 2; c: None -> 3"
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    f1 = model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert model_fingerprint(tmp_path) != f1


def test_launch_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the launcher checks that a hostfile exists
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    cfg = tmp_path / "c.yaml"
    one = trainer_command(cfg, num_procs=1, resume=True)
    assert one == [sys.executable, "-m", "minitron_fast.distill", "--config", str(cfg), "--resume"]
    assert trainer_command(cfg, num_procs=4, launcher="none") == one[:-1]
    ds = trainer_command(cfg, num_procs=2, overrides=["steps=3"])
    assert ds[:5] == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    assert ds[5] == "--master_port" and int(ds[6]) > 0  # a free port, never the default 29500 of another job
    assert ds[7:] == ["--module", "minitron_fast.distill", "--config", str(cfg), "steps=3"]
    mine = trainer_command(cfg, num_procs=2, launcher_args=["--master_port", "29611"])
    assert mine.count("--master_port") == 1 and mine[mine.index("--master_port") + 1] == "29611"
    hf = trainer_command(cfg, num_procs=1, hostfile="hosts")
    assert hf[3:5] == ["--hostfile", "hosts"] and "--num_gpus" not in hf
    tr = trainer_command(cfg, num_procs=2, launcher="torchrun")
    assert tr[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"] and tr[5] == "2"
    assert "--resume" not in tr
    with pytest.raises(MinitronError, match="not one of auto, deepspeed, torchrun, none"):
        trainer_command(cfg, launcher="mpirun")
    with pytest.raises(MinitronError, match="needs the deepspeed launcher"):
        trainer_command(cfg, num_procs=2, launcher="torchrun", hostfile="hosts")
    assert trainer_tokens({"steps": 3, "micro_batch_size": 2, "grad_accum": 2, "data": {"seq_len": 32}}, 2) == 768


# -- end to end on a tiny model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")


TRAIN = "micro_batch_size: 2, lr: 1.0e-3, warmup_steps: 0, eval_every: 100, save_every: 100, " \
        "data: {max_blocks: 16, eval_blocks: 2}, deepspeed: {zero_stage: 1}"


def tiny_recipe(tmp_path: Path, teacher: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(f"""
name: tiny
teacher: {teacher}
out: {tmp_path / 'run'}
data: {{source: demo, seq_len: 32}}
correct_teacher: {{enabled: true, steps: 2, {TRAIN}}}
importance: {{samples: 4, batch_size: 4}}
prune: {{target: "hidden=48,ffn=64,layers=3"}}
distill: {{steps: 3, {TRAIN}}}
scratch: {{enabled: true}}
evaluate: {{eval_blocks: 2, batch_size: 2}}
""")
    return p


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes_off_the_umask(root: Path) -> list[str]:
    """Files and folders under ``root`` that umask 022 would not give: each must be readable by
    group and others (folders also searchable) and writable by the owner alone. Executable bits
    are left to the writer (DeepSpeed copies its zero_to_fp32.py scripts as 0744)."""
    bad = []
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o777
        need = 0o755 if p.is_dir() else 0o644
        if mode & need != need or mode & 0o022:
            bad.append(f"{p.relative_to(root)} {oct(mode)}")
    return bad


@pytest.mark.slow
def test_pipeline_end_to_end_then_cached(tmp_path, tiny_teacher, capsys, umask_022):
    from minitron_fast.cli import main

    recipe = tiny_recipe(tmp_path, tiny_teacher)
    before = {f.name: f.stat().st_mtime_ns for f in tiny_teacher.iterdir()}
    assert main(["run", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    rep = json.loads((run / "report.json").read_text())
    assert list(rep) == list(REPORT_KEYS)
    for k in REPORT_KEYS:
        assert rep[k] is not None and math.isfinite(rep[k]), k
    assert rep["student_params"] < rep["teacher_params"]
    assert rep["tokens"] == 3 * 2 * 32
    md = (run / "report.md").read_text()
    assert "| distilled student" in md and "| same shape from scratch" in md
    for png in ("importance_heatmap.png", "loss_curves.png", "perplexity.png"):
        assert (run / png).stat().st_size > 1000, png
    assert "held-out perplexity" in out and "| pruned student (no retraining)" in out  # the table is printed
    # the student is a stock HF checkpoint of the target shape
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(run / "student")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (48, 64, 3)
    AutoModelForCausalLM.from_pretrained(run / "student")
    assert json.loads((run / "prune" / "plan.json").read_text())["target"]["hidden_size"] == 48
    # the input model directory was not written
    assert {f.name: f.stat().st_mtime_ns for f in tiny_teacher.iterdir()} == before
    # every file written follows the umask, trained checkpoints (save_pretrained writes
    # model.safetensors through mkstemp: 0600) and DeepSpeed's checkpoints included
    assert not _modes_off_the_umask(run), _modes_off_the_umask(run)[:10]

    # a rerun reuses every stage and reports the same numbers
    assert main(["run", str(recipe), "--no-progress"]) == 0
    out2 = capsys.readouterr().out
    for stage in ("teacher_eval", "correct_teacher", "importance", "prune", "distill", "scratch", "export"):
        assert f"[{stage}] cached" in out2, stage
    rep2 = json.loads((run / "report.json").read_text())
    assert {k: rep2[k] for k in REPORT_KEYS if k != "wall_s"} == {k: rep[k] for k in REPORT_KEYS if k != "wall_s"}


@pytest.mark.slow
def test_pipeline_launches_two_ranks_with_torchrun(tmp_path, tiny_teacher):
    """launch.num_procs: 2 runs the distill stage as two gloo ranks, here under torchrun (the
    DeepSpeed launcher's 2-rank runs are in test_distill.py), and the report counts the tokens of
    both ranks."""
    from minitron_fast.pipeline.recipe import load_recipe
    from minitron_fast.pipeline.runner import run_recipe

    p = tmp_path / "two.yaml"
    p.write_text(f"""
teacher: {tiny_teacher}
out: {tmp_path / 'run'}
data: {{source: demo, seq_len: 32}}
importance: {{samples: 4, batch_size: 4}}
prune: {{target: "ffn=64"}}
distill: {{steps: 2, {TRAIN}}}
evaluate: {{eval_blocks: 2, batch_size: 2}}
launch: {{num_procs: 2, launcher: torchrun}}
""")
    logs: list[str] = []
    rep = run_recipe(load_recipe(p), progress=False, log=logs.append)["report"]
    cmd = next(m for m in logs if m.strip().startswith("$ "))
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m minitron_fast.distill" in cmd
    assert json.loads((tmp_path / "run" / "distill" / "run" / "run.json").read_text())["world_size"] == 2
    assert rep["tokens"] == 2 * 2 * 2 * 32  # steps x micro-batch x ranks x seq_len
    assert math.isfinite(rep["distilled_ppl"])


def test_run_bad_input_is_one_line_error(tmp_path, capsys):
    from minitron_fast.cli import main

    assert main(["run", "demo", "importance.sample=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe key importance.sample") and err.count("\n") == 1
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pipeline_with_search_and_skipped_training(tmp_path, tiny_teacher):
    """Search decides the shape; disabled training stages are skipped with a message and their
    numbers are null in report.json. No trainer process starts, so this stays fast."""
    from minitron_fast.pipeline.recipe import load_recipe
    from minitron_fast.pipeline.runner import run_recipe

    p = tmp_path / "s.yaml"
    p.write_text(f"""
teacher: {tiny_teacher}
out: {tmp_path / 'run'}
data: {{source: demo, seq_len: 32}}
importance: {{samples: 4, batch_size: 4}}
search: {{enabled: true, params: 0.75x, tolerance: 0.1, kinds: [width], max_candidates: 1, retrain_steps: 1,
         micro_batch_size: 2, eval_blocks: 2}}
distill: {{enabled: false, loss: {{temperature: 2.0, lm_weight: 0.5}}}}
evaluate: {{eval_blocks: 2, batch_size: 2}}
""")
    logs: list[str] = []
    res = run_recipe(load_recipe(p), progress=False, log=logs.append)
    rep = res["report"]
    assert rep["distilled_ppl"] is None and rep["scratch_ppl"] is None and rep["corrected_teacher_ppl"] is None
    assert rep["tokens"] is None and rep["pruned_ppl"] > 0 and rep["student_params"] <= 0.75 * rep["teacher_params"]
    assert any(m.startswith("[distill] skipped") for m in logs) and any("search winner" in m for m in logs)
    search = json.loads((tmp_path / "run" / "search" / "search.json").read_text())
    # candidates are retrained with the distill section's objective
    assert {k: search["retrain_objective"][k] for k in ("temperature", "lm_weight", "divergence")} == \
        {"temperature": 2.0, "lm_weight": 0.5, "divergence": "forward_kl"}
    plan = json.loads((tmp_path / "run" / "prune" / "plan.json").read_text())
    assert plan["target"]["intermediate_size"] == search["winner"]["intermediate_size"]
    assert plan["target"]["hidden_size"] == search["winner"]["hidden_size"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| distill" in md and "skipped" in md
    # a changed budget redoes search and everything after it, and says why
    logs.clear()
    run_recipe(load_recipe(p, ["search.params=0.7x"]), progress=False, log=logs.append)
    assert any(m.startswith("[importance] cached") for m in logs)
    assert any(m.startswith("[search] stale artifact") and "0.75x" in m and "0.7x" in m for m in logs)
    assert any(m.startswith("[prune] stale artifact") for m in logs)
    # so does a changed distillation objective
    logs.clear()
    run_recipe(load_recipe(p, ["search.params=0.7x", "distill.loss.temperature=3.0"]), progress=False, log=logs.append)
    assert any(m.startswith("[search] stale artifact") and "temperature" in m for m in logs), logs
    # but how distill computes it (its row implementation, chunk size) does not
    logs.clear()
    run_recipe(load_recipe(p, ["search.params=0.7x", "distill.loss.temperature=3.0", "distill.loss.chunk_size=64"]),
               progress=False, log=logs.append)
    assert any(m.startswith("[search] cached") for m in logs), logs


def test_demo_max_tokens_knob():
    from minitron_fast.commands.demo import demo_overrides
    from minitron_fast.errors import MinitronError
    from minitron_fast.pipeline.recipe import load_recipe, training_config

    r = load_recipe("demo", demo_overrides(4096, 2, []))
    assert r.distill.steps == 4 and r.correct_teacher.steps == 1 and r.threads == 2
    assert r.distill.warmup_steps <= 3
    assert training_config(r, "scratch", teacher="t", student=None, out="o")["steps"] == 4  # same tokens
    # explicit overrides win over the knob
    assert load_recipe("demo", demo_overrides(4096, None, ["distill.steps=2"])).distill.steps == 2
    with pytest.raises(MinitronError, match="--max-tokens must be positive"):
        demo_overrides(0, None, [])


def test_pipeline_gives_the_gpu_back_before_a_training_stage(tmp_path, tiny_teacher, monkeypatch):
    """The pipeline process loads models (teacher_eval, importance, prune, evaluate) on the GPU its
    trainer's rank 0 then uses: before the trainer launches, torch's caching allocator must hand
    what it reserved back (empty_cache), not only drop references. CUDA is faked as initialized
    here, and the launch is recorded instead of run."""
    import subprocess as sp

    import torch

    from minitron_fast.models import loading
    from minitron_fast.pipeline import runner as runner_mod
    from minitron_fast.pipeline.recipe import load_recipe

    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: events.append("load") or real_load(*a, **k))

    def launch(cmd, **kw):
        events.append("launch")
        return sp.CompletedProcess(cmd, 1)

    monkeypatch.setattr(runner_mod.subprocess, "run", launch)
    with pytest.raises(runner_mod.StageFailed):
        runner_mod.run_recipe(load_recipe(tiny_recipe(tmp_path, tiny_teacher)), progress=False, log=lambda m: None)
    assert "launch" in events and "load" in events[:events.index("launch")], events
    before = events[:events.index("launch")]
    last_load = len(before) - 1 - before[::-1].index("load")
    assert "empty_cache" in before[last_load:], events


def test_free_device_memory_empties_the_cache_only_where_cuda_was_used(monkeypatch):
    import torch

    from minitron_fast.models.loading import free_device_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    free_device_memory()
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    free_device_memory()
    assert calls == [1]


def test_each_training_stage_is_labelled_by_what_it_runs():
    """The from-scratch baseline runs the trainer's correct-teacher mode on a random student, and its
    progress bar read "correct-teacher (ZeRO-1, 1 rank)". Each training section names itself."""
    from minitron_fast.distill.config import config_from_dict
    from minitron_fast.distill.trainer import progress_label
    from minitron_fast.pipeline.recipe import TRAINING_LABELS, load_recipe, training_config

    r = load_recipe("demo")
    labels = {}
    for section in TRAINING_LABELS:
        cfg = config_from_dict(training_config(r, section, teacher="t", student="s", out="o", validate=False))
        labels[section] = progress_label(cfg, 1)
    assert labels["scratch"].startswith("from-scratch baseline (ZeRO-")
    assert labels["correct_teacher"].startswith("teacher correction (ZeRO-")
    assert labels["distill"].startswith("distillation (ZeRO-")
    assert len(set(labels.values())) == 3
    # a label changes no trajectory: --resume still accepts a run recorded without one
    a = config_from_dict(training_config(r, "distill", teacher="t", student="s", out="o", validate=False))
    b = config_from_dict(dict(training_config(r, "distill", teacher="t", student="s", out="o", validate=False),
                              label=None))
    assert a.fingerprint() == b.fingerprint()
