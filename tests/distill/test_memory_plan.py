"""The memory plan (``minitron-fast memory``): its accounting against DeepSpeed's estimators, the
shipped GPU recipes' verdicts, bad input, and the estimate against a measured CPU run (25%)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minitron_fast.distill.config import DistillConfig, config_from_dict
from minitron_fast.distill.memory import (GB, MemoryPlanError, ModelStats, model_config, parse_size, plan, plan_config,
                                          plan_recipe)
from tests import ROOT


def test_parse_size():
    assert parse_size("80GB") == 80e9 and parse_size("24GiB") == 24 * 2**30 and parse_size("141 GB") == 141e9
    assert parse_size(40) == 40e9
    with pytest.raises(MemoryPlanError, match="is not a size"):
        parse_size("lots")
    with pytest.raises(MemoryPlanError, match="must be positive"):
        parse_size("0GB")


def test_student_states_follow_deepspeeds_estimators():
    """bf16 ZeRO-2: student params + gradients + optimizer == DeepSpeed's own estimate
    (2P + 18P/W); ZeRO-3 is the same accounting, partitioned, plus gathered layers."""
    t = ModelStats.of(model_config("meta-llama/Llama-3.1-8B"))
    s = ModelStats.of(model_config("nvidia/Llama-3.1-Minitron-4B-Width-Base"))
    assert 8.0e9 < t.params < 8.1e9 and 4.4e9 < s.params < 4.6e9     # the published 8.03B / 4.51B
    cfg = config_from_dict({"teacher": "t", "student": "s", "data": {"seq_len": 4096},
                            "deepspeed": {"zero_stage": 2, "bf16": True}})
    p = plan(cfg, t, s, 8)
    states = p.parts["student"] + p.parts["gradients"] + p.parts["optimizer"]
    assert states == pytest.approx(p.ds_estimate, rel=1e-6)
    cfg3 = config_from_dict({"teacher": "t", "student": "s", "deepspeed": {"zero_stage": 3, "bf16": True,
                                                                         "teacher_zero3": True}})
    p3 = plan(cfg3, t, s, 8)
    assert p3.parts["teacher"] < p.parts["teacher"] / 3                # the teacher no rank holds whole
    # DeepSpeed's estimator counts one gathered layer; its default residency keeps up to 1e9
    # gathered elements from forward to backward, which the plan adds (max_live_parameters: 0 re-gathers)
    lean = plan(config_from_dict({**cfg3.to_dict(), "deepspeed": {**cfg3.to_dict()["deepspeed"],
                                                                  "max_live_parameters": 0}}), t, s, 8)
    states3 = lean.parts["student"] + lean.parts["gradients"] + lean.parts["optimizer"]
    assert p3.ds_estimate <= states3 <= 1.15 * p3.ds_estimate           # DS counts 18P/W, we 20P/W + 4L
    assert p3.parts["student"] - lean.parts["student"] == pytest.approx((10**9 - 2 * s.largest_layer) * 2)
    # checkpointing: same everything else, activations layer inputs + one layer
    on = plan(config_from_dict({**cfg.to_dict(), "activation_checkpointing": True}), t, s, 8)
    assert on.activations_full == p.activations_full and on.parts["activations"] < p.parts["activations"] / 5
    # the materialized loss holds [N, V] logits (N = 4 x 4095); the fused one a few [chunk, V] buffers
    mat = plan(config_from_dict({**cfg.to_dict(), "loss": {"materialized": True}}), t, s, 8)
    assert mat.parts["kd_loss"] > 5 * p.parts["kd_loss"]


@pytest.mark.parametrize("recipe", ["llama3.1-8b-to-4b-width", "llama3.1-8b-to-4b-depth", "mistral-nemo-12b-to-8b"])
def test_shipped_gpu_recipes_fit_8x80gb(recipe):
    plans = [(p, cfg) for p, cfg in plan_recipe(recipe, gpu_mem="80GB") if p.kind == "train"]  # loads: test_recipes_fit
    assert {p.title.split(": ")[1] for p, _ in plans} >= {"correct_teacher", "distill"}
    for p, cfg in plans:
        assert p.world == 8 and p.fits, p.render(cfg)
        assert cfg.activation_checkpointing
    # without checkpointing the plan says no, and names the knob
    off = plan_recipe(recipe, ["distill.activation_checkpointing=false"], gpu_mem="80GB")
    p, cfg = [x for x in off if x[0].title.endswith("distill")][0]
    assert p.fits is False and p.advice(cfg)[0].startswith("activation_checkpointing=true")


def test_memory_command(tmp_path, capsys):
    from minitron_fast.cli import main

    assert main(["memory", "llama3.1-8b-to-4b-width", "--gpu-mem", "80GB", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits a 80 GB GPU" in out and "kd_loss" in out and "optimizer" in out
    rows = json.loads((tmp_path / "p.json").read_text())
    assert all(r["fits"] for r in rows) and [r["world"] for r in rows if r["kind"] == "train"][0] == 8
    assert main(["memory", "llama3.1-8b-to-4b-width", "distill.activation_checkpointing=false", "--gpu-mem", "80GB"]) == 1
    assert "change: activation_checkpointing=true" in capsys.readouterr().out
    assert main(["memory", "llama3.1-8b-to-4b-width", "--gpu-mem", "eighty"]) == 2
    assert "error: GPU memory 'eighty' is not a size" in capsys.readouterr().err
    assert main(["memory", str(ROOT / "configs/distill/zero3_8gpu.yaml")]) == 2
    assert "cannot plan for model runs/" in capsys.readouterr().err


MEASURE = textwrap.dedent("""
    import json, os, sys
    from minitron_fast.distill import load_config, train
    from minitron_fast.distill.cpu_memory import resident_memory_mb
    from minitron_fast.distill.engine import init_distributed
    from minitron_fast.models.loading import load_tokenizer
    overrides = json.load(open(sys.argv[-1]))
    cfg = load_config(None, overrides)
    init_distributed()
    import deepspeed, transformers  # noqa: everything imported before the baseline
    load_tokenizer(cfg.teacher)
    base = resident_memory_mb()
    train(cfg, progress=False)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child of a large
    # pytest process would start at its parent's RSS
    peak = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")) / 1024
    print("RESULT " + json.dumps({"base_mb": base, "peak_mb": peak}), flush=True)
    from minitron_fast.distill.engine import exit_process
    exit_process(0)
