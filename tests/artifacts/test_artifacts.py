"""minitron_fast.artifacts: one owner per file contract (the scores file, the prune plan, the one
target/budget grammar), below the stages."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import minitron_fast
from minitron_fast.artifacts import scores as scores_mod
from minitron_fast.artifacts.plan import Plan, PlanError, validate_plan
from minitron_fast.artifacts.scores import (ImportanceScores, ScoresFileError, load_scores, save_scores,
                                            scores_tensors)
from minitron_fast.artifacts.targets import Budget, TargetError, parse_budget, parse_target, target_geometry
from minitron_fast.models import get_view, view_class_for_config
from minitron_fast.pipeline.recipe import RecipeError, check_against_teacher, load_recipe

ARTIFACTS = Path(minitron_fast.__file__).parent / "artifacts"
STAGES = ("importance", "search", "prune", "distill", "evaluate", "export", "pipeline", "commands", "cli",
          "teacher_logits")


def test_artifacts_import_no_stage():
    """Layering: artifacts may import models (and io/errors), never a stage."""
    for f in ARTIFACTS.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                parts = n.split(".")
                assert not (parts[0] == "minitron_fast" and len(parts) > 1 and parts[1] in STAGES), (f.name, n)


# -- the one target/budget grammar ------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    pytest.param("hidden=3072,ffn=9216", {"hidden": 3072, "ffn": 9216}, id="width"),
    pytest.param(" layers = 16 ", {"layers": 16}, id="spaces"),
    pytest.param("num_key_value_heads=4", {"kv_heads": 4}, id="alias"),
    pytest.param("params=90M", {"params": Budget(count=90_000_000)}, id="suffix-M"),
    pytest.param("params=4.5B", {"params": Budget(count=4_500_000_000)}, id="suffix-B"),
    pytest.param("params=4.5e9", {"params": Budget(count=4_500_000_000)}, id="exp"),
    pytest.param("params=0.5x,layers=20", {"params": Budget(fraction=0.5), "layers": 20}, id="fraction"),
    pytest.param({"hidden": 48, "heads": 2}, {"hidden": 48, "heads": 2}, id="dict"),
])
def test_target_grammar_accepts(text, want):
    assert parse_target(text) == want


@pytest.mark.parametrize("text, match", [
    pytest.param("params=1.5x", r"fraction of the source must lie in \(0, 1\]", id="fraction>1"),
    pytest.param("params=0x", r"fraction", id="fraction0"),
    pytest.param("params=lots", r"not a parameter count", id="nan-budget"),
    pytest.param("params=-5M", r"positive parameter count", id="negative-budget"),
    pytest.param(",,,", r"empty entry", id="only-commas"),
    pytest.param("hidden=3072,,ffn=9216", r"empty entry", id="double-comma"),
    pytest.param("hidden=3072,", r"empty entry", id="trailing-comma"),
    pytest.param("hidden=3072,hidden=2048", r"'hidden' is given twice", id="duplicate"),
    pytest.param("hidden=3072,hidden_size=2048", r"'hidden' is given twice", id="duplicate-alias"),
    pytest.param("width=3", r"unknown target key 'width'", id="unknown"),
    pytest.param("hidden=big", r"not an integer", id="not-int"),
    pytest.param("hidden=2.5", r"not an integer", id="float"),
    pytest.param("ffn=0", r"positive integer", id="zero"),
    pytest.param("hidden", r"not key=value", id="no-equals"),
])
def test_target_grammar_rejects_everywhere(text, match):
    """One grammar: what prune rejects, the recipe rejects at load, naming the key."""
    with pytest.raises(TargetError, match=match):
        parse_target(text)
    with pytest.raises(RecipeError, match=r"^prune\.target: .*" + match) as e:
        load_recipe("demo", [f"prune.target={text}"])
    assert "\n" not in str(e.value)


def test_budget_grammar_shared_by_search_recipe_and_cli(capsys):
    assert parse_budget("90M", 1) == 90_000_000 and parse_budget("0.25x", 1000) == 250
    assert load_recipe("demo", ["search.enabled=true", "search.params=90M"]).search.params == "90M"
    with pytest.raises(RecipeError, match=r"^search\.params: budget '1\.5x'"):
        load_recipe("demo", ["search.params=1.5x"])
    from minitron_fast.cli import main

    assert main(["search", "--model", "demo", "--scores", "s", "--params", "1.5x"]) == 2
    assert capsys.readouterr().err.startswith("error: --params: budget '1.5x'")


def test_params_target_resolves_in_prune(tiny_builders):
    """``params=90M`` passed the recipe and failed prune before; now both read one grammar."""
    cfg = tiny_builders["llama"]().config
    vc = view_class_for_config(cfg)
    full = vc.count_params(cfg)["total"]
    n = int(full * 0.7)
    a = target_geometry(cfg, f"params={n / 1e3}k")
    b = target_geometry(cfg, "params=0.7x")
    assert a == b and vc.count_params(cfg, a)["total"] <= n


def test_recipe_target_checked_against_teacher_before_any_stage(tiny_builders):
    cfg = tiny_builders["llama"]().config  # hidden 64, 3 layers
    r = load_recipe("demo", ["prune.target=hidden=4096"])
    with pytest.raises(RecipeError, match=r"^prune\.target=hidden=4096: target hidden=4096 is larger"):
        check_against_teacher(r, cfg)
    r = load_recipe("demo", ["prune.target=layers=1", "prune.depth_metric=lm_loss_block",
                             "importance.depth_lm_loss=true", "importance.depth_block=1"])
    with pytest.raises(RecipeError, match=r"drops 2 layers but importance\.depth_block=1"):
        check_against_teacher(r, cfg)
    check_against_teacher(load_recipe("demo", ["prune.target=layers=1", "prune.depth_metric=lm_loss_block",
                                               "importance.depth_lm_loss=true", "importance.depth_block=2"]), cfg)
    r = load_recipe("demo", ["search.enabled=true", "search.params=1e12"])
    with pytest.raises(RecipeError, match=r"not below the teacher's"):
        check_against_teacher(r, cfg)


# -- the scores file ----------------------------------------------------------------------------------

def _scores(L=3, heads=4, kv=2, ffn=6, hidden=8):
    g = torch.Generator().manual_seed(1)
    r = lambda n: torch.rand(n, generator=g)  # noqa: E731
    return ImportanceScores(heads=[r(heads) for _ in range(L)], kv_groups=[r(kv) for _ in range(L)],
                            neurons=[r(ffn) for _ in range(L)], layer_channels=[r(hidden) for _ in range(L)],
                            channels=r(hidden), block_importance=r(L), meta={"source_model": "x"})


def test_one_reader_of_the_scores_file(tmp_path, monkeypatch):
    """``load_scores`` (whole file, validated) and ``scores_tensors`` (what prune/search read) both
    open the file through ``read_scores_file``; the public names are the artifact's."""
    p = save_scores(_scores(), tmp_path / "s.safetensors")
    calls = []
    real = scores_mod.read_scores_file
    monkeypatch.setattr(scores_mod, "read_scores_file", lambda path: calls.append(path) or real(path))
    s = load_scores(p)
    t, info = scores_tensors(p)
    assert len(calls) == 2
    assert s.to_tensors().keys() == t.keys()
    assert all(torch.equal(s.to_tensors()[k], t[k]) for k in t)
    assert info["scores_file"] == str(p) and len(info["scores_sha256"]) == 64 and info["scores_metadata"]["format"] == 1
    assert minitron_fast.load_scores is load_scores and minitron_fast.save_scores is save_scores
    import minitron_fast.prune as prune

    assert not hasattr(prune, "load_scores")  # the second reader with another return type is gone
    t2, info2 = scores_tensors(s)  # an in-memory ImportanceScores, as compute_importance returns
    assert t2.keys() == t.keys() and info2 == {"scores_file": None}


