"""HF Trainer integration: a tiny student distilled from a tiny teacher with the stock Trainer on CPU,
through hidden states only (no [B, T, V] logits)."""
from __future__ import annotations

import math

import pytest
import torch


def _tiny(hidden, layers, seed, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=131, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def _no_logits(model):
    """Makes any call of the lm_head fail: the fused loss must read its weight, not run it."""
    def boom(*a, **k):
        raise AssertionError("lm_head.forward was called: logits were materialized")

    model.get_output_embeddings().forward = boom


def test_causal_lm_kd_loss_matches_full_logits_reference():
    from minitron_fast.integrations.hf_trainer import causal_lm_kd_loss
    from minitron_fast.losses import FusedLinearKDLoss
    from minitron_fast.ops.kd_loss import kd_loss_reference

    student, teacher = _tiny(32, 2, 0, tie=True), _tiny(48, 2, 1)
    ids = torch.randint(0, 131, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # padding at the end of one row
    with torch.no_grad():
        zs = student(input_ids=ids, attention_mask=mask).logits
        zt = teacher(input_ids=ids, attention_mask=mask).logits
    labels = ids.masked_fill(mask == 0, -100)[:, 1:].reshape(-1)
    fn = FusedLinearKDLoss("jsd", beta=0.3, temperature=1.5, hard_label_weight=0.2)
    ref = kd_loss_reference(zs[:, :-1].reshape(-1, 131), zt[:, :-1].reshape(-1, 131), labels=labels,
                            divergence="jsd", beta=0.3, temperature=1.5, hard_label_weight=0.2)
    _no_logits(student)
    _no_logits(teacher)
    loss = causal_lm_kd_loss(student, teacher, ids, mask, loss_fn=fn)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-4)
    loss.backward()
    emb = student.get_input_embeddings().weight  # tied with the lm_head: both paths' gradients land here
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_the_trainers_loss_options_are_kdlossoptions(tmp_path):
    """``KDTrainer`` takes the loss options as ``KDLossOptions``' fields (or ``options=``); its step's
    spec carries them, with the fields the step sets left to the step."""
    from transformers import TrainingArguments

    from minitron_fast.errors import KDInputError
    from minitron_fast.integrations.hf_trainer import KDTrainer, spec_of
    from minitron_fast.losses import FusedLinearKDLoss
    from minitron_fast.ops.kd_loss.params import DEFAULTS, KDLossOptions

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    student, teacher = _tiny(32, 1, 0), _tiny(48, 1, 1)
    tr = KDTrainer(model=student, teacher_model=teacher, args=args, divergence="jsd", beta=0.2, t2_scaling=True,
                   impl="torch", chunk_size=8, hard_label_weight=0.3)
    assert tr.kd_spec.lm_weight == 0.3 and tr.kd_spec.loss == DEFAULTS.replace(
        divergence="jsd", beta=0.2, t2_scaling=True, impl="torch", chunk_size=8)
    same = KDTrainer(model=student, teacher_model=teacher, args=args,
                     options=KDLossOptions(divergence="jsd", beta=0.2, t2_scaling=True, impl="torch", chunk_size=8,
                                           hard_label_weight=0.3))
    assert same.kd_spec == tr.kd_spec
    with pytest.raises(KDInputError, match="impl='fused' is not one of"):
        KDTrainer(model=student, teacher_model=teacher, args=args, impl="fused")
    # reduction and ignore_index are the caller's (causal_lm_kd_loss maps them); the spec keeps the step's
    spec = spec_of(FusedLinearKDLoss(reduction="sum", ignore_index=7, softcap=5.0), student, teacher)
    assert (spec.loss.reduction, spec.loss.ignore_index, spec.loss.softcap) == ("mean", -100, 5.0)


@pytest.mark.slow
def test_stock_trainer_distills_a_few_steps(tmp_path):
    from transformers import TrainingArguments

    from minitron_fast.integrations.hf_trainer import KDTrainer

    student, teacher = _tiny(32, 1, 0), _tiny(48, 2, 1)
    _no_logits(student)
    _no_logits(teacher)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 131, (16,), generator=g)} for _ in range(4)]
    for d in data:
        d["labels"] = d["input_ids"].clone()
        d["attention_mask"] = torch.ones_like(d["input_ids"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, warmup_steps=0,
                             lr_scheduler_type="constant")
    before = [p.detach().clone() for p in student.parameters()]
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, temperature=1.0)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses  # the student moves toward the teacher
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
