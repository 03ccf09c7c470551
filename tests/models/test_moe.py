"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): adapters, expert importance,
expert and expert-FFN pruning, depth with dense and MoE layers mixed, export, streaming.

Truths tested on tiny random models (4 experts, hidden 32), in float64:
- expert pruning == a model built by hand from the original with those experts and router rows
  (with ``norm_topk_prob=False`` the softmax denominator changes with the expert set: the
  hand-built reference slices the same router rows, so it must match exactly);
- expert-FFN pruning == the same neurons zeroed (their ``down_proj`` columns);
- a dropped layer == a skipped layer, and every kept layer keeps its type (dense or MoE);
- the exported (in-memory and streamed) checkpoint reloads in stock transformers with identical
  logits, and ``generate()`` with the cache equals it without.
"""
from __future__ import annotations

import json

import pytest
import torch

from minitron_fast.models import get_view
from minitron_fast.prune import TargetError, apply_plan, make_plan, prune_checkpoint
from tests import ROOT

COMMON = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)


def _mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**{**COMMON, "intermediate_size": 16, "num_local_experts": 4,
                                               "num_experts_per_tok": 2, **kw}))


def _qwen2_moe(**kw):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**COMMON, "intermediate_size": 24, "moe_intermediate_size": 16,
                                                 "shared_expert_intermediate_size": 20, "num_experts": 4,
                                                 "num_experts_per_tok": 2, "mlp_only_layers": [1], **kw}))


def _qwen3_moe(**kw):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    # decoder_sparse_step 2: layers 0 and 2 dense, layer 1 MoE
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**COMMON, "intermediate_size": 24, "moe_intermediate_size": 16,
                                                 "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 8,
                                                 "decoder_sparse_step": 2, "norm_topk_prob": True, **kw}))


BUILDERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe}


def f64(model):
    """The model in float64 with the eager experts loop (torch's grouped_mm takes no float64)."""
    model.set_experts_implementation("eager")
    return model.double()


def build(family, **kw):
    torch.manual_seed(0)
    m = BUILDERS[family](**kw).eval()
    with torch.no_grad():  # routers initialised to zeros (Qwen) would make routing ties: randomise
        for name, p in m.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return m


def moe_scores(model, seed=0):
    """A scores dict of the importance file's format, with the MoE keys, random but fixed."""
    g = torch.Generator().manual_seed(seed)
    view = get_view(model)
    geo = view.geometry()
    s = {"channels": torch.rand(geo.hidden_size, generator=g),
         "depth.block_importance": torch.rand(geo.num_hidden_layers, generator=g)}
    for i, lv in enumerate(view.layers):
        s[f"layers.{i}.heads"] = torch.rand(geo.num_attention_heads, generator=g)
        s[f"layers.{i}.kv_groups"] = torch.rand(geo.num_key_value_heads, generator=g)
        s[f"layers.{i}.neurons"] = torch.rand(geo.intermediate_size, generator=g)
        s[f"layers.{i}.channels"] = torch.rand(geo.hidden_size, generator=g)
        if lv.moe is not None:
            s[f"layers.{i}.experts"] = torch.rand(geo.num_experts, generator=g)
            s[f"layers.{i}.expert_neurons"] = torch.rand(geo.num_experts, geo.moe_intermediate_size, generator=g)
    return s


def tokens(vocab, shape=(2, 9)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


FAMILIES = sorted(BUILDERS)


# -- adapters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_info_and_parameter_counts(family):
    from minitron_fast.models.loading import meta_model

    model = build(family)
    view = get_view(model)
    info = view.info()
    ffn = model.config.intermediate_size if family == "mixtral" else model.config.moe_intermediate_size
    assert (info["family"], info["num_experts"], info["num_experts_per_tok"], info["moe_intermediate_size"]) == (
        family, 4, 2, ffn)
    assert info["moe_layers"] == {"mixtral": 3, "qwen2_moe": 2, "qwen3_moe": 1}[family]
    assert view.param_counts()["total"] == type(view).count_params(model.config)["total"] == info["num_parameters"]
    # a pruned shape: the analytic count equals the modules the config builds
    g = view.geometry().replace(num_experts=3, moe_intermediate_size=8, num_hidden_layers=2)
    cfg = type(view).config_for(model.config, g)
    student = get_view(meta_model(cfg))
    assert student.param_counts()["total"] == type(view).count_params(model.config, g)["total"]
    assert student.geometry() == type(view).normalize_geometry(model.config, g)


# -- exactness -----------------------------------------------------------------------------------------

def _hand_built(model, experts: dict[int, list[int]], top_k: int):
    """The original with only ``experts`` (and their router rows) in each MoE layer, built by hand."""
    cfg = type(model.config).from_dict(model.config.to_dict())
    cfg.num_experts, cfg.num_experts_per_tok = len(next(iter(experts.values()))), top_k
    ref = f64(type(model)(cfg)).eval()
    sd = model.state_dict()
    for i, kept in experts.items():
        k = torch.tensor(kept)
        for name in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            key = f"model.layers.{i}.{name}"
            sd[key] = sd[key][k]
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("family, norm_topk", [("mixtral", None), ("qwen2_moe", False), ("qwen2_moe", True),
                                                ("qwen3_moe", False)])
@pytest.mark.parametrize("n_experts", [3, 1])
def test_expert_pruning_equals_hand_built_model(family, norm_topk, n_experts):
    kw = {} if norm_topk is None else {"norm_topk_prob": norm_topk}
    model = f64(build(family, **kw))
    plan = make_plan(model, moe_scores(model), f"experts={n_experts}")
    assert plan.target["num_experts_per_tok"] == min(2, n_experts)
    ref = _hand_built(model, plan.experts, min(2, n_experts))
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        expected = ref(x).logits
        apply_plan(model, plan)
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    view = get_view(model)
    assert view.geometry() == plan.target_geometry()
    assert view.param_counts()["total"] == type(view).count_params(model.config)["total"]
    for lv in view.layers:
        if lv.moe is not None:
            assert lv.moe.router.weight.shape[0] == lv.moe.experts.num_experts == n_experts


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_ffn_pruning_equals_zeroed_neurons(family):
    model = f64(build(family))
    view = get_view(model)
    F = view.geometry().moe_intermediate_size
    plan = make_plan(model, moe_scores(model), f"expert_ffn={F - 5}")
    ref = f64(type(model)(model.config)).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, lv in enumerate(get_view(ref).layers):
            if lv.moe is None:
                continue
            assert plan.expert_neurons[i][0] != plan.expert_neurons[i][1]  # each expert its own neurons
            for e, kept in zip(plan.experts[i], plan.expert_neurons[i]):
                lv.moe.experts.down_proj[e][:, sorted(set(range(F)) - set(kept))] = 0
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        expected = ref(x).logits
        apply_plan(model, plan)
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert get_view(model).geometry().moe_intermediate_size == F - 5
    assert get_view(model).param_counts()["total"] == type(view).count_params(model.config)["total"]


@pytest.mark.parametrize("family, drop", [("qwen2_moe", 0), ("qwen3_moe", 0), ("mixtral", 1)])
def test_dropped_layer_equals_skipped_and_types_are_kept(family, drop):
    from transformers import AutoModelForCausalLM

    from minitron_fast.importance.depth import skip_layers
    from minitron_fast.prune import Plan

    model = f64(build(family))
    view = get_view(model)
    types = [lv.moe is not None for lv in view.layers]
    scores = moe_scores(model)
    scores["depth.block_importance"] = torch.tensor([1.0, 2.0, 3.0])
    scores["depth.block_importance"][drop] = 0.0
    plan = make_plan(model, scores, "layers=2", depth_mode="top")
    assert plan.layers == [i for i in range(3) if i != drop]
    x = tokens(model.config.vocab_size)
    with torch.no_grad(), skip_layers(model, [drop]):
        expected = model(x).logits
    apply_plan(model, plan)
    kept_types = [types[i] for i in plan.layers]
    assert [lv.moe is not None for lv in get_view(model).layers] == kept_types
    assert get_view(model).param_counts()["total"] == type(view).count_params(model.config)["total"]
    # a model built from the pruned config alone has the same layer types
    rebuilt = AutoModelForCausalLM.from_config(model.config)
    assert [lv.moe is not None for lv in get_view(rebuilt).layers] == kept_types
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-12)
    Plan.from_dict(json.loads(json.dumps(plan.to_dict())))  # JSON round trip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
def test_export_reloads_in_stock_transformers(family, streaming, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(family)
    src = tmp_path / "src"
    model.save_pretrained(src)
    geo = get_view(model).geometry()
    target = (f"hidden=24,heads=2,kv_heads=1,experts=3,expert_ffn={geo.moe_intermediate_size - 4},layers=2"
              + (",ffn=20" if family != "mixtral" else ""))
    plan = make_plan(model, moe_scores(model), target, depth_mode="top")
    out = prune_checkpoint(src, plan, tmp_path / "out", streaming=streaming, progress=False, max_shard_bytes=20_000)
    apply_plan(model, plan)
    x = tokens(geo.vocab_size)
    with torch.no_grad():
        expected = model(x).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    assert get_view(reloaded).geometry() == plan.target_geometry()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=0)
    prompt = x[:1, :4]
    a = reloaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    b = reloaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b) and a.shape[1] == 9