""")


@pytest.mark.slow
def test_plan_within_25_percent_of_a_measured_cpu_run(tmp_path, demo_model_dir):
    """One process, ZeRO-0, fp32 (the CPU's training dtype): the plan's total against the
    trainer's measured peak RSS above the process's baseline (imports, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron_fast.models.export import copy_tokenizer_files

    dirs = {}
    for name, (h, f, heads, kv) in {"teacher": (256, 1024, 4, 2), "student": (192, 512, 3, 1)}.items():
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=h, intermediate_size=f, num_hidden_layers=4,
                                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=64,
                                         max_position_embeddings=512, tie_word_embeddings=False))
        d = dirs[name] = tmp_path / name
        m.save_pretrained(d)
        del m
        copy_tokenizer_files(demo_model_dir, d)
    o = {"teacher": dirs["teacher"], "student": dirs["student"], "out": tmp_path / "run", "steps": 2,
         "micro_batch_size": 2, "grad_accum": 1, "data.seq_len": 64, "data.max_blocks": 32, "data.eval_blocks": 0,
         "eval_every": 100, "save_every": 100, "export": False, "warmup_steps": 0, "threads": 1,
         "ds.zero_stage": 0}
    overrides = [f"{k}={v}" for k, v in o.items()]
    (tmp_path / "o.json").write_text(json.dumps(overrides))
    (tmp_path / "m.py").write_text(MEASURE)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, str(tmp_path / "m.py"), str(tmp_path / "o.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    measured = (lines[0]["peak_mb"] - lines[0]["base_mb"]) * 2**20
    cfg = config_from_dict({k: (str(v) if isinstance(v, Path) else v) for k, v in _nest(o).items()})
    p = plan_config(cfg, 1)
    total = p.total - p.parts["cuda_context"]   # a GPU's CUDA context: none in this CPU run
    assert p.parts["teacher"] > 0.2 * total and p.parts["optimizer"] > 0.2 * total   # models dominate
    print(f"plan {total / GB:.3f} GB, measured {measured / GB:.3f} GB")
    assert abs(total - measured) <= 0.25 * measured, (p.render(), measured / GB)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        parts = k.split(".")
        parts = ["deepspeed" if parts[0] == "ds" else parts[0]] + parts[1:]
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def test_unknown_model_is_a_one_line_error(tmp_path):
    cfg = DistillConfig(teacher=str(tmp_path / "nope"), student=str(tmp_path / "nope2"))
    with pytest.raises(MemoryPlanError, match="no config.json there"):
        plan_config(cfg, 8)


def test_every_plan_counts_the_cuda_contexts_on_its_gpu():
    """A trainer rank holds its own CUDA context; in a pipeline run rank 0 shares cuda:0 with the
    pipeline process's (it ran teacher_eval and importance there), and every whole-model stage
    on a GPU runs in the pipeline process: each plan counts what sits on its GPU."""
    from minitron_fast.distill.memory import CUDA_CONTEXT, plan_recipe

    plans = plan_recipe("llama3.1-8b-to-4b-width", gpu_mem="80GB")
    kinds = {p.kind for p, _ in plans}
    assert kinds == {"train", "load"}
    for p, _ in plans:
        want = 2 * CUDA_CONTEXT if p.kind == "train" else CUDA_CONTEXT
        assert p.parts["cuda_context"] == want, (p.stage, p.parts)
        assert p.total >= sum(v for k, v in p.parts.items() if k != "cuda_context") + want
    from minitron_fast.distill.memory import ModelStats, model_config, plan

    cfg = next(c for p, c in plans if p.kind == "train")
    alone = plan(cfg, None, ModelStats.of(model_config("demo")), 1)
    assert alone.parts["cuda_context"] == CUDA_CONTEXT   # a trainer on its own: its rank's context only


def test_importance_plan_counts_the_recorded_layer_inputs_of_depth_lm_loss():
    """depth_lm_loss records every layer's input of one batch; the importance plan counts them
    (L x batch x T x hidden x dtype bytes) only when the recipe asks for it."""
    from minitron_fast.distill.memory import DTYPE_BYTES, ModelStats, model_config, plan_recipe
    from minitron_fast.pipeline.recipe import load_recipe

    name, over = "llama3.1-8b-to-4b-width", ["importance.depth_lm_loss=true", "importance.dtype=bfloat16"]

    def importance(o):
        return next(p for p, _ in plan_recipe(name, o, gpu_mem="80GB") if p.stage == "importance")

    assert "layer_inputs" not in importance([]).parts
    r = load_recipe(name, over)
    t = ModelStats.of(model_config(r.teacher))
    want = t.layers * r.importance.batch_size * (r.importance.seq_len or r.data.seq_len) * t.hidden * DTYPE_BYTES["bfloat16"]
    p = importance(over)
    assert p.parts["layer_inputs"] == pytest.approx(want, rel=1e-9) and want > 1e8
    assert p.total >= p.parts["layer_inputs"] + p.parts["weights"]
    # its loss is taken a sequence at a time: the batch's logits in bf16, one sequence's in fp32 twice
    T, V, B = r.importance.seq_len or r.data.seq_len, t.vocab, r.importance.batch_size
    assert p.parts["logits"] == pytest.approx(B * T * V * 2 + T * V * 8, rel=1e-9)
