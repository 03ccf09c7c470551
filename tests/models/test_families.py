"""The families beyond Llama (Qwen3, Gemma 2/3, Phi-3): what the shared pruning tests
(test_prune.py, over every TINY_BUILDERS entry) cannot see on their own.

- Gemma's hidden pruning keeps the embedding scale, tied or untied, and equals the zeroed-channel
  simulation (an independent derivation of the same model);
- a dropped layer equals a skipped layer while every kept layer keeps its own attention type
  (sliding or global), through the config's layer_types and max_window_layers, in memory and
  after export and reload;
- fused projections are sliced block by block; per-head norms are left whole;
- ``info`` reports each family; no module outside ``models/`` names a family's attributes.
"""
from __future__ import annotations

import ast
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from minitron_fast.importance.simulate import zero_channels
from minitron_fast.models import get_view
from minitron_fast.prune import apply_plan, make_plan, prune_checkpoint
from tests import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3"]
# The reloaded weights are bit-equal to the in-place ones (test_prune.py compares fp32 logits with
# atol=0); in fp64 a matmul over a freshly mapped safetensors buffer may take another SIMD path
# than over the in-place buffer and differ in the last bit (measured: 1.1e-16 on Gemma's lm_head
# with identical inputs and weights).
FP64_RELOAD_ATOL = 1e-13


def _scores(geo, *, least_important_layer=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = geo.num_hidden_layers
    s = {"channels": torch.rand(geo.hidden_size, generator=g), "depth.block_importance": torch.rand(L, generator=g) + 1}
    if least_important_layer is not None:
        s["depth.block_importance"][least_important_layer] = 0.0
    for i in range(L):
        s[f"layers.{i}.heads"] = torch.rand(geo.num_attention_heads, generator=g)
        s[f"layers.{i}.kv_groups"] = torch.rand(geo.num_key_value_heads, generator=g)
        s[f"layers.{i}.neurons"] = torch.rand(geo.intermediate_size, generator=g)
    return s


def _ids(vocab, T=11):  # longer than the tiny models' sliding window (4): sliding layers differ from global ones
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(3))


# -- Gemma: the embedding scale under hidden pruning ---------------------------------------------------

@pytest.mark.parametrize("name,tied", [("gemma2", True), ("gemma3", True), ("gemma2", False)],
                         ids=["gemma2-tied", "gemma3-tied", "gemma2-untied"])
def test_gemma_hidden_pruning_keeps_embedding_scale(tiny_builders, tmp_path, name, tied):
    model = tiny_builders[name](tie_word_embeddings=tied).double()
    view = get_view(model)
    geo = view.geometry()
    plan = make_plan(model, _scores(geo), {"hidden": 48})
    kept = torch.tensor(plan.hidden)
    ids = _ids(geo.vocab_size)
    with torch.no_grad():
        want_embed = view.embed_tokens(ids)[..., kept]  # original kept channels * sqrt(64)
        sim = copy.deepcopy(model)
        zero_channels(sim, plan.hidden)  # the same model, built by zeroing: independent of the pruner
        want = sim(ids).logits
    src = tmp_path / "src"
    model.save_pretrained(src)
    apply_plan(model, plan)
    view = get_view(model)
    with torch.no_grad():
        assert float(view.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)
        torch.testing.assert_close(view.embed_tokens(ids), want_embed, rtol=0, atol=1e-12)  # times sqrt(48)
        got = model(ids).logits
    assert view.tied == tied
    # Gemma's RMSNorm computes in fp32 even in an fp64 model (x.float()), so the two derivations
    # agree to fp32 rounding; a missed rescale would be off by sqrt(64/48) = 1.15x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # streaming reads and rescales the same tensors: stock transformers reloads the same logits
    out = prune_checkpoint(src, plan, tmp_path / "out", streaming=True, progress=False)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, got, rtol=0, atol=FP64_RELOAD_ATOL)


# -- depth: each kept layer keeps its own attention type -------------------------------------------------

@pytest.mark.parametrize("name,drop", [("qwen3", 0), ("gemma2", 0), ("gemma3", 1)],
                         ids=["qwen3-drop-full", "gemma2-drop-sliding", "gemma3-drop-global"])
