"""Search end to end on a tiny model: candidates pruned, briefly retrained by KD (full and LoRA),
ranked by held-out loss; the winner's plan validates against the teacher."""
from __future__ import annotations

import json

import pytest
import torch

from bench.common import make_tiny_teacher
from minitron_fast.models import view_class_for_config
from minitron_fast.search import SearchConfig, SearchError, run_search


@pytest.fixture(scope="module")
def teacher_and_scores(tmp_path_factory):
    from minitron_fast.data import token_blocks
    from minitron_fast.importance import compute_importance, save_scores
    from minitron_fast.models.loading import load_model, load_tokenizer

    d = tmp_path_factory.mktemp("search")
    teacher = make_tiny_teacher(d / "teacher")
    calib = token_blocks(load_tokenizer(teacher), "demo", "calib", 32, max_blocks=8)
    scores = compute_importance(load_model(teacher), calib, progress=False)
    save_scores(scores, d / "scores.safetensors")
    return teacher, d / "scores.safetensors"


def test_search_ranks_retrained_candidates_and_writes_plan(teacher_and_scores, tmp_path):
    from minitron_fast.models.loading import load_config
    from minitron_fast.prune import Plan, validate_plan

    teacher, scores = teacher_and_scores
    config = load_config(teacher)
    full = view_class_for_config(config).count_params(config)["total"]
    budget = int(0.75 * full)
    logs = []
    cfg = SearchConfig(tolerance=0.1, kinds=["width", "depth"], max_candidates=2, retrain_steps=3, micro_batch_size=2,
                       lr=1e-3, eval_blocks=2)
    res = run_search(str(teacher), scores, cfg, budget=budget, out_dir=tmp_path, seq_len=32, progress=False,
                     log=logs.append)
    cands = res["candidates"]
    assert len(cands) >= 2 and {c["kind"] for c in cands} <= {"width", "depth"}
    losses = [c["loss"] for c in cands]
    assert losses == sorted(losses) and [c["rank"] for c in cands] == list(range(1, len(cands) + 1))
    for c in cands:
        assert budget * 0.9 <= c["params"] <= budget
        assert torch.isfinite(torch.tensor([c["loss"], c["loss_pruned"]])).all()
        assert c["retrain_loss_first"] is not None
    plan = Plan.load(res["plan"])
    geo = validate_plan(plan, config)
    assert geo.as_dict() == {k: res["winner"][k] for k in geo.as_dict()}
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["winner"]["name"] == res["winner"]["name"] and "loss retrained" in (tmp_path / "table.txt").read_text()
    assert any("winner:" in m for m in logs)


def test_search_prunes_kv_group_candidates_by_default(teacher_and_scores):
    """KV groups are a default search axis: on the GQA teacher (4 query / 2 KV heads) the default
    kinds give candidates with one KV head, each of which prune plans from its target and cuts; with
    ``kv`` left out of the kinds every candidate keeps both KV heads."""
    import copy

    from minitron_fast.models import get_view
    from minitron_fast.models.loading import load_config, load_model
    from minitron_fast.prune import apply_plan, make_plan, validate_plan

    teacher, scores = teacher_and_scores
    config = load_config(teacher)
    budget = int(0.75 * view_class_for_config(config).count_params(config)["total"])
    kw = dict(tolerance=0.1, max_candidates=1, retrain_steps=0, eval_blocks=1)
    res = run_search(str(teacher), scores, SearchConfig(**kw), budget=budget, seq_len=32, progress=False,
                     log=lambda s: None)
    kv = [c for c in res["candidates"] if c["kind"] == "kv"]
    assert len(kv) == 1 and kv[0]["num_key_value_heads"] == 1 and "kv_heads=1" in kv[0]["target"]
    assert torch.isfinite(torch.tensor(kv[0]["loss_pruned"]))  # the search pruned and evaluated it
    model = load_model(teacher)
    for c in kv:
        plan = make_plan(config, scores, c["target"])  # prune's own grammar and planner
        geo = validate_plan(plan, config)
        assert geo.as_dict() == {k: c[k] for k in geo.as_dict()}
        view = get_view(apply_plan(copy.deepcopy(model), plan))
        assert view.geometry() == geo
        assert view.layers[0].k_proj.weight.shape == (geo.head_dim, geo.hidden_size)  # one KV head's rows
    res = run_search(str(teacher), scores, SearchConfig(kinds=["width", "depth", "mixed"], **kw), budget=budget,
                     seq_len=32, progress=False, log=lambda s: None)
    assert res["candidates"] and {c["num_key_value_heads"] for c in res["candidates"]} == {2}


