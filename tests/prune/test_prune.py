"""Structured pruning: plans from scores, in-place surgery, streaming prune, HF export.

The key truths (HOUSE_STYLE): pruning heads/neurons == the unpruned model with those units'
outputs zeroed; dropped layers == skipped layers; the exported checkpoint reloads in stock
transformers with identical logits and generates with the KV cache.
"""
from __future__ import annotations

import json

import pytest
import torch

from minitron_fast.errors import MinitronError
from minitron_fast.models import get_view
from minitron_fast.prune import (CheckpointError, Plan, PlanError, TargetError, apply_plan, make_plan,
                                 parse_target, prune_checkpoint, resolve_budget, target_geometry)


def synth_scores(geo, seed=0):
    """A scores dict in the importance file's format, random but fixed."""
    g = torch.Generator().manual_seed(seed)
    L = geo.num_hidden_layers
    s = {"channels": torch.rand(geo.hidden_size, generator=g), "depth.block_importance": torch.rand(L, generator=g),
         "depth.lm_loss": torch.rand(L, generator=g)}
    for i in range(L):
        s[f"layers.{i}.heads"] = torch.rand(geo.num_attention_heads, generator=g)
        s[f"layers.{i}.kv_groups"] = torch.rand(geo.num_key_value_heads, generator=g)
        s[f"layers.{i}.neurons"] = torch.rand(geo.intermediate_size, generator=g)
        s[f"layers.{i}.channels"] = torch.rand(geo.hidden_size, generator=g)
    return s


def width_target(geo, *, hidden=True, kv=False, layers=False):
    nkv = geo.num_key_value_heads
    gs = geo.num_attention_heads // nkv
    nkv_t = max(1, nkv - 1) if kv else nkv
    # heads: half of each group (transformers' Llama config insists that heads divide hidden)
    t = {"ffn": geo.intermediate_size - 13, "heads": nkv_t * max(1, gs // 2), "kv_heads": nkv_t}
    if hidden:
        t["hidden"] = geo.hidden_size - 8
    if layers:
        t["layers"] = geo.num_hidden_layers - 1
    return t


def tokens(vocab, shape=(2, 11)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


# -- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv", [False, True], ids=["heads", "kv_groups"])
def test_heads_and_neurons_equal_zeroed_units(tiny_model, kv):
    model = tiny_model.double()
    view = get_view(model)
    geo = view.geometry()
    plan = make_plan(model, synth_scores(geo), width_target(geo, hidden=False, kv=kv))
    hd = geo.head_dim
    ref = get_view(type(model)(model.config).double().eval())
    ref.model.load_state_dict(model.state_dict())
    with torch.no_grad():  # zero the outputs of the pruned heads (o_proj columns) and neurons (down_proj columns)
        for i, lv in enumerate(ref.layers):
            for h in set(range(geo.num_attention_heads)) - set(plan.heads[i]):
                lv.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            lv.down_proj.weight[:, sorted(set(range(geo.intermediate_size)) - set(plan.neurons[i]))] = 0
    x = tokens(geo.vocab_size)
    expected = ref.model(x).logits
    apply_plan(model, plan)
    view = get_view(model)
    g = view.geometry()
    assert (g.num_attention_heads, g.num_key_value_heads, g.intermediate_size) == (
        plan.target["num_attention_heads"], plan.target["num_key_value_heads"], plan.target["intermediate_size"])
    assert view.param_counts()["total"] == type(view).count_params(model.config)["total"]
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-10)


def test_dropped_layers_equal_skipped_layers(tiny_model):
    model = tiny_model.double()
    view = get_view(model)
    geo = view.geometry()
    scores = synth_scores(geo)
    plan = make_plan(model, scores, {"layers": geo.num_hidden_layers - 1}, depth_mode="top")
    dropped = sorted(set(range(geo.num_hidden_layers)) - set(plan.layers))
    x = tokens(geo.vocab_size)

    def skip(module, args, kwargs, output):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [view.layers[i].module.register_forward_hook(skip, with_kwargs=True) for i in dropped]
    expected = model(x).logits
    for h in hooks:
        h.remove()
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == geo.num_hidden_layers - 1
    assert [lv.attn.layer_idx for lv in get_view(model).layers] == list(range(geo.num_hidden_layers - 1))
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
def test_export_reloads_in_stock_transformers(tiny_model, tmp_path, streaming):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    tiny_model.save_pretrained(src)
    geo = get_view(tiny_model).geometry()
    scores = synth_scores(geo)
    plan = make_plan(tiny_model, scores, width_target(geo, kv=True, layers=True))
    out = prune_checkpoint(src, plan, tmp_path / "out", streaming=streaming, progress=False,
                           max_shard_bytes=20_000)  # force several shards
    apply_plan(tiny_model, plan)  # the in-place result is the reference
    x = tokens(geo.vocab_size)
    expected = tiny_model(x).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(tiny_model)
    torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=0)
    assert get_view(reloaded).geometry() == plan.target_geometry()
    assert get_view(reloaded).tied == bool(tiny_model.config.tie_word_embeddings)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == geo.head_dim and cfg["hidden_size"] == geo.hidden_size - 8
    rec = json.loads((out / "minitron.json").read_text())
    assert rec["plan"]["kept"]["layers"] == plan.layers and rec["streaming"] == streaming
    # generate() with the KV cache agrees with a cache-free greedy decode
    prompt = x[:1, :5]
    a = reloaded.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    b = reloaded.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b) and a.shape[1] == 11
    assert sorted(p.name for p in src.iterdir()) == sorted(["config.json", "generation_config.json", "model.safetensors"])


