"""The recipe's ``loss`` section is generated from ``KDSpec`` and ``KDLossOptions`` (one definition
of the loss options): its keys and defaults are theirs, a field added to ``KDLossOptions`` becomes a
recipe key, an old ``loss.impl: fused | materialized`` gets a one-line migration error, and
``t2_scaling`` and the row ``impl`` set in a recipe reach the op."""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
import yaml

from minitron_fast import configtools
from minitron_fast.distill import kd_setup
from minitron_fast.distill.config import (LOSS_OPTION_KEYS, LOSS_STEP_KEYS, ConfigError, LossConfig, load_config,
                                          loss_section)
from minitron_fast.ops.kd_loss.params import DEFAULTS, OPTION_NAMES, KDLossOptions
from minitron_fast.ops.kd_spec import MODEL_FACTS, STEP_SETS, KDSpec

BASE = ["teacher=t", "student=s"]


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def test_the_loss_section_is_kdspec_and_kdlossoptions():
    """Every KDLossOptions field is a recipe key or named (with its reason) as the step's or the
    models'; the recipe keys carry the dataclasses' types and defaults; KDSpec's loss is a
    KDLossOptions, and the spec a default recipe makes holds KDLossOptions' defaults."""
    assert set(LOSS_OPTION_KEYS) | set(STEP_SETS) | set(MODEL_FACTS) == set(OPTION_NAMES)
    assert not set(LOSS_OPTION_KEYS) & (set(STEP_SETS) | set(MODEL_FACTS))
    assert list(_fields(LossConfig)) == [*LOSS_STEP_KEYS, *LOSS_OPTION_KEYS, "topk", "topk_semantics"]
    assert set(LOSS_STEP_KEYS) == set(_fields(KDSpec)) - {"loss", "inter_weight"}
    hints, opt_hints, spec_hints = (typing.get_type_hints(c) for c in (LossConfig, KDLossOptions, KDSpec))
    for k in LOSS_OPTION_KEYS:
        assert (hints[k], _fields(LossConfig)[k].default) == (opt_hints[k], getattr(DEFAULTS, k)), k
    for k in LOSS_STEP_KEYS:
        assert (hints[k], _fields(LossConfig)[k].default) == (spec_hints[k], _fields(KDSpec)[k].default), k
    assert spec_hints["loss"] is KDLossOptions and KDSpec().loss == DEFAULTS
    spec = kd_setup.kd_spec(LossConfig())
    assert spec == KDSpec() and spec.loss == DEFAULTS


def test_a_field_added_to_kdlossoptions_is_a_recipe_key():
    extended = dataclasses.make_dataclass("Extended", [("new_knob", int, dataclasses.field(default=3))],
                                          bases=(KDLossOptions,), frozen=True)
    section = loss_section(KDSpec, extended)
    assert _fields(section)["new_knob"].default == 3 and "new_knob" in section.OPTION_KEYS
    got = configtools.from_dict(section, {"new_knob": 5, "temperature": 2}, error=ConfigError, prefix="loss.")
    opts = got.options(softcap=4.0)
    assert isinstance(opts, extended) and (opts.new_knob, opts.temperature, opts.softcap) == (5, 2.0, 4.0)
    with pytest.raises(ConfigError, match=r"^loss\.new_knob must be an integer, got 'x'$"):
        configtools.from_dict(section, {"new_knob": "x"}, error=ConfigError, prefix="loss.")


@pytest.mark.parametrize("value, message", [
    pytest.param("materialized", r"^loss\.impl=materialized: loss\.impl now selects the row implementation "
                                 r"\(auto/triton/cpp/torch\); write loss\.materialized: true for the plain-torch "
                                 r"baseline$", id="materialized"),
    pytest.param("fused", r"^loss\.impl=fused: loss\.impl now selects the row implementation \(auto/triton/cpp/torch\) "
                          r"and the fused loss is the default; remove loss\.impl \(or write loss\.impl: auto\)$",
                 id="fused"),
])
def test_an_old_loss_impl_gets_a_one_line_migration_error(tmp_path, value, message):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"teacher": "t", "student": "s", "loss": {"kd_weight": 1.0, "impl": value}}))
    with pytest.raises(ConfigError, match=message):
        load_config(p)
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, f"loss.impl={value}"])


def test_an_old_loss_impl_in_a_pipeline_recipe_names_its_section():
    from minitron_fast.pipeline.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"^distill\.loss\.impl=materialized: distill\.loss\.impl now selects the "
                                          r"row implementation \(auto/triton/cpp/torch\); write "
                                          r"distill\.loss\.materialized: true for the plain-torch baseline$"):
        load_recipe("demo", ["distill.loss.impl=materialized"])
    r = load_recipe("demo", ["distill.loss.materialized=true", "distill.loss.t2_scaling=true"])
    assert r.distill.loss.materialized and r.distill.loss.t2_scaling


