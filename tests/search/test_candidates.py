"""Search candidate enumeration: pure arithmetic over geometries, checked against module shapes."""
from __future__ import annotations

import pytest

from minitron_fast.models import get_view, view_class_for_config
from minitron_fast.models.loading import meta_model
from minitron_fast.search.candidates import SearchError, default_multiple, enumerate_candidates, format_candidates
from tests.pipeline.test_recipes import llama31_8b_config, mistral_nemo_12b_config


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def qwen2_small_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)


CONFIGS = [pytest.param(smollm2_config, 0.7, id="smollm2"), pytest.param(qwen2_small_config, 0.6, id="qwen2-bias"),
           pytest.param(llama31_8b_config, 0.56, id="llama3.1-8b"), pytest.param(mistral_nemo_12b_config, 0.69, id="nemo")]


@pytest.mark.parametrize("make_config, frac", CONFIGS)
def test_candidates_respect_budget_and_hardware_rules(make_config, frac):
    config = make_config()
    view_cls = view_class_for_config(config)
    src = view_cls.geometry_of(config)
    full = view_cls.count_params(config)["total"]
    budget, tol = int(frac * full), 0.05
    cands = enumerate_candidates(config, budget, tolerance=tol, max_per_kind=None)
    m = default_multiple(src.hidden_size)
    assert {c.kind for c in cands} >= {"width", "mixed"}
    for c in cands:
        g = c.geometry
        assert budget * (1 - tol) <= c.params <= budget
        assert c.params == view_cls.count_params(config, g)["total"]
        assert g.hidden_size % m == 0 or g.hidden_size == src.hidden_size
        assert g.intermediate_size % m == 0 or g.intermediate_size == src.intermediate_size
        assert g.num_attention_heads % g.num_key_value_heads == 0
        # equal groups, none larger than the teacher's
        assert g.num_attention_heads // g.num_key_value_heads <= src.num_attention_heads // src.num_key_value_heads
        assert (g.head_dim, g.vocab_size) == (src.head_dim, src.vocab_size)
        width_cut = (g.hidden_size, g.intermediate_size, g.num_attention_heads) != (
            src.hidden_size, src.intermediate_size, src.num_attention_heads)
        depth_cut = g.num_hidden_layers < src.num_hidden_layers
        if g.num_key_value_heads < src.num_key_value_heads:  # whole KV groups removed: the kv kind, whatever else
            assert c.kind == "kv"
        else:
            assert c.kind == {(True, False): "width", (False, True): "depth", (True, True): "mixed"}[(width_cut,
                                                                                                      depth_cut)]
    # KV groups are a default axis: every one of these GQA teachers gets shapes with fewer KV heads
    assert src.num_key_value_heads > 1 and "kv" in {c.kind for c in cands}
    # one candidate per (hidden, layers, KV heads) after selection
    keys = [(c.kind, c.geometry.hidden_size, c.geometry.num_hidden_layers, c.geometry.num_key_value_heads)
            for c in cands]
    assert len(keys) == len(set(keys))
    # the analytic count equals the module shapes on the meta device (one candidate per kind)
    for kind in {c.kind for c in cands}:
        c = next(x for x in cands if x.kind == kind)
        student = get_view(meta_model(view_cls.config_for(config, c.geometry)))
        assert student.param_counts()["total"] == c.params


def test_papers_shapes_are_found_at_their_own_size():
    """At a budget equal to a published shape's size, the search proposes exactly that shape for
    its hidden size (the FFN is solved as the largest fitting multiple) and layer count."""
    config = llama31_8b_config()
    view_cls = view_class_for_config(config)
    src = view_cls.geometry_of(config)
    width = src.replace(hidden_size=3072, intermediate_size=9216)
    n = view_cls.count_params(config, width)["total"]
    cands = enumerate_candidates(config, n, tolerance=0.02, kinds=["width"], max_per_kind=None, prune_heads=False)
    assert width in [c.geometry for c in cands]
    depth = src.replace(num_hidden_layers=16)
    n = view_cls.count_params(config, depth)["total"]
    cands = enumerate_candidates(config, n, tolerance=0.02, kinds=["depth"])
    assert [c.geometry for c in cands] == [depth]
    nemo = mistral_nemo_12b_config()
    vc = view_class_for_config(nemo)
    g = vc.geometry_of(nemo).replace(hidden_size=4096, intermediate_size=11520)
    cands = enumerate_candidates(nemo, vc.count_params(nemo, g)["total"], tolerance=0.02, kinds=["width"],
                                 max_per_kind=None, prune_heads=False)
    assert g in [c.geometry for c in cands]


def test_selection_keeps_at_most_k_per_kind_spread_over_widths():
    config = smollm2_config()
    full = view_class_for_config(config).count_params(config)["total"]
    all_ = enumerate_candidates(config, int(0.7 * full), max_per_kind=None)
    few = enumerate_candidates(config, int(0.7 * full), max_per_kind=3)
    for kind in ("width", "mixed", "kv"):
        k_all = [c for c in all_ if c.kind == kind]
        k_few = [c for c in few if c.kind == kind]
        assert len(k_few) == min(3, len(k_all))
        assert set(k_few) <= set(k_all)
        hs = [c.geometry.hidden_size for c in k_all]
        if len(k_all) > 3:  # spread: the widest and the narrowest hidden sizes are both kept
            assert max(hs) in [c.geometry.hidden_size for c in k_few] and min(hs) in [c.geometry.hidden_size for c in k_few]
    table = format_candidates(few, {few[0].name: {"loss": 1.5}})
    assert "loss" in table and "1.5000" in table and len(table.splitlines()) == len(few) + 2


@pytest.mark.parametrize("budget, kw, match", [
    pytest.param(10**12, {}, "not below the teacher", id="over-teacher"),
    pytest.param(1000, {}, "no width/depth/mixed/kv candidate", id="too-small"),
    pytest.param(None, {"kinds": ["depth"], "tolerance": 0.001}, "no depth candidate", id="no-depth-in-window"),
    pytest.param(None, {"kinds": ["sideways"]}, "non-empty subset", id="bad-kind"),
    pytest.param(None, {"tolerance": 1.5}, "tolerance", id="bad-tolerance"),
])
def test_impossible_budgets_are_clear_errors(budget, kw, match):
    config = smollm2_config()
    full = view_class_for_config(config).count_params(config)["total"]
    # 0.7x of SmolLM2 falls between two layer counts: no depth-only shape within 0.1%
    with pytest.raises(SearchError, match=match) as e:
        enumerate_candidates(config, budget if budget is not None else int(0.7 * full) - 123_457, **kw)
    assert "\n" not in str(e.value)