# -- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, match", [
    pytest.param("experts=5", r"experts=5 is larger than the model's 4 experts", id="too-many-experts"),
    pytest.param("expert_ffn=17", r"expert_ffn=17 is larger than the model's 16 neurons per expert", id="wide-ffn"),
    pytest.param("experts=0", r"experts=0 must be a positive integer", id="zero-experts"),
])
def test_bad_moe_targets(target, match):
    model = build("qwen2_moe")
    with pytest.raises(TargetError, match=match) as e:
        make_plan(model, moe_scores(model), target)
    assert "\n" not in str(e.value)


def test_experts_target_on_a_dense_model():
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**COMMON, "intermediate_size": 16})
    with pytest.raises(TargetError, match=r"experts=2 applies to mixture-of-experts models only; this llama "
                                          r"model is dense") as e:
        make_plan(cfg, {}, "experts=2")
    assert "\n" not in str(e.value)


# -- importance ------------------------------------------------------------------------------------------

def _reap_reference(model, x):
    """REAP, expert-neuron and router-mass scores of each MoE layer by hand, in float64, from the
    sparse blocks' inputs captured in an ordinary forward."""
    view = get_view(model)
    inputs = {}
    hooks = [lv.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, lv in enumerate(view.layers) if lv.moe is not None]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    ref = {}
    for i, h in inputs.items():
        moe = view.layers[i].moe
        h = h.double()
        gu, dn = moe.experts.gate_up_proj.double(), moe.experts.down_proj.double()
        probs = torch.softmax(h @ moe.router.weight.double().T, -1)
        top, idx = probs.topk(model.config.num_experts_per_tok, -1)
        if getattr(model.config, "norm_topk_prob", True):  # Mixtral always renormalises
            top = top / top.sum(-1, keepdim=True)
        E, F = moe.num_experts, moe.ffn
        reap, neur, n = torch.zeros(E, dtype=torch.float64), torch.zeros(E, F, dtype=torch.float64), torch.zeros(E)
        for t in range(h.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[t, j])
                gate, up = (gu[e] @ h[t]).chunk(2)
                act = torch.nn.functional.silu(gate) * up
                reap[e] += top[t, j] * (dn[e] @ act).norm()
                neur[e] += top[t, j] * act.abs()
                n[e] += 1
        ref[i] = (reap / n.clamp_min(1), neur / n.clamp_min(1)[:, None], probs.mean(0))
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_importance_is_reap_from_the_same_pass(family, tmp_path):
    from minitron_fast.importance.collect import ImportanceCollector
    from minitron_fast.artifacts.scores import load_scores, save_scores

    model = build(family)  # fp32 (the collector's fp32 sums), reference in float64
    model.set_experts_implementation("eager")
    x = tokens(model.config.vocab_size, (3, 7))
    with torch.no_grad():
        plain = model(x).logits
    calls = {"decoder": 0, "experts": 0}
    model.model.register_forward_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    with ImportanceCollector(model, impl="torch") as col:
        for lv in col.view.layers:
            if lv.moe is not None:
                fwd = lv.moe.experts.forward  # the collector's patched forward: count its calls

                def counted(*a, fwd=fwd):
                    calls["experts"] += 1
                    return fwd(*a)
                lv.moe.experts.forward = counted
        out = col.step(x, run_lm_head=True)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-6)  # the patched experts compute the same
    n_moe = sum(lv.moe is not None for lv in get_view(model).layers)
    assert calls == {"decoder": 1, "experts": n_moe}  # one pass gives every statistic
    assert all("forward" not in vars(lv.moe.experts) for lv in get_view(model).layers if lv.moe is not None)
    scores = col.scores()
    ref = _reap_reference(model, x)
    assert sorted(scores.experts) == sorted(ref)
    for i, (reap, neur, mass) in ref.items():
        torch.testing.assert_close(scores.experts[i].double(), reap, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores.expert_neurons[i].double(), neur, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(scores.expert_mass[i].double(), mass, rtol=1e-5, atol=1e-7)
    assert sorted(scores.shared_neurons) == (sorted(ref) if family == "qwen2_moe" else [])
    back = load_scores(save_scores(scores, tmp_path / "s.safetensors"))
    for i in ref:
        assert torch.equal(back.expert_neurons[i], scores.expert_neurons[i])
        if family == "qwen2_moe":
            assert back.shared_neurons[i].shape == (model.config.shared_expert_intermediate_size,)
    # the scores drive a plan
    plan = make_plan(model, back, "experts=2")
    assert all(len(e) == 2 for e in plan.experts.values())


# -- search, distillation, evaluation of MoE students --------------------------------------------------

@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory):
    """A tiny Qwen2-MoE (shared expert, one dense layer) with the pipeline tests' BPE tokenizer."""
    from bench.common import make_tiny_teacher

    d = make_tiny_teacher(tmp_path_factory.mktemp("moe") / "teacher")
    for f in ("model.safetensors", "config.json", "generation_config.json"):
        (d / f).unlink(missing_ok=True)
    build("qwen2_moe", vocab_size=160, max_position_embeddings=128).save_pretrained(d)
    return d