@pytest.mark.parametrize("override, message", [
    pytest.param("loss.softcap=30", r"^loss\.softcap is not a recipe key: the models' final-logit softcap",
                 id="softcap"),
    pytest.param("loss.vocab_size=100", r"^loss\.vocab_size is not a recipe key: the vocabulary both lm_heads share",
                 id="vocab-size"),
    pytest.param("loss.reduction=sum", r"^loss\.reduction is not a recipe key: the step sums over valid tokens",
                 id="reduction"),
    pytest.param("loss.hard_label_weight=1", r"^loss\.hard_label_weight is not a recipe key: .*set lm_weight$",
                 id="hard-label-weight"),
    pytest.param("loss.ignore_index=0", r"^loss\.ignore_index is not a recipe key", id="ignore-index"),
    pytest.param("loss.inter_weight=1", r"^loss\.inter_weight is not a recipe key: .*set intermediate\.weight$",
                 id="inter-weight"),
    pytest.param("loss.impl=gpu", r"^loss\.impl='gpu' is not one of auto, triton, cpp, torch", id="bad-impl"),
    pytest.param("loss.t2_scaling=maybe", r"^loss\.t2_scaling must be true or false", id="t2-not-bool"),
    pytest.param("loss.materialized=1", r"^loss\.materialized must be true or false", id="materialized-not-bool"),
    pytest.param("loss.impl=cpp loss.materialized=true", r"^loss\.impl=cpp selects the fused loss's row "
                                                         r"implementation, but loss\.materialized: true",
                 id="impl-and-materialized"),
    pytest.param("loss.chunk_size=64 loss.materialized=true", r"^loss\.chunk_size=64 sets the fused loss's chunk "
                 r"rows, but loss\.materialized: true computes the whole \[N, V\] logits at once; drop one of them$",
                 id="chunk-size-and-materialized"),
    pytest.param("loss.topk=8 loss.materialized=true", r"top-k teacher .* set loss\.materialized: false",
                 id="topk-materialized"),
])
def test_loss_keys_the_recipe_does_not_take(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*BASE, *override.split(" ")])


def _tiny(hidden, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32, initializer_range=0.2)).eval()


def test_t2_scaling_and_the_row_impl_from_a_recipe_reach_the_op(monkeypatch):
    """A recipe's loss keys through the trainer's set-up (``Trainer._loss_setup``) and the KD step
    the engine runs (``KDStudent``) into ``fused_linear_kd_loss``: the options it receives are the
    recipe's, with the step's own fields set by the step; the loss is T**2 times the unscaled one
    and equals the materialized baseline's."""
    from minitron_fast.distill.trainer import Trainer
    from minitron_fast.ops import kd_loss
    from minitron_fast.ops.kd_step import KDStudent

    real = kd_loss.fused_linear_kd_loss
    seen: list[KDLossOptions] = []

    def spy(*args, **kwargs):
        seen.append(kwargs["options"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kd_loss, "fused_linear_kd_loss", spy)
    student, teacher = _tiny(32, 0), _tiny(48, 1)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))

    def loss_of(*overrides):
        tr = Trainer(load_config(None, [*BASE, "loss.lm_weight=0.5", "loss.temperature=2", *overrides]))
        tr._loss_setup(student, teacher, n_tokens=101)
        return tr.spec, float(KDStudent(student)(ids, teacher, spec=tr.spec)["loss"].detach())

    spec, scaled = loss_of("loss.t2_scaling=true", "loss.impl=torch", "loss.chunk_size=5", "loss.divergence=jsd",
                           "loss.beta=0.25")
    assert spec.loss.t2_scaling and spec.loss.impl == "torch" and not spec.materialized
    (got,) = seen
    want = DEFAULTS.replace(t2_scaling=True, impl="torch", chunk_size=5, divergence="jsd", beta=0.25, temperature=2.0,
                            hard_label_weight=0.5)  # lm_weight / kd_weight: the step's own
    assert got == want
    _, unscaled = loss_of("loss.impl=torch", "loss.chunk_size=5", "loss.divergence=jsd", "loss.beta=0.25",
                          "loss.lm_weight=0")
    assert len(seen) == 2 and seen[-1] == want.replace(t2_scaling=False, hard_label_weight=0.0)
    _, ce_only = loss_of("loss.impl=torch", "loss.kd_weight=0", "loss.lm_weight=1")  # the CE op, not the KD op
    assert math.isclose(scaled, 4.0 * unscaled + 0.5 * ce_only, rel_tol=1e-5)
    _, baseline = loss_of("loss.t2_scaling=true", "loss.materialized=true", "loss.divergence=jsd", "loss.beta=0.25")
    assert len(seen) == 2  # the materialized baseline never calls the fused op
    assert math.isclose(scaled, baseline, rel_tol=1e-5)