def test_dropped_layer_keeps_each_layer_type(tiny_builders, tmp_path, name, drop):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_builders[name]().double()
    view = get_view(model)
    geo = view.geometry()
    types = list(model.config.layer_types)
    assert len(set(types)) == 2  # the builder mixes sliding and global layers
    ids = _ids(geo.vocab_size)

    def skip(module, args, kwargs, output):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    h = view.layers[drop].module.register_forward_hook(skip, with_kwargs=True)
    with torch.no_grad():
        expected = model(ids).logits
    h.remove()
    src = tmp_path / "src"
    model.save_pretrained(src)
    plan = make_plan(model, _scores(geo, least_important_layer=drop), {"layers": geo.num_hidden_layers - 1},
                     depth_mode="top")
    assert drop not in plan.layers
    kept_types = [types[i] for i in plan.layers]
    apply_plan(model, plan)
    view = get_view(model)
    assert list(model.config.layer_types) == kept_types == view.attn_kinds
    window = model.config.sliding_window
    for lv in view.layers:  # each attention module still runs its own type
        assert lv.attn.sliding_window == (window if lv.attn_kind == "sliding_attention" else None)
    if name == "qwen3":  # full layers below max_window_layers, sliding above: the boundary moves with them
        assert model.config.max_window_layers == sum(1 for i in plan.layers if i < 1) == 0
        regenerated = type(model.config)(**{k: v for k, v in model.config.to_dict().items() if k != "layer_types"})
        assert regenerated.layer_types == kept_types
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-10)
    out = prune_checkpoint(src, plan, tmp_path / "out", streaming=True, progress=False)
    assert AutoConfig.from_pretrained(out).layer_types == kept_types
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=FP64_RELOAD_ATOL)
    prompt = ids[:1, :6]  # decoding past the window: the sliding cache must agree with no cache
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(prompt, use_cache=True, **kw), reloaded.generate(prompt, use_cache=False, **kw))


# -- fused projections and per-head norms ----------------------------------------------------------------

def test_phi3_fused_projections_sliced_block_by_block(tiny_builders):
    model = tiny_builders["phi3"]()
    view = get_view(model)
    geo = view.geometry()
    plan = make_plan(model, _scores(geo), {"heads": 2, "kv_heads": 1, "ffn": 64, "hidden": 56})
    hd = geo.head_dim
    before = [[w.clone() for w in (*lv.qkv_weights(), *lv.gate_up_weights())] for lv in view.layers]
    apply_plan(model, plan)
    h = torch.tensor(plan.hidden)
    for i, lv in zip(plan.layers, get_view(model).layers):
        q, k, v, gate, up = before[i]
        qr = torch.tensor([x * hd + d for x in plan.heads[i] for d in range(hd)])
        kr = torch.tensor([x * hd + d for x in plan.kv_heads[i] for d in range(hd)])
        n = torch.tensor(plan.neurons[i])
        for got, want in zip((*lv.qkv_weights(), *lv.gate_up_weights()),
                             (q[qr][:, h], k[kr][:, h], v[kr][:, h], gate[n][:, h], up[n][:, h])):
            assert torch.equal(got, want)
        assert lv.qkv_proj.weight.shape == ((2 + 2 * 1) * hd, 56) and lv.gate_up_proj.weight.shape == (128, 56)
    assert model.config.head_dim == hd  # Phi3Config has no head_dim field; the pruned config writes one


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_per_head_norms_are_shared_and_kept_whole(tiny_builders, name):
    model = tiny_builders[name]()
    view = get_view(model)
    geo = view.geometry()
    before = [[n.weight.clone() for n in lv.head_norms] for lv in view.layers]
    plan = make_plan(model, _scores(geo), {"heads": 2, "kv_heads": 1, "hidden": 40})
    apply_plan(model, plan)
    for i, lv in zip(plan.layers, get_view(model).layers):
        assert [n.weight.shape for n in lv.head_norms] == [(geo.head_dim,)] * 2
        assert all(torch.equal(n.weight, w) for n, w in zip(lv.head_norms, before[i]))
        assert all(n.weight.shape == (40,) for n in lv.hidden_norms())


# -- info and the cost of a family -------------------------------------------------------------------------