def test_search_chooses_among_expert_counts(moe_teacher, tmp_path):
    from minitron_fast.data import token_blocks
    from minitron_fast.importance import compute_importance, save_scores
    from minitron_fast.models import view_class_for_config
    from minitron_fast.models.loading import load_config, load_model, load_tokenizer
    from minitron_fast.prune import Plan, validate_plan
    from minitron_fast.search import SearchConfig, enumerate_candidates, run_search

    config = load_config(moe_teacher)
    full = view_class_for_config(config).count_params(config)["total"]
    cands = enumerate_candidates(config, int(0.8 * full), tolerance=0.1, kinds=["width"], max_per_kind=None)
    counts = {c.geometry.num_experts for c in cands}
    assert counts <= {2, 3, 4} and len(counts) >= 2  # expert counts from top-k (2) to all compete
    assert all(f"experts={c.geometry.num_experts}" in c.target() for c in cands)
    calib = token_blocks(load_tokenizer(moe_teacher), "demo", "calib", 32, max_blocks=4)
    scores = save_scores(compute_importance(load_model(moe_teacher), calib, progress=False), tmp_path / "s.safetensors")
    cfg = SearchConfig(tolerance=0.1, kinds=["width"], max_candidates=2, retrain_steps=2, micro_batch_size=2,
                       lr=1e-3, eval_blocks=2)
    res = run_search(str(moe_teacher), scores, cfg, budget=int(0.8 * full), out_dir=tmp_path / "search", seq_len=32,
                     progress=False, log=lambda s: None)
    assert len(res["candidates"]) == 2
    assert all(torch.isfinite(torch.tensor(c["loss"])) for c in res["candidates"])
    plan = Plan.load(res["plan"])
    geo = validate_plan(plan, config)
    assert geo.num_experts == res["winner"]["num_experts"] and set(plan.experts) == {0, 2}


