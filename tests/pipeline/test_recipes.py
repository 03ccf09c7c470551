"""Shipped recipes validate, bad recipes give one-line errors, and on the meta device the big
recipes' pruned shapes have the parameter counts the Minitron papers publish."""
from __future__ import annotations

import pytest

from minitron_fast.models import Geometry, get_view, view_class_for_config
from minitron_fast.models.loading import meta_model
from minitron_fast.artifacts.targets import TargetError, parse_budget, parse_target
from minitron_fast.pipeline.recipe import (RecipeError, load_recipe, parse_overrides, shipped_recipes, stage_enabled,
                                           training_config)

SHIPPED = ["demo", "llama3.1-8b-to-4b-width", "llama3.1-8b-to-4b-depth", "mistral-nemo-12b-to-8b",
           "qwen3-8b-to-6b-width", "gemma2-9b-to-6b-width", "mixtral-8x7b-experts-8-to-6"]


def llama31_8b_config():
    """meta-llama/Llama-3.1-8B's config.json values (no hub access here)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def mistral_nemo_12b_config():
    """mistralai/Mistral-Nemo-Base-2407's config.json values: head_dim 128 != 5120 / 32."""
    from transformers import MistralConfig

    return MistralConfig(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1024000,
                         rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None)


def qwen3_8b_config():
    """Qwen/Qwen3-8B's config.json values: head_dim 128, per-head q/k norms, untied."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False,
                       sliding_window=None, max_window_layers=36)


def gemma2_9b_config():
    """google/gemma-2-9b's config.json values: head_dim 256, four norms per layer, tied, softcaps."""
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, max_position_embeddings=8192, final_logit_softcapping=30.0,
                        attn_logit_softcapping=50.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2)


def test_every_shipped_recipe_validates():
    shipped = shipped_recipes()
    assert sorted(shipped) == sorted(SHIPPED)
    for name in SHIPPED:
        r = load_recipe(name)
        assert r.name == name and r.teacher
        for section in ("correct_teacher", "distill", "scratch"):
            if stage_enabled(r, section):
                cfg = training_config(r, section, teacher="t", student="s", out="o")
                assert cfg["data"]["seq_len"] == r.data.seq_len
                assert cfg["mode"] == ("distill" if section == "distill" else "correct-teacher")


def test_recipe_found_by_path_and_name(tmp_path):
    p = shipped_recipes()["demo"]
    assert load_recipe(str(p)).to_dict() == load_recipe("demo").to_dict() == load_recipe("demo.yaml").to_dict()
    with pytest.raises(RecipeError, match="not a shipped recipe"):
        load_recipe("no-such-recipe")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "x" / "missing.yaml"))


def test_overrides_apply_and_are_typed():
    r = load_recipe("demo", ["distill.steps=3", "prune.target=hidden=448,ffn=768", "importance.samples=4",
                             "evaluate.eval_blocks=2", "threads=2"])
    assert r.distill.steps == 3 and r.prune.target == "hidden=448,ffn=768"
    assert r.importance.samples == 4 and r.evaluate.eval_blocks == 2 and r.threads == 2
    # scratch inherits distill's token count unless it says otherwise
    assert training_config(r, "scratch", teacher="t", student=None, out="o")["steps"] == 3
    assert parse_overrides(["a.b.c=1", "d=x"]) == {"a": {"b": {"c": 1}}, "d": "x"}


