"""``python -m bench peers --quick`` on the tiny Llama: every budget's rows, exact budgets for our
rows, peers either run or say why, disjoint data, the JSON fields; and the parts on their own."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from bench.common import make_tiny_teacher

FIELDS = ("budget", "impl", "oneshot_ppl", "kd_ppl", "prune_s", "peak_mb", "params", "ok")


def _args(tmp_path, **kw):
    from bench import peers

    p = argparse.ArgumentParser()
    peers.add_arguments(p)
    args = p.parse_args([])
    args.quick, args.json = True, None
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run through the driver (JSON, markdown and plot written)."""
    from bench.__main__ import main

    d = tmp_path_factory.mktemp("peers")
    out = d / "peers.json"
    rc = main(["peers", "--quick", "--json", str(out), "--workdir", str(d / "work")])
    return rc, json.loads(out.read_text()), d


def test_quick_run_rows_and_fields(quick_run):
    from bench.peers import IMPLS

    rc, res, d = quick_run
    assert rc == 0
    rows = res["rows"]
    # every budget, every registered impl, once
    assert sorted((r["budget"], r["impl"]) for r in rows) == sorted(IMPLS)
    info = res["meta"]["peers"]
    assert info["data"]["disjoint"] is True
    assert {info["data"][k]["split"] for k in ("calib", "heldout", "distill")} == {"calib", "heldout", "train"}
    a, b = info["data"]["distill"]["blocks"], info["data"]["correct"]["blocks"]
    assert a[1] <= b[0]  # correction reads train blocks after the distillation blocks
    for r in rows:
        for k in FIELDS:
            assert k in r, (r["impl"], k)
        assert r["budget"] in ("W", "D", "W2")
        assert r["data_disjoint"] is True
        if r["ok"]:
            assert math.isfinite(r["oneshot_ppl"]) and math.isfinite(r["kd_ppl"]) and r["prune_s"] > 0
            assert r["peak_mb"] > 0 and r["reload_max_diff"] == 0.0
            assert r["params"] == r["budget_params"] == info["budget_params"][r["budget"]]
            assert len(r["kd_ppl_seeds"]) == 2
        else:  # a peer that could not run says why, and a row of ours always runs
            assert r["note"] and r["ran"] is False, r
            assert not r["impl"].startswith("minitron_fast")
    ours = [r for r in rows if r["impl"].startswith("minitron_fast")]
    assert {r["budget"] for r in ours} == {"W", "D", "W2"} and all(r["ok"] for r in ours)
    tp = [r for r in rows if r["impl"].startswith("torch_pruning") and r["impl"] != "torch_pruning_l2_heads"]
    assert tp and all(r["ok"] and r["version"] for r in tp)  # installed with the `peers` extra
    mo = next(r for r in rows if r["impl"] == "model_optimizer")
    assert not mo["ok"] and ("not installed: pip install nvidia-modelopt" in mo["note"] or "cannot run" in mo["note"])
    # one distillation recipe: the same tokens for every row
    assert info["kd"]["steps"] * info["kd"]["batch"] * info["kd"]["seq_len"] == info["data"]["distill"]["tokens"]
    assert (d / "peers.md").read_text().count("| W") >= 5 and (d / "peers.png").stat().st_size > 1000

    # a row whose pruned weights equal an earlier row's reuses that row's distillation runs
    for r in rows:
        if r.get("kd_reused_from"):
            src = next(x for x in rows if x["budget"] == r["budget"] and x["impl"] == r["kd_reused_from"])
            assert r["kd_ppl_seeds"] == src["kd_ppl_seeds"] and r["oneshot_ppl"] == src["oneshot_ppl"]