def test_info_reports_each_family(tiny_builders, tmp_path, capsys):
    from minitron_fast.cli import main

    expect = {"qwen3": {"head_norms": 2}, "gemma2": {"final_logit_softcap": 3.0, "attn_logit_softcap": 5.0,
                                                       "embed_scale": 8.0},
              "gemma3": {"head_norms": 2, "embed_scale": 8.0}, "phi3": {"fused": "qkv_proj,gate_up_proj"}}
    for name in NEW_FAMILIES:
        m = tiny_builders[name]()
        m.save_pretrained(tmp_path / name)
        assert main(["info", "--model", str(tmp_path / name), "--json"]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["family"] == name and rec["num_parameters"] == m.num_parameters()
        assert rec["head_dim"] == get_view(m).head_dim
        for k, v in expect[name].items():
            assert rec[k] == v, (name, k)
        if name != "phi3":
            assert rec["layer_types"] == "full_attention x1, sliding_attention x2"


# HF attribute and config names that only an adapter may use (the view's own vocabulary, e.g.
# LayerView.o_proj or .qkv_proj, is what stages use instead).
FAMILY_NAMES = {
    "self_attn", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
    "post_feedforward_layernorm", "q_norm", "k_norm", "activation_fn", "variance_epsilon", "embed_scale",
    "scalar_embed_scale", "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar",
    "layer_types", "max_window_layers", "use_sliding_window", "sliding_window", "block_sparse_moe",
    "num_key_value_groups", "rotary_emb", "attention_type", "hidden_activation", "hidden_act",
}


def _code_names(path: Path) -> set[str]:
    """Attribute names and string constants used as code (docstrings excluded)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.update(part for part in node.value.replace(".", " ").split())
    return found


def test_no_family_attribute_names_outside_models():
    pkg = ROOT / "minitron_fast"
    offenders = {}
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if rel.parts[0] == "models":
            continue
        bad = _code_names(path) & FAMILY_NAMES
        if bad:
            offenders[str(rel)] = sorted(bad)
    assert not offenders, f"family-specific names outside minitron_fast/models/: {offenders}"
    # and the scan does see such names where they belong
    assert {"q_norm", "embed_scale", "activation_fn"} <= set().union(
        *(_code_names(p) for p in (pkg / "models").glob("*.py")))


# -- every stage on every new family ---------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_importance_plan_prune_retrain_evaluate(tiny_builders, name):
    """The stages in memory on each family: importance scores -> plan -> in-place surgery ->
    search's KD retraining (full and LoRA on the view's projection names) -> evaluation."""
    from minitron_fast.evaluate.perplexity import lm_loss
    from minitron_fast.importance.collect import collect_importance
    from minitron_fast.search.run import retrain, teacher_targets

    teacher = tiny_builders[name]()
    geo = get_view(teacher).geometry()
    calib = torch.randint(0, geo.vocab_size, (4, 9), generator=torch.Generator().manual_seed(5))
    scores = collect_importance(teacher, calib, progress=False, impl="torch")
    plan = make_plan(teacher, scores.to_tensors(), {"hidden": geo.hidden_size - 16, "ffn": 48, "heads": 2,
                                                    "kv_heads": 1, "layers": 2}, depth_mode="top")
    student = apply_plan(copy.deepcopy(teacher), plan)
    assert get_view(student).geometry() == plan.target_geometry()
    batches = [calib[:2]] * 6
    targets = teacher_targets(teacher, batches)  # hidden states and head, for the one KD step
    trained, losses = retrain(copy.deepcopy(student), batches, targets, lr=2e-3)
    assert losses[-1] < losses[0]  # the same batch six times: KD to the teacher must fall
    lora, lora_losses = retrain(copy.deepcopy(student), batches[:2], targets[:2], lr=1e-2, lora_rank=2)
    assert all(torch.isfinite(torch.tensor(lora_losses)))
    assert type(lora) is type(student)  # merged back into a stock model
    targets_named = get_view(student).lora_targets()
    assert ("qkv_proj" in targets_named) == (name == "phi3")
    with torch.no_grad():  # evaluation == the NLL of the model's own (softcapped) logits
        logits = trained(calib).logits[:, :-1].double()
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), calib[:, 1:].reshape(-1))
    assert lm_loss(trained, calib, progress=False) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.slow
def test_distill_each_family_single_process(tiny_builders, tmp_path, demo_model_dir):
    """The distillation trainer (DeepSpeed, ZeRO-1, one process) on each family: a student pruned
    from the teacher by the streaming pruner trains by logit KD, its loss falls, and its exported
    checkpoint reloads in stock transformers. One subprocess runs all four (a process start costs
    ~10 s)."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from minitron_fast.models.export import copy_tokenizer_files
    from tests.distill.test_distill import WORKER, _env, _metrics, _results

    runs = []
    for name in NEW_FAMILIES:
        teacher = tiny_builders[name](vocab_size=49152, initializer_range=0.2)  # SmolLM2 tokenizer; peaked logits
        tdir = tmp_path / name / "teacher"
        teacher.save_pretrained(tdir)
        copy_tokenizer_files(demo_model_dir, tdir)
        geo = get_view(teacher).geometry()
        plan = make_plan(teacher, _scores(geo), {"hidden": geo.hidden_size - 16, "ffn": 48, "layers": 2},
                         depth_mode="top")
        prune_checkpoint(tdir, plan, tmp_path / name / "student", streaming=True, progress=False)
        o = {"teacher": tdir, "student": tmp_path / name / "student", "out": tmp_path / name / "run", "steps": 6,
             "micro_batch_size": 2, "grad_accum": 1, "data.seq_len": 16, "data.max_blocks": 16,
             "data.eval_blocks": 2, "eval_every": 6, "save_every": 6, "lr": 3e-3, "warmup_steps": 0,
             "schedule": "constant", "export": True, "threads": 1, "ds.zero_stage": 1}
        runs.append({"name": name, "overrides": [f"{k}={v}" for k, v in o.items()]})
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    proc = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "runs.json")], env=_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    res = _results(proc.stdout)
    assert proc.returncode == 0 and len(res) == len(runs), proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in NEW_FAMILIES:
        assert res[name]["ok"], res[name]
        losses = [r["loss"] for r in _metrics(tmp_path / name / "run") if "loss" in r]
        assert len(losses) == 6 and all(map(math.isfinite, losses)) and min(losses[-2:]) < losses[0], (name, losses)
        final = AutoModelForCausalLM.from_pretrained(tmp_path / name / "run" / "final")
        assert get_view(final).family == name