@pytest.mark.parametrize("override, match", [
    pytest.param("importance.sample=4", r"unknown recipe key importance\.sample; known keys under importance",
                 id="unknown-nested"),
    pytest.param("bogus=1", r"unknown recipe key bogus", id="unknown-top"),
    pytest.param("importance.samples=many", r"importance\.samples must be an integer", id="wrong-type-int"),
    pytest.param("search.enabled=maybe", r"search\.enabled must be true or false", id="wrong-type-bool"),
    pytest.param("data=3", r"data must be a mapping", id="wrong-type-section"),
    pytest.param("prune.target=width=3", r"prune\.target: unknown target key 'width'", id="bad-target-key"),
    pytest.param("prune.target=hidden=-3", r"positive integer", id="bad-target-value"),
    pytest.param("distill.stepz=3", r"^unknown recipe key distill\.stepz", id="unknown-trainer-key"),
    pytest.param("distill.lr=fast", r"^distill\.lr must be a number", id="wrong-trainer-type"),
    pytest.param("distill.mode=distill", r"distill\.mode is set by the pipeline", id="reserved-key"),
    pytest.param("distill.data.seq_len=3", r"set data\.seq_len instead", id="data-from-recipe"),
    pytest.param("importance.seq_agg=max", r"importance\.seq_agg='max' is not one of", id="bad-choice"),
    pytest.param("search.enabled=true", None, id="search-needs-budget-ok"),  # demo has params: 0.7x
    pytest.param("prune.depth_metric=lm_loss", r"needs importance\.depth_lm_loss", id="lm-loss-needs-scores"),
])
def test_bad_recipes_give_one_line_errors(override, match):
    if override.startswith("distill.") and "mode" not in override and "data." not in override:
        pytest.importorskip("minitron_fast.distill.config", reason="the trainer's schema validates these keys")
    if match is None:
        load_recipe("demo", [override])
        return
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe("demo", [override])
    assert "\n" not in str(e.value)