def test_same_weights_reuse_the_distillation_runs(quick_run, monkeypatch):
    """A row pruned again to the same weights (the seeded random layers) finds its runs in the
    work directory's cache, keyed by the weights' digest, and returns the same losses without
    training."""
    from bench import peers

    _, res, d = quick_run
    work = d / "work"
    monkeypatch.setenv("MINITRON_FAST_TOKEN_CACHE", str(work / "tokens"))
    info = res["meta"]["peers"]
    first = next(r for r in res["rows"] if (r["budget"], r["impl"]) == ("D", "random_layers"))
    import minitron_fast.distill as distill

    monkeypatch.setattr(distill, "train", lambda *a, **k: pytest.fail("trained again"))
    again = peers.row_case("D", "random_layers", str(work / "tiny_teacher"), info["targets"]["D"], str(work),
                           "demo", info["sizes"]["lm"], 0, info["seeds"], info["kd"], None)
    assert again["kd_reused_from"] == first.get("kd_reused_from", "random_layers") and again["kd_s"] == 0.0
    assert [math.exp(x) for x in again["kd_losses"]] == first["kd_ppl_seeds"]


def test_weights_digest_sees_one_changed_element(tiny_builders):
    import torch

    from bench.peers import weights_digest

    torch.manual_seed(0)
    m = tiny_builders["llama"]()
    a = weights_digest(m)
    assert weights_digest(m) == a and len(a) == 64
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 2] += 1e-7
    assert weights_digest(m) != a


def test_budgets_of_smollm2_shape():
    """The issue's budgets, on SmolLM2-135M's config (nothing loaded): W 94,701,888, D 95,573,952,
    W2 the nearest shape a Llama config can express to hidden 480 + FFN 1152 (480 is not a multiple
    of the 9 heads: 477 is the nearest below, with the FFN whose count is nearest D's)."""
    from transformers import LlamaConfig

    from bench.peers import default_targets
    from minitron_fast.artifacts.targets import target_geometry
    from minitron_fast.models import view_class_for_config

    c = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    t = default_targets(c)
    assert t == {"W": "ffn=768", "D": "layers=19", "W2": "hidden=477,ffn=1168"}
    vc = view_class_for_config(c)
    counts = {b: vc.count_params(c, target_geometry(c, s))["total"] for b, s in t.items()}
    assert counts == {"W": 94_701_888, "D": 95_573_952, "W2": 95_597_001}


def test_disjoint_ranges():
    from bench.peers import disjoint

    assert disjoint({"a": [(0, 10), (20, 30)], "b": [(10, 20)], "c": [(30, 31)]})
    assert not disjoint({"a": [(0, 10)], "b": [(9, 12)]})


def test_missing_and_crashing_peers_give_rows_with_notes(tmp_path, monkeypatch):
    """A peer that is not installed, or that raises, is a row with a one-line note, never a crash."""
    from bench import peers

    def missing(r):  # what row_case returns when the import fails
        return peers._row("W", "torch_pruning_l2", peers.IMPLS[("W", "torch_pruning_l2")], r, "ffn=8", 100, 1.0)

    r = missing({"ok": False, "note": "not installed: pip install torch-pruning"})
    assert r["note"] == "not installed: pip install torch-pruning" and not r["ok"] and r["ran"] is False
    r = missing({"ok": False, "error": "Traceback ...\nRuntimeError: shape '[9, -1]' is invalid\n"})
    assert r["note"] == "process failed: RuntimeError: shape '[9, -1]' is invalid"

    teacher = make_tiny_teacher(tmp_path / "t")
    monkeypatch.setitem(peers.IMPORT_NAMES, "torch-pruning", "no_such_module_xyz")
    (tmp_path / "w").mkdir()
    import torch

    torch.save(torch.zeros(2, 16, dtype=torch.long), tmp_path / "w" / "calib.pt")
    torch.save(torch.zeros(2, 16, dtype=torch.long), tmp_path / "w" / "heldout.pt")
    out = peers.row_case("W", "torch_pruning_l2", str(teacher), "ffn=64", str(tmp_path / "w"), "demo", 1, 0, [0],
                         {}, None)
    assert out == {"ok": False, "note": "not installed: pip install torch-pruning"}
