"""The README's Python API flow, on a tiny model: importance -> plan -> in-place prune -> eval."""
from __future__ import annotations

import math

import torch

import minitron_fast as mf


def test_readme_flow_in_memory(tiny_builders):
    model = tiny_builders["llama"]()
    calib = torch.randint(0, model.config.vocab_size, (4, 16))
    scores = mf.compute_importance(model, calib, progress=False)
    plan = mf.make_plan(model, scores, "ffn=64,layers=2")  # the in-memory scores object is accepted as is
    assert plan == mf.make_plan(model, scores.to_tensors(), "ffn=64,layers=2")
    before = mf.get_view(model).param_counts()["total"]
    mf.apply_plan(model, plan)
    view = mf.get_view(model)
    g = view.geometry()
    assert (g.intermediate_size, g.num_hidden_layers) == (64, 2)
    assert view.param_counts()["total"] == view.count_params(model.config)["total"] < before
    assert math.isfinite(mf.perplexity(model, torch.randint(0, g.vocab_size, (2, 16)), progress=False))


def test_public_names_resolve():
    for name in mf.__all__:
        assert getattr(mf, name) is not None