def test_recipe_without_target_or_search(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("teacher: demo\n")
    with pytest.raises(RecipeError, match="set prune.target"):
        load_recipe(p)
    p.write_text("teacher: demo\nsearch: {enabled: true}\n")
    with pytest.raises(RecipeError, match="search.params"):
        load_recipe(p)
    p.write_text("- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(p)
    p.write_text("teacher: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_parse_budget():
    assert parse_budget("4.5e9", 1) == 4_500_000_000
    assert parse_budget("4.5B", 1) == 4_500_000_000
    assert parse_budget("90M", 1) == 90_000_000
    assert parse_budget("0.5x", 1000) == 500
    for bad in ("lots", "1.5x", "-3", "0"):
        with pytest.raises(TargetError):
            parse_budget(bad, 1000)


def pruned_geometry(config, target: str) -> Geometry:
    keys = {"hidden": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads", "layers": "num_hidden_layers"}
    src = view_class_for_config(config).geometry_of(config)
    return src.replace(**{keys[k]: v for k, v in parse_target(target).items()})


# Published sizes (arXiv 2408.11796 and the models' cards): Llama-3.1-Minitron-4B-Width and
# -Depth "4.5B", Mistral-NeMo-Minitron-8B "8.4B"; teachers Llama-3.1-8B "8.0B" and
# Mistral-NeMo-12B "12.2B". The papers round to 0.1B, so a faithful shape lands within half a
# unit of that last digit: tolerance 0.05e9 (1.1% of 4.5B, 0.6% of 8.4B). Any other plausible
# shape misses it: e.g. FFN 9216 -> 8192 alone moves the width model by 0.3B.
PAPER = [
    pytest.param("llama3.1-8b-to-4b-width", llama31_8b_config, 8.0e9, 4.5e9, id="llama-4b-width"),
    pytest.param("llama3.1-8b-to-4b-depth", llama31_8b_config, 8.0e9, 4.5e9, id="llama-4b-depth"),
    pytest.param("mistral-nemo-12b-to-8b", mistral_nemo_12b_config, 12.2e9, 8.4e9, id="mistral-nemo-8b"),
]
TOL = 0.05e9


@pytest.mark.parametrize("recipe, make_config, teacher_published, student_published", PAPER)
def test_big_recipes_match_published_parameter_counts(recipe, make_config, teacher_published, student_published):
    r = load_recipe(recipe)
    config = make_config()
    view_cls = view_class_for_config(config)
    teacher = get_view(meta_model(config))  # real module shapes on the meta device, no memory
    assert abs(teacher.param_counts()["total"] - teacher_published) <= TOL

    geo = pruned_geometry(config, r.prune.target)
    student_config = view_cls.config_for(config, geo)
    student = get_view(meta_model(student_config))
    n_modules = student.param_counts()["total"]
    assert n_modules == view_cls.count_params(config, geo)["total"]  # analytic count == module shapes
    assert abs(n_modules - student_published) <= TOL, f"{recipe}: {n_modules / 1e9:.3f}B vs {student_published / 1e9}B"
    assert student.geometry() == geo
    # the shapes the papers name
    assert geo.num_attention_heads % geo.num_key_value_heads == 0
    if "width" in recipe:
        assert (geo.hidden_size, geo.intermediate_size, geo.num_hidden_layers) == (3072, 9216, 32)
    elif "depth" in recipe:
        assert (geo.hidden_size, geo.intermediate_size, geo.num_hidden_layers) == (4096, 14336, 16)
    else:
        assert (geo.hidden_size, geo.intermediate_size, geo.num_hidden_layers, geo.head_dim) == (4096, 11520, 40, 128)


# The model cards: Qwen3-8B "8.2B", gemma-2-9b 9.24B. The students aim at ~6B (the size of NVIDIA's
# Minitron search result from Qwen3-8B); the recipes' comments state the exact counts checked here.
FAMILIES = [
    pytest.param("qwen3-8b-to-6b-width", qwen3_8b_config, 8.2e9, 5.978e9, (3584, 9216, 36), id="qwen3-6b-width"),
    pytest.param("gemma2-9b-to-6b-width", gemma2_9b_config, 9.24e9, 5.940e9, (3072, 9216, 42), id="gemma2-6b-width"),
]


@pytest.mark.parametrize("recipe, make_config, teacher_published, student_count, shape", FAMILIES)
def test_family_recipes_parameter_counts_on_meta_device(recipe, make_config, teacher_published, student_count, shape):
    r = load_recipe(recipe)
    config = make_config()
    view_cls = view_class_for_config(config)
    teacher = get_view(meta_model(config))
    assert abs(teacher.param_counts()["total"] - teacher_published) <= TOL
    assert teacher.param_counts() == view_cls.count_params(config)
    geo = pruned_geometry(config, r.prune.target)
    assert (geo.hidden_size, geo.intermediate_size, geo.num_hidden_layers) == shape
    student_config = view_cls.config_for(config, geo)
    student = get_view(meta_model(student_config))
    n = student.param_counts()["total"]
    assert n == view_cls.count_params(config, geo)["total"]
    assert abs(n - student_count) <= 0.0005e9 and abs(n - 6.0e9) <= 0.1e9
    assert student.geometry() == geo and student.head_dim == teacher.head_dim
    assert student.attn_kinds == teacher.attn_kinds  # width pruning keeps every layer's type


def mixtral_8x7b_config():
    """mistralai/Mixtral-8x7B-v0.1's config.json values."""
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         sliding_window=None)


def test_mixtral_experts_recipe_parameter_counts():
    """Mixtral-8x7B is published as 46.7B parameters, 12.9B active per token; 6 of 8 experts per
    layer leaves 35.4B (32 layers x 2 experts x 3 x 4096 x 14336 fewer, plus 2 router rows each),
    with the same active count but the two router rows (top-2 routing kept)."""
    from minitron_fast.prune import target_geometry

    r = load_recipe("mixtral-8x7b-experts-8-to-6")
    config = mixtral_8x7b_config()
    view_cls = view_class_for_config(config)
    teacher = get_view(meta_model(config))
    assert abs(teacher.param_counts()["total"] - 46.7e9) <= TOL
    geo = target_geometry(config, r.prune.target)
    assert (geo.num_experts, geo.num_experts_per_tok, geo.moe_intermediate_size) == (6, 2, 14336)
    student = get_view(meta_model(view_cls.config_for(config, geo)))
    n = student.param_counts()["total"]
    assert n == view_cls.count_params(config, geo)["total"]
    assert abs(n - 35.4e9) <= TOL and student.geometry() == geo
    assert teacher.param_counts()["total"] - n == 32 * 2 * (3 * 4096 * 14336 + 4096)
    per_expert = 3 * 4096 * 14336 * 32
    active = lambda total, e: total - (e - 2) * per_expert  # noqa: E731  two experts per token
    assert abs(active(n, 6) - 12.9e9) <= TOL
    assert active(teacher.param_counts()["total"], 8) - active(n, 6) == 32 * 2 * 4096  # only the router rows
