"""Every shipped recipe fits 8 x 80 GB in every stage that loads a model (``minitron-fast memory``
plans the whole-model loads of teacher_eval, importance, search, prune and evaluate too, with
``device_map: auto`` spreading over the node's GPUs), and the published configs behind the plans
(``KNOWN_CONFIGS``) give the published parameter counts. Issue 23, "Recipes that fit"."""
from __future__ import annotations

import pytest

from minitron_fast.distill.memory import (GB, KNOWN_CONFIGS, ModelStats, StagePlan, load_plan, model_config,
                                          plan_recipe)
from minitron_fast.pipeline.recipe import configs_dir, load_recipe, stage_enabled

MIXTRAL = "mixtral-8x7b-experts-8-to-6"
# The model cards' sizes (parameters): what the plan counts from KNOWN_CONFIGS must match them.
PUBLISHED = {"meta-llama/Llama-3.1-8B": 8.03e9, "nvidia/Llama-3.1-Minitron-4B-Width-Base": 4.51e9,
             "mistralai/Mistral-Nemo-Base-2407": 12.25e9, "mistralai/Mixtral-8x7B-v0.1": 46.70e9,
             "Qwen/Qwen3-8B": 8.19e9, "google/gemma-2-9b": 9.24e9, "HuggingFaceTB/SmolLM2-135M-Instruct": 0.1345e9}
RECIPES = sorted(configs_dir().glob("*.yaml"))


def test_known_configs_are_the_published_models():
    assert set(KNOWN_CONFIGS) == set(PUBLISHED)
    for name, size in PUBLISHED.items():
        s = ModelStats.of(model_config(name))
        assert abs(s.params - size) <= 0.005 * size, (name, s.params)
    mix = model_config("mistralai/Mixtral-8x7B-v0.1")
    assert (mix.num_local_experts, mix.num_experts_per_tok, mix.head_dim, mix.vocab_size) == (8, 2, 128, 32000)
    assert ModelStats.of(mix).ffn == 2 * 14336                      # a token runs through its top-2 experts
    gemma = ModelStats.of(model_config("google/gemma-2-9b"))
    assert gemma.eager and gemma.attn_softcap and gemma.heads == 16 and gemma.dtype == "float32"
    # the demo is the embedded SmolLM2-135M converted to fp32: its shape without converting it
    demo = ModelStats.of(model_config("demo"))
    assert demo.params == 134_515_008 and demo.dtype == "float32" and (demo.hidden, demo.layers) == (576, 30)


def test_every_shipped_recipe_is_planned_offline():
    """Every shipped recipe's teacher is the demo or a KNOWN_CONFIGS entry (no checkpoint needed)."""
    assert len(RECIPES) >= 7
    for path in RECIPES:
        r = load_recipe(path)
        assert r.teacher == "demo" or r.teacher in KNOWN_CONFIGS, (path.name, r.teacher)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_stage_of_every_shipped_recipe_fits_8x80gb(path):
    r = load_recipe(path)
    plans = plan_recipe(path, gpu_mem="80GB", world=8)
    stages = [p.stage for p, _ in plans]
    want = {"teacher_eval", "importance", "prune"} | {s for s in ("correct_teacher", "distill", "scratch")
                                                      if stage_enabled(r, s)}
    assert want <= set(stages) and ("evaluate" in stages) == bool(r.evaluate.tasks), stages
    for p, cfg in plans:
        assert p.fits is True and p.total <= 0.9 * 80e9, p.render(cfg)
        assert p.advice(cfg) == []
    if r.teacher == "demo":   # the CPU demo keeps the CPU defaults (float32)
        return
    # a GPU recipe: every stage that loads a model sets bfloat16 (prune streams from the shards)
    for section in ("importance", "search", "evaluate"):
        assert getattr(r, section).dtype == "bfloat16", (path.name, section)
    for section in ("correct_teacher", "distill", "scratch"):
        if stage_enabled(r, section):
            assert getattr(r, section).dtype == "bfloat16", (path.name, section)
    assert r.prune.streaming or r.prune.dtype == "bfloat16"
    assert all(p.dtype == "bf16" for p, _ in plans), [(p.stage, p.dtype) for p, _ in plans]