def test_search_with_lora_retraining(teacher_and_scores, tmp_path):
    pytest.importorskip("peft")
    teacher, scores = teacher_and_scores
    from minitron_fast.models.loading import load_config

    config = load_config(teacher)
    full = view_class_for_config(config).count_params(config)["total"]
    cfg = SearchConfig(tolerance=0.1, kinds=["width"], max_candidates=1, retrain_steps=2, micro_batch_size=2, lr=1e-3,
                       lora_rank=2, eval_blocks=2)
    res = run_search(str(teacher), scores, cfg, budget=int(0.75 * full), seq_len=32, progress=False,
                     log=lambda s: None)
    (c,) = res["candidates"]
    assert c["loss"] != c["loss_pruned"]  # LoRA retraining changed the merged model
    assert res["plan"] is None  # no out_dir: nothing written


def test_search_cli_and_impossible_budget(teacher_and_scores, tmp_path, capsys):
    from minitron_fast.cli import main

    teacher, scores = teacher_and_scores
    out = tmp_path / "s"
    assert main(["search", "--model", str(teacher), "--scores", str(scores), "--params", "0.8x", "--out", str(out),
                 "--retrain-tokens", "128", "--micro-batch-size", "2", "--seq-len", "32", "--eval-blocks", "2",
                 "--max-candidates", "1", "--kinds", "width"]) == 0
    printed = capsys.readouterr().out
    assert "winner:" in printed and (out / "plan.json").is_file()
    assert json.loads((out / "search.json").read_text())["retrain_objective"]["divergence"] == "forward_kl"
    # the retraining objective's flags reach every KD step; a bad one is one line before anything loads
    out2 = tmp_path / "s2"
    assert main(["search", "--model", str(teacher), "--scores", str(scores), "--params", "0.8x", "--out", str(out2),
                 "--retrain-steps", "1", "--micro-batch-size", "2", "--seq-len", "32", "--eval-blocks", "1",
                 "--max-candidates", "1", "--kinds", "width", "--divergence", "jsd", "--beta", "0.25",
                 "--temperature", "2", "--lm-weight", "0.5", "--t2-scaling"]) == 0
    capsys.readouterr()
    assert json.loads((out2 / "search.json").read_text())["retrain_objective"] == {
        "kd_weight": 1.0, "lm_weight": 0.5, "divergence": "jsd", "beta": 0.25,
        "temperature": 2.0, "t2_scaling": True}
    for bad, msg in ((["--divergence", "kl"], "retraining objective: KDSpec.loss: divergence"),
                     (["--kd-weight", "0"], "retraining objective: kd_weight 0.0 and lm_weight 0.0 must be >= 0, one of them positive")):
        assert main(["search", "--model", str(teacher), "--scores", str(scores), "--params", "0.8x",
                     "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert main(["search", "--model", str(teacher), "--scores", str(scores), "--params", "10",
                 "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no width/depth/mixed/kv candidate") and err.count("\n") == 1  # before any loading
    with pytest.raises(SearchError):
        run_search(str(teacher), scores, SearchConfig(), budget=10**12, progress=False, log=lambda s: None)


def test_each_candidate_holds_only_its_own_size_while_it_retrains(teacher_and_scores, monkeypatch):
    """Compaction re-views the source's storage (on CUDA it frees nothing), so a candidate pruned
    from a deepcopy of the teacher held teacher-sized storage through its whole retraining. Each
    candidate's parameters must own storages of their own size."""
    import minitron_fast.search.run as search_run
    from minitron_fast.models.loading import load_config

    teacher, scores = teacher_and_scores
    config = load_config(teacher)
    full = view_class_for_config(config).count_params(config)["total"]
    seen = []
    real = search_run.retrain

    def retrain(student, *a, **k):
        held = sum(p.untyped_storage().nbytes() for p in student.parameters())
        own = sum(p.numel() * p.element_size() for p in student.parameters())
        seen.append((held, own))
        return real(student, *a, **k)

    monkeypatch.setattr(search_run, "retrain", retrain)
    run_search(str(teacher), scores, SearchConfig(tolerance=0.1, kinds=["width", "depth"], max_candidates=1,
                                                  retrain_steps=1, micro_batch_size=2, eval_blocks=2),
               budget=int(0.75 * full), seq_len=32, progress=False, log=lambda s: None)
    assert seen and all(held == own for held, own in seen), seen


def test_shrink_storage_moves_only_oversized_tensors_and_keeps_ties():
    from minitron_fast.ops.compact import compact_, shrink_storage_

    lin = torch.nn.Linear(8, 6)
    emb = torch.nn.Embedding(6, 8)
    m = torch.nn.ModuleDict({"lin": lin, "emb": emb})
    emb.weight = lin.weight.__class__(torch.randn(6, 8))
    m.lin.weight = m.emb.weight  # tied, one object
    ref = m.emb.weight.detach()[[0, 2, 5]].clone()
    compact_(m.emb.weight, torch.tensor([0, 2, 5]), 0, impl="torch")
    bias_ptr = m.lin.bias.data_ptr()
    shrink_storage_(m)
    assert m.lin.weight is m.emb.weight and torch.equal(m.emb.weight, ref)
    assert m.emb.weight.untyped_storage().nbytes() == 3 * 8 * 4
    assert m.lin.bias.data_ptr() == bias_ptr  # already its own size: untouched


def test_search_retrains_with_the_objective_it_is_given(teacher_and_scores, tmp_path, monkeypatch):
    """``kd``: every retraining step runs that objective (the model facts added), search.json
    records it, and the default stays forward KL at T=1; an intermediate-state weight is refused."""
    from minitron_fast.ops.kd_spec import KDSpec
    from minitron_fast.ops.kd_loss.params import KDLossOptions
    from minitron_fast.search import run as run_mod

    teacher, scores = teacher_and_scores
    seen = []
    real = run_mod.kd_step

    def spy(model, target, ids, *, spec):
        seen.append(spec)
        return real(model, target, ids, spec=spec)

    monkeypatch.setattr(run_mod, "kd_step", spy)
    cfg = SearchConfig(params="0.75x", tolerance=0.1, kinds=["width"], max_candidates=1, retrain_steps=2,
                       micro_batch_size=2, lr=1e-3, eval_blocks=1)
    kd = KDSpec(lm_weight=0.5, loss=KDLossOptions(divergence="jsd", beta=0.3, temperature=2.0))
    res = run_search(str(teacher), scores, cfg, out_dir=tmp_path, seq_len=32, progress=False, log=lambda m: None, kd=kd)
    assert len(seen) == 2 * len(res["candidates"])
    assert {(s.lm_weight, s.loss.divergence, s.loss.beta, s.loss.temperature) for s in seen} == {(0.5, "jsd", 0.3, 2.0)}
    saved = json.loads((tmp_path / "search.json").read_text())["retrain_objective"]
    assert saved == {"kd_weight": 1.0, "lm_weight": 0.5, "divergence": "jsd", "beta": 0.3,
                     "temperature": 2.0, "t2_scaling": False}
    seen.clear()
    default = run_search(str(teacher), scores, cfg, progress=False, log=lambda m: None)
    assert {(s.lm_weight, s.loss.divergence, s.loss.temperature) for s in seen} == {(0.0, "forward_kl", 1.0)}
    assert default["retrain_objective"]["divergence"] == "forward_kl"
    with pytest.raises(SearchError, match="inter_weight must be 0"):
        run_search(str(teacher), scores, cfg, progress=False, log=lambda m: None, kd=KDSpec(inter_weight=1.0))