@pytest.mark.slow
def test_pipeline_prunes_distills_and_evaluates_a_moe_student(moe_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from minitron_fast.cli import main

    recipe = tmp_path / "moe.yaml"
    train = ("micro_batch_size: 2, lr: 1.0e-3, warmup_steps: 0, eval_every: 100, save_every: 100, "
             "data: {max_blocks: 8, eval_blocks: 2}, deepspeed: {zero_stage: 3}")  # ZeRO-3: stacked experts partitioned
    recipe.write_text(f"""
name: moe
teacher: {moe_teacher}
out: {tmp_path / 'run'}
data: {{source: demo, seq_len: 32}}
correct_teacher: {{enabled: false}}
importance: {{samples: 4, batch_size: 4}}
prune: {{target: "experts=3,expert_ffn=12,hidden=24"}}
distill: {{steps: 2, {train}}}
scratch: {{enabled: false}}
evaluate: {{eval_blocks: 2, batch_size: 2}}
""")
    assert main(["run", str(recipe), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["student_params"] < rep["teacher_params"]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    g = get_view(student).geometry()
    assert (g.num_experts, g.moe_intermediate_size, g.hidden_size, g.num_experts_per_tok) == (3, 12, 24, 2)
    assert [lv.moe is not None for lv in get_view(student).layers] == [True, False, True]


def test_cli_info_prune_and_one_line_errors(moe_teacher, tmp_path, capsys):
    from minitron_fast.cli import main

    assert main(["info", "--model", str(moe_teacher), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["num_experts"], info["num_experts_per_tok"], info["moe_intermediate_size"],
            info["shared_expert_intermediate_size"]) == ("qwen2_moe", 4, 2, 16, 20)
    from safetensors.torch import save_file

    model = build("qwen2_moe", vocab_size=160, max_position_embeddings=128)
    save_file(moe_scores(model), tmp_path / "s.safetensors")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(moe_teacher), "--scores", str(tmp_path / "s.safetensors"),
                 "--target", "experts=3,expert_ffn=8", "--out", str(out), "--streaming"]) == 0
    capsys.readouterr()
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["num_experts"], info["num_experts_per_tok"], info["moe_intermediate_size"]) == (3, 2, 8)
    for target, msg in (("experts=7", "experts=7 is larger than the model's 4 experts per MoE layer"),
                        ("expert_ffn=99", "expert_ffn=99 is larger than the model's 16 neurons per expert")):
        assert main(["prune", "--model", str(moe_teacher), "--scores", str(tmp_path / "s.safetensors"),
                     "--target", target, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1


def test_streaming_reads_stacked_expert_tensors_too(tmp_path):
    """A checkpoint holding the in-memory (stacked, 3-D) expert names streams to the same model."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "per_expert")
    (tmp_path / "stacked").mkdir()
    (tmp_path / "stacked" / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(v.dim() == 3 for v in sd.values())
    save_file(sd, tmp_path / "stacked" / "model.safetensors", metadata={"format": "pt"})
    plan = make_plan(model, moe_scores(model), "experts=2,expert_ffn=12,hidden=24")
    x = tokens(model.config.vocab_size)
    logits = []
    for name in ("per_expert", "stacked"):
        out = prune_checkpoint(tmp_path / name, plan, tmp_path / f"out_{name}", progress=False)
        with torch.no_grad():
            logits.append(AutoModelForCausalLM.from_pretrained(out).eval()(x).logits)
    apply_plan(model, plan)
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(logits[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(logits[1], expected, rtol=0, atol=0)


def test_no_moe_attribute_names_outside_models():
    """MoE support lives in models/moe.py (and the family files): no stage names the HF MoE
    modules, config keys or on-disk expert names."""
    from tests.models.test_families import _code_names

    names = {"shared_expert", "shared_expert_gate", "mlp_only_layers", "decoder_sparse_step", "num_local_experts",
             "norm_topk_prob", "block_sparse_moe", "w1", "w2", "w3", "gate_up_proj", "top_k_index",
             "shared_expert_intermediate_size"}
    pkg = ROOT / "minitron_fast"
    offenders = {str(p.relative_to(pkg)): sorted(_code_names(p) & names) for p in sorted(pkg.rglob("*.py"))
                 if p.relative_to(pkg).parts[0] != "models" and _code_names(p) & names}
    assert not offenders, f"MoE names outside minitron_fast/models/: {offenders}"
    assert {"shared_expert", "mlp_only_layers", "gate_up_proj"} <= _code_names(pkg / "models" / "moe.py")


def test_params_budget_on_the_experts_axis():
    from minitron_fast.artifacts.targets import target_geometry
    from minitron_fast.models import view_class_for_config

    model = build("mixtral")
    cfg = model.config
    view_cls = view_class_for_config(cfg)
    three = view_cls.count_params(cfg, view_cls.geometry_of(cfg).replace(num_experts=3))["total"]
    geo = target_geometry(cfg, f"params={three}", budget_axes="experts")
    assert (geo.num_experts, geo.num_experts_per_tok, geo.hidden_size) == (3, 2, 32)
    assert target_geometry(cfg, f"params={three - 1}", budget_axes="experts").num_experts == 2
    assert target_geometry(cfg, "params=0.999x", budget_axes="experts").num_experts == 3  # a fraction of the source
    # Mixtral's FFN is its experts' width: ffn= and expert_ffn= are one axis
    assert target_geometry(cfg, "ffn=12") == target_geometry(cfg, "expert_ffn=12")
    assert target_geometry(cfg, "ffn=12").moe_intermediate_size == 12
    from transformers import LlamaConfig

    with pytest.raises(TargetError, match="budget axes 'experts' apply to mixture-of-experts models only"):
        target_geometry(LlamaConfig(**{**COMMON, "intermediate_size": 16}), "params=0.5x", budget_axes="experts")


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_heads_and_dense_layer_neurons_equal_zeroed_units(family):
    """Attention heads of every layer and the neurons of the dense layers among MoE layers."""
    model = f64(build(family))
    view = get_view(model)
    geo = view.geometry()
    plan = make_plan(model, moe_scores(model), "heads=2,ffn=17")
    ref = f64(type(model)(model.config)).eval()
    ref.load_state_dict(model.state_dict())
    hd = geo.head_dim
    with torch.no_grad():
        for i, lv in enumerate(get_view(ref).layers):
            for h in set(range(geo.num_attention_heads)) - set(plan.heads[i]):
                lv.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            if lv.moe is None:
                lv.down_proj.weight[:, sorted(set(range(geo.intermediate_size)) - set(plan.neurons[i]))] = 0
    x = tokens(geo.vocab_size)
    with torch.no_grad():
        expected = ref(x).logits
        apply_plan(model, plan)
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert get_view(model).param_counts()["total"] == type(view).count_params(model.config)["total"]