# -- plans -----------------------------------------------------------------------------------------

def test_gqa_heads_ranked_within_groups(tiny_builders):
    model = tiny_builders["llama"]()  # 8 heads, 2 KV groups of 4
    geo = get_view(model).geometry()
    s = synth_scores(geo)
    for i in range(geo.num_hidden_layers):  # group 0's heads all beat group 1's
        s[f"layers.{i}.heads"] = torch.tensor([9.0, 8, 7, 6, 4, 3, 2, 1])
        s[f"layers.{i}.kv_groups"] = torch.tensor([1.0, 2.0])
    plan = make_plan(model, s, {"heads": 4})
    assert all(plan.heads[i] == [0, 1, 4, 5] for i in plan.layers)  # 2 per group, not the global top 4
    plan = make_plan(model, s, {"heads": 2, "kv_heads": 1})
    assert all(plan.kv_heads[i] == [1] and plan.heads[i] == [4, 5] for i in plan.layers)


def test_depth_modes(tiny_builders):
    model = tiny_builders["llama"](num_hidden_layers=6)
    geo = get_view(model).geometry()
    s = synth_scores(geo)
    s["depth.block_importance"] = torch.tensor([5.0, 0.1, 4.0, 0.3, 0.35, 6.0])
    assert make_plan(model, s, {"layers": 4}, depth_mode="top").layers == [0, 2, 4, 5]
    assert make_plan(model, s, {"layers": 4}, depth_mode="contiguous").layers == [0, 1, 2, 5]
    s["depth.lm_loss_block"] = torch.tensor([3.0, 2.0, 1.0, 4.0, 5.0])  # k = 2: drop [2, 4)
    assert make_plan(model, s, {"layers": 4}, depth_metric="lm_loss_block").layers == [0, 1, 4, 5]


def test_plan_json_roundtrip_and_validation(tiny_builders, tmp_path):
    model = tiny_builders["mistral_nemo_like"]()
    geo = get_view(model).geometry()
    plan = make_plan(model, synth_scores(geo), width_target(geo, layers=True))
    p = plan.save(tmp_path / "plan.json")
    again = Plan.load(p)
    assert again.to_dict() == plan.to_dict()
    other = tiny_builders["llama"]()
    with pytest.raises(PlanError, match="made for another model"):
        apply_plan(other, again)
    bad = plan.to_dict()
    first = str(plan.layers[0])
    bad["kept"]["per_layer"][first]["neurons"] = bad["kept"]["per_layer"][first]["neurons"][:-1]
    with pytest.raises(PlanError, match="keeps .* neurons but its target says"):
        apply_plan(model, Plan.from_dict(bad))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "junk.json")


