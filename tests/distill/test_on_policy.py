"""On-policy distillation's pieces (``distill/on_policy.py``, ``on_policy`` in the trainer's
config); the 2-rank ZeRO-3 run is ``test_distill.py::test_on_policy_steps_train_on_the_students_own_tokens``."""
from __future__ import annotations

import pytest
import torch

from minitron_fast.distill.config import ConfigError, load_config
from minitron_fast.distill.on_policy import on_policy_step, rollout
from minitron_fast.ops.kd_step import IGNORE_INDEX


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        eos_token_id=1, pad_token_id=0)).train()


def test_draws_are_seeded_and_keep_the_rate():
    assert all(on_policy_step(1.0, 0, s) for s in range(50)) and not any(on_policy_step(0.0, 0, s) for s in range(50))
    draws = [on_policy_step(0.3, 7, s) for s in range(2000)]
    assert draws == [on_policy_step(0.3, 7, s) for s in range(2000)]  # the same on every rank and on resume
    assert abs(sum(draws) / 2000 - 0.3) < 0.04
    assert draws != [on_policy_step(0.3, 8, s) for s in range(2000)]


def test_rollout_keeps_the_prompt_writes_the_rest_and_labels_only_that():
    model = _tiny()
    ids = torch.randint(2, 53, (3, 12), generator=torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    out, labels = rollout(model, ids, max_new_tokens=5, temperature=1.0, seed=11)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # the training RNG and mode untouched
    assert out.shape == ids.shape and torch.equal(out[:, :7], ids[:, :7])
    assert (labels[:, :7] == IGNORE_INDEX).all() and torch.equal(labels[:, 7:], out[:, 7:])
    again, _ = rollout(model, ids, max_new_tokens=5, temperature=1.0, seed=11)
    assert torch.equal(again, out)
    # greedy: each written token is the student's argmax after what precedes it
    greedy, _ = rollout(model, ids, max_new_tokens=5, temperature=0.0, seed=0)
    model.eval()
    with torch.no_grad():
        logits = model(greedy).logits
    assert torch.equal(logits[:, 6:11].argmax(-1), greedy[:, 7:12])
    with pytest.raises(ValueError, match="max_new_tokens=12 must lie in"):
        rollout(model, ids, max_new_tokens=12, temperature=1.0, seed=0)


@pytest.mark.parametrize("over, message", [
    (["on_policy.lmbda=1.5"], "on_policy.lmbda must be at most 1"),
    (["on_policy.lmbda=-0.1"], "on_policy.lmbda must be at least 0"),
    (["on_policy.lmbda=0.5", "on_policy.max_new_tokens=256"], "leaves no prompt in a block of data.seq_len=256"),
    (["on_policy.lmbda=0.5", "teacher_logits=/x"], "needs a live teacher"),
    (["on_policy.lmbda=0.5", "mode=correct-teacher", "student=null"], "needs mode distill"),
])
def test_bad_options_are_one_line(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["teacher=t", "student=s", *over])


def test_off_leaves_the_fingerprint_and_the_pipelines_keys_as_before():
    from minitron_fast.pipeline.recipe import load_recipe, training_config

    base = load_config(None, ["teacher=t", "student=s"])
    assert base.fingerprint() == load_config(None, ["teacher=t", "student=s", "on_policy.max_new_tokens=9"]).fingerprint()
    assert base.fingerprint() != load_config(None, ["teacher=t", "student=s", "on_policy.lmbda=0.5"]).fingerprint()
    cfg = training_config(load_recipe("demo"), "distill", teacher="t", student="s", out="o")
    assert "on_policy" not in cfg
    on = training_config(load_recipe("demo", ["distill.on_policy.lmbda=0.25"]), "distill", teacher="t", student="s",
                         out="o")
    assert on["on_policy"]["lmbda"] == 0.25