def test_scores_file_format_checks(tmp_path):
    from safetensors.torch import save_file

    raw = _scores().to_tensors()
    bare = tmp_path / "bare.safetensors"
    save_file(raw, str(bare))
    with pytest.raises(ScoresFileError, match="no minitron_fast metadata"):
        load_scores(bare)
    assert scores_tensors(bare)[0].keys() == raw.keys()  # hand-made scores still prune
    future = tmp_path / "future.safetensors"
    save_file(raw, str(future), metadata={"minitron_fast": json.dumps({"format": 99})})
    for read in (load_scores, scores_tensors):
        with pytest.raises(ScoresFileError, match="scores format 99, this minitron_fast reads 1"):
            read(future)
    with pytest.raises(ScoresFileError, match="does not exist"):
        scores_tensors(tmp_path / "none.safetensors")


# -- the prune plan -------------------------------------------------------------------------------------

def test_plan_file_round_trip_and_validation(tiny_builders, tmp_path):
    from minitron_fast.prune import Plan as PrunePlan
    from minitron_fast.prune import make_plan

    assert PrunePlan is Plan
    model = tiny_builders["llama"]()
    geo = get_view(model).geometry()
    s = _scores(L=geo.num_hidden_layers, heads=geo.num_attention_heads, kv=geo.num_key_value_heads,
                ffn=geo.intermediate_size, hidden=geo.hidden_size)
    plan = make_plan(model, s, {"ffn": geo.intermediate_size // 2, "layers": geo.num_hidden_layers - 1})
    back = Plan.load(plan.save(tmp_path / "plan.json"))
    assert back == plan and validate_plan(back, model.config) == plan.target_geometry()
    bad = json.loads((tmp_path / "plan.json").read_text())
    bad["kept"]["layers"] = bad["kept"]["layers"][::-1]
    with pytest.raises(PlanError, match="strictly increasing"):
        validate_plan(Plan.from_dict(bad), model.config)
    (tmp_path / "v2.json").write_text(json.dumps(dict(bad, version=2)))
    with pytest.raises(PlanError, match="plan version 2 is not supported"):
        Plan.load(tmp_path / "v2.json")