def test_bad_targets_and_scores(tiny_builders, tmp_path):
    model = tiny_builders["llama"]()
    geo = get_view(model).geometry()
    s = synth_scores(geo)
    with pytest.raises(TargetError, match="hidden=128 is larger than the source model's hidden=64"):
        make_plan(model, s, "hidden=128")
    with pytest.raises(TargetError, match="heads=3 is not divisible by kv_heads=2"):
        make_plan(model, s, "heads=3,kv_heads=2")
    with pytest.raises(TargetError, match="unknown target key 'width'"):
        parse_target("width=3")
    with pytest.raises(TargetError, match="cannot express hidden=64 with heads=6"):
        make_plan(model, s, "heads=6,kv_heads=2")
    with pytest.raises(TargetError, match="not an integer"):
        parse_target("hidden=big")
    wrong = synth_scores(geo.replace(intermediate_size=50))
    with pytest.raises(PlanError, match="has 50 entries but the model has 96; is this scores file from another model"):
        make_plan(model, wrong, "ffn=64")
    with pytest.raises(PlanError, match="no 'channels'"):
        make_plan(model, {k: v for k, v in s.items() if k != "channels"}, "hidden=32")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(PlanError, match="cannot read scores file"):
        make_plan(model, tmp_path / "bad.safetensors", "hidden=32")


def test_scores_file_roundtrip(tiny_builders, tmp_path):
    from safetensors.torch import save_file

    model = tiny_builders["qwen2_bias"]()
    geo = get_view(model).geometry()
    s = synth_scores(geo)
    path = tmp_path / "scores.safetensors"
    save_file(s, str(path), metadata={"minitron_fast": json.dumps({"format": 1})})
    a = make_plan(model, path, "hidden=40,ffn=48,layers=1")
    b = make_plan(model, s, "hidden=40,ffn=48,layers=1")
    assert a.layers == b.layers and a.hidden == b.hidden and a.neurons == b.neurons
    assert len(a.info["scores_sha256"]) == 64


def test_budget_resolver(tiny_builders):
    from minitron_fast.models import view_class_for_config

    cfg = tiny_builders["llama"]().config
    vc = view_class_for_config(cfg)
    full = vc.count_params(cfg)["total"]
    budget = int(full * 0.7)
    g = resolve_budget(cfg, budget, axes="width")
    n = vc.count_params(cfg, g)["total"]
    assert n <= budget and g.hidden_size % 8 == 0 and g.intermediate_size % 8 == 0
    assert vc.count_params(cfg, g.replace(hidden_size=g.hidden_size + 8, intermediate_size=g.intermediate_size + 8))["total"] > budget
    g = resolve_budget(cfg, int(full * 0.8), axes="depth")
    assert g.num_hidden_layers < 3 and vc.count_params(cfg, g)["total"] <= full * 0.8
    assert target_geometry(cfg, "params=0.7x") == resolve_budget(cfg, int(full * 0.7))


# -- streaming and export edge cases ---------------------------------------------------------------------

def test_streaming_bad_input(tiny_builders, tmp_path):
    model = tiny_builders["llama"]()
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    geo = get_view(model).geometry()
    plan = make_plan(model, synth_scores(geo), {"hidden": 48})
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    (tmp_path / "exists").mkdir()
    with pytest.raises(MinitronError, match="already exists"):
        prune_checkpoint(src, plan, tmp_path / "exists", progress=False)
    with pytest.raises(MinitronError, match="input model directory"):
        prune_checkpoint(src, plan, src / "pruned", progress=False)
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # corrupt
    with pytest.raises(CheckpointError, match="truncated|not a valid safetensors"):
        prune_checkpoint(src, plan, tmp_path / "out", progress=False)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        prune_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert {p.name for p in src.iterdir()} == set(before) - {shards[1].name}
    assert all((src / n).read_bytes() == b for n, b in before.items() if n != shards[1].name)


