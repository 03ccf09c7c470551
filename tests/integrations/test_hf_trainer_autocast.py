"""KDTrainer under the stock HF Trainer with ``bf16=True`` and no DeepSpeed (CPU autocast): the
fused loss accepts the autocast inputs, runs its head GEMMs in bf16 (fp32 accumulation) and the
student trains."""
from __future__ import annotations

import math

import pytest
import torch


def _tiny(hidden, layers, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=131, hidden_size=hidden, intermediate_size=hidden * 2,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, tie_word_embeddings=False))


@pytest.mark.slow
def test_kdtrainer_bf16_autocast_without_deepspeed(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from minitron_fast.integrations.hf_trainer import KDTrainer
    from minitron_fast.ops.kd_loss import autograd as kd_autograd

    seen = []
    forward = kd_autograd.FusedKD.forward

    def spy(ctx, h, W, b, spec):
        seen.append((torch.is_autocast_enabled("cpu"), spec[3].dtype, W.dtype))
        return forward(ctx, h, W, b, spec)

    monkeypatch.setattr(kd_autograd.FusedKD, "forward", staticmethod(spy))
    student, teacher = _tiny(32, 1, 0), _tiny(48, 1, 1)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 131, (16,), generator=g)} for _ in range(4)]
    for d in data:
        d["labels"] = d["input_ids"].clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, bf16=True,
                             learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0, warmup_steps=0, lr_scheduler_type="constant")
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, temperature=2.0,
                        hard_label_weight=0.5)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    # the fused loss ran under autocast with fp32 master weights and bf16 GEMMs
    assert seen and all(auto and gemm == torch.bfloat16 and w == torch.float32 for auto, gemm, w in seen), seen
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in student.parameters())