def test_old_mixtral_settings_are_flagged_with_the_stage():
    """The recipe as shipped before issue 23: no dtype (fp32) and no device_map for the forward
    stages, distill without teacher_zero3. Each stage that cannot fit is named, with its keys."""
    old = ["evaluate.dtype=null", "evaluate.device_map=null", "importance.dtype=null", "importance.device_map=null",
           "distill.deepspeed.teacher_zero3=false"]
    plans = {p.stage: (p, cfg) for p, cfg in plan_recipe(MIXTRAL, old, gpu_mem="80GB")}
    te, _ = plans["teacher_eval"]
    assert isinstance(te, StagePlan) and te.fits is False and te.dtype == "fp32" and te.world == 1
    assert te.parts["weights"] == pytest.approx(46_702_792_704 * 4)          # 186.8 GB on one GPU
    assert te.advice()[:2] == ["evaluate.dtype=bfloat16 (weights 186.8 -> 93.4 GB)",
                               "evaluate.device_map=auto (the weights over the node's 8 GPUs: about 11.7 GB each "
                               "in bfloat16)"]
    text = te.render()
    assert text.startswith(f"{MIXTRAL}: teacher_eval: per GPU, the teacher (46.70B parameters) on one GPU, fp32")
    assert "verdict: DOES NOT FIT a 80 GB GPU" in text and "change: evaluate.dtype=bfloat16" in text
    assert plans["importance"][0].fits is False and plans["importance"][0].advice()[0].startswith("importance.dtype")
    di, dcfg = plans["distill"]
    assert di.fits is False and any(a.startswith("deepspeed.teacher_zero3=true") for a in di.advice(dcfg))
    # bf16 alone is still 93.4 GB on one GPU: device_map auto is what spreads it
    bf16 = {p.stage: p for p, _ in plan_recipe(MIXTRAL, ["evaluate.device_map=null"], gpu_mem="80GB")}
    assert bf16["teacher_eval"].fits is False and bf16["teacher_eval"].parts["weights"] > 90e9
    assert bf16["teacher_eval"].advice()[0].startswith("evaluate.device_map=auto")
    assert bf16["importance"].fits is True                                    # its own device_map: auto


def test_memory_command_names_the_stage_that_does_not_fit(capsys, tmp_path):
    import json

    from minitron_fast.cli import main

    assert main(["memory", MIXTRAL, "evaluate.dtype=null", "evaluate.device_map=null", "--json",
                 str(tmp_path / "p.json")]) == 1
    out = capsys.readouterr().out
    assert f"{MIXTRAL}: teacher_eval: per GPU, the teacher (46.70B parameters) on one GPU, fp32" in out
    assert out.rstrip().splitlines()[-1] == "does not fit a 80 GB GPU: teacher_eval, prune, evaluate"
    rows = {r["stage"]: r for r in json.loads((tmp_path / "p.json").read_text())}
    assert rows["teacher_eval"]["fits"] is False and rows["teacher_eval"]["kind"] == "load"
    assert rows["importance"]["fits"] is True and rows["importance"]["gpus"] == 8
    assert rows["distill"]["fits"] is True and rows["distill"]["kind"] == "train"
    assert main(["memory", MIXTRAL]) == 0
    assert "does not fit" not in capsys.readouterr().out


def test_device_map_spreads_whole_layers_and_cpu_loads_nothing_on_a_gpu():
    s = ModelStats.of(model_config("mistralai/Mixtral-8x7B-v0.1"))
    one = load_plan("importance", s, section="importance", dtype="bfloat16", device="cuda", node_gpus=8)
    spread = load_plan("importance", s, section="importance", dtype="bfloat16", device_map="auto", node_gpus=8)
    assert one.world == 1 and one.parts["weights"] == s.params * 2
    assert spread.world == 8 and spread.parts["weights"] == s.params * 2 / 8 + s.block_params * 2
    assert spread.parts["activations"] == one.parts["activations"]
    cpu = load_plan("importance", s, section="importance", dtype=None, device="cpu", gpu_mem=80e9)
    assert cpu.total == 0 and cpu.fits and not cpu.on_gpu and "runs on the CPU" in cpu.notes[0]


def test_held_out_logits_and_eager_attention_are_counted():
    """Gemma 2's 256k vocabulary and eager attention: the shipped evaluate batch of 4 x 8192 tokens
    made [4, 8192, 256000] logits (84 GB with the loss's fp32 copies) and [4, 16, 8192, 8192]
    attention scores: the plan says so, and names the batch."""
    plans = {p.stage: p for p, _ in plan_recipe("gemma2-9b-to-6b-width", ["evaluate.batch_size=4"], gpu_mem="80GB")}
    te = plans["teacher_eval"]
    assert te.parts["logits"] == pytest.approx(4 * 8192 * 256000 * (2 + 8))
    assert te.attention > 30 * GB and te.fits is False
    assert any(a.startswith("evaluate.batch_size=2") for a in te.advice())
    assert any(a.startswith("evaluate.attn_implementation=flash_attention_2") for a in te.advice())
    sdpa = {p.stage: p for p, _ in plan_recipe("gemma2-9b-to-6b-width", ["evaluate.attn_implementation=sdpa"],
                                               gpu_mem="80GB")}
    assert sdpa["teacher_eval"].attention == 0 and sdpa["teacher_eval"].total < plans["teacher_eval"].total