def test_cli_prune(tiny_builders, tmp_path, capsys):
    from safetensors.torch import save_file

    from minitron_fast.cli import main

    model = tiny_builders["llama_tied"]()
    src = tmp_path / "src"
    model.save_pretrained(src)
    geo = get_view(model).geometry()
    save_file(synth_scores(geo), str(tmp_path / "s.safetensors"))
    args = ["prune", "--model", str(src), "--scores", str(tmp_path / "s.safetensors"),
            "--target", "hidden=48,ffn=64,heads=4,layers=2"]
    assert main(args + ["--plan-only", "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "->" in out
    assert main(["prune", "--model", str(src), "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "pruned"), "--streaming"]) == 0
    rec = json.loads((tmp_path / "pruned" / "minitron.json").read_text())
    assert rec["plan"]["target"]["hidden_size"] == 48
    assert main(args + ["--out", str(tmp_path / "pruned")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--scores", str(tmp_path / "s.safetensors"),
                 "--target", "layers=9", "--out", str(tmp_path / "x")]) == 2
    assert "layers=9 is larger" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_streaming_prune_matches_in_place(demo_model_dir, tmp_path):
    """SmolLM2-135M (tied, GQA 9/3, 30 layers): the streamed checkpoint reloads in stock
    transformers with the logits of the model pruned in place after loading."""
    from transformers import AutoModelForCausalLM

    from minitron_fast.models.loading import load_model

    model = load_model(demo_model_dir)
    geo = get_view(model).geometry()
    plan = make_plan(model, synth_scores(geo), "hidden=480,ffn=1024,heads=6,layers=26")
    out = prune_checkpoint(demo_model_dir, plan, tmp_path / "student", streaming=True, progress=False)
    apply_plan(model, plan)
    x = tokens(geo.vocab_size, (1, 16))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert get_view(reloaded).tied and reloaded.config.num_hidden_layers == 26
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert (out / "tokenizer.json").is_file()


def test_load_private_equals_from_pretrained(tiny_model, tmp_path):
    """The in-memory prune path loads with positioned reads into private memory (no copy-on-write
    file mapping to compact into): the same parameters, buffers, tying and logits as stock
    from_pretrained."""
    from transformers import AutoModelForCausalLM

    from minitron_fast.prune.streaming import load_private

    tiny_model.save_pretrained(tmp_path / "m")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    got = load_private(tmp_path / "m")
    assert type(got) is type(ref) and not got.training
    assert get_view(got).tied == get_view(ref).tied
    for (n, a), (m, b) in zip(got.state_dict().items(), ref.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    for (n, a), (m, b) in zip(got.named_buffers(), ref.named_buffers()):
        assert n == m and torch.equal(a, b), n
    x = tokens(tiny_model.config.vocab_size)
    torch.testing.assert_close(got(x).logits, ref(x).logits, rtol=0, atol=0)


def test_load_private_bad_checkpoints(tiny_builders, tmp_path):
    from safetensors.torch import load_file, save_file

    from minitron_fast.prune.streaming import load_private

    model = tiny_builders["qwen3"]()
    model.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    good = load_file(str(f))
    save_file({k: v for k, v in good.items() if k != "model.norm.weight"}, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="has no tensor model.norm.weight"):
        load_private(tmp_path / "m")
    save_file({**good, "model.norm.weight": torch.zeros(5)}, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(5,\)"):
        load_private(tmp_path / "m")
    save_file({**good, "model.extra.weight": torch.zeros(5)}, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.extra.weight is not a parameter"):
        load_private(tmp_path / "m")
    save_file({k: v.half() for k, v in good.items()}, str(f), metadata={"format": "pt"})  # converted on read
    got = load_private(tmp_path / "m", dtype=torch.float32)
    assert torch.equal(get_view(got).final_norm.weight, good["model.norm.weight"].half().float())
