"""``minitron_fast.integrations.trl``: TRL's ``DistillationTrainer`` with the fused KD loss.

The divergence equals TRL's own chunked divergence at equal inputs (beta 0, 0.5, 1; prompt
tokens masked), its gradients match float64, and the trainer runs on-policy, off-policy and mixed
with TRL's own ``generate`` path, on the same loss curve as TRL's own trainer. The 2-rank ZeRO-3
run is in ``test_zero3.py`` (mode ``trl``)."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from tests import ROOT

pytest.importorskip("trl")

from minitron_fast.ops.kd_step import KDSetupError  # noqa: E402
from minitron_fast.integrations.trl import check_beta_lmbda, fused_divergence_loss  # noqa: E402


def _llama(hidden, vocab=97, layers=1, seed=0, max_pos=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=max_pos, tie_word_embeddings=False))


def _reference64(hs, ws, ht, wt, mask, beta, T):
    """TRL's definition in float64: the generalized JSD (beta 0 forward KL, 1 reverse KL) of
    softmax(z / T), summed over masked-in rows, divided by their count."""
    hs, ht = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    ls = torch.log_softmax((hs.double() @ ws.double().T) / T, -1)
    lt = torch.log_softmax((ht.double() @ wt.double().T) / T, -1)
    ps, pt = ls.exp(), lt.exp()
    if beta == 0:
        per = (pt * (lt - ls)).sum(-1)
    elif beta == 1:
        per = (ps * (ls - lt)).sum(-1)
    else:
        lm = torch.logaddexp(lt + torch.log(torch.tensor(beta, dtype=torch.float64)),
                             ls + torch.log1p(torch.tensor(-beta, dtype=torch.float64)))
        per = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    m = mask.reshape(-1).double()
    return (per * m).sum() / m.sum()


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_equals_trls_own_divergence_and_float64(beta, T):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    student, teacher = _llama(32, seed=0), _llama(48, seed=1)
    B, K = 3, 7
    g = torch.Generator().manual_seed(5)
    hs = (torch.randn(B, K, 32, generator=g) * 2).requires_grad_(True)
    ht = torch.randn(B, K, 48, generator=g) * 2
    completion = torch.randint(0, 97, (B, K), generator=g)
    mask = torch.ones(B, K, dtype=torch.long)
    mask[:, :2] = 0      # prompt-side tokens out of the loss
    mask[1, 5:] = 0      # a shorter completion (padding)
    ws, wt = student.lm_head.weight, teacher.lm_head.weight

    ours, n = fused_divergence_loss(student, teacher, hs, ht, completion, mask, beta=beta, temperature=T)
    theirs, _, n_trl = _chunked_divergence_loss(hs.detach(), ht, ws.detach(), wt, mask, beta, temperature=T)
    ref = _reference64(hs.detach(), ws.detach(), ht, wt, mask, beta, T)
    assert int(n) == int(n_trl) == int(mask.sum())
    assert abs(float(ours) - float(theirs)) <= 1e-5 * abs(float(ref)) + 1e-7, (float(ours), float(theirs))
    assert abs(float(ours) - float(ref)) <= 1e-5 * abs(float(ref)) + 1e-7, (float(ours), float(ref))

    ours.backward()
    hs64 = hs.detach().double().requires_grad_(True)
    ws64 = ws.detach().double().requires_grad_(True)
    _reference64(hs64, ws64, ht, wt, mask, beta, T).backward()
    for got, want in ((hs.grad, hs64.grad), (ws.grad, ws64.grad)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= 1e-5, float(err)
    assert hs.grad[0, :2].abs().max() == 0  # masked tokens get no gradient


def test_teacher_top_k_with_the_tail_at_full_k_is_the_full_teacher():
    student, teacher = _llama(32, seed=0), _llama(48, seed=1)
    g = torch.Generator().manual_seed(6)
    hs, ht = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 48, generator=g)
    completion, mask = torch.randint(0, 97, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.long)
    full, _ = fused_divergence_loss(student, teacher, hs, ht, completion, mask, beta=0.5)
    at_v, _ = fused_divergence_loss(student, teacher, hs, ht, completion, mask, beta=0.5, teacher_top_k=97)
    k8, _ = fused_divergence_loss(student, teacher, hs, ht, completion, mask, beta=0.5, teacher_top_k=8)
    assert abs(float(at_v) - float(full)) <= 1e-5 * abs(float(full))
    assert abs(float(k8) - float(full)) > 1e-4 * abs(float(full))  # top-8 of 97 is another teacher


def test_loss_options_reach_the_op_and_trls_own_are_refused(monkeypatch):
    """``options`` (a ``KDLossOptions``) carries the fused loss's other options to the op; the
    divergence, beta and temperature stay TRL's, and giving one there too is refused."""
    from minitron_fast.integrations.trl import trl_loss_options
    from minitron_fast.ops import kd_loss
    from minitron_fast.ops.kd_loss.params import DEFAULTS, KDLossOptions

    real, seen = kd_loss.fused_linear_kd_loss, []
    monkeypatch.setattr(kd_loss, "fused_linear_kd_loss", lambda *a, **k: seen.append(k["options"]) or real(*a, **k))
    student, teacher = _llama(32, seed=0), _llama(48, seed=1)
    g = torch.Generator().manual_seed(7)
    hs, ht = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 48, generator=g)
    completion, mask = torch.randint(0, 97, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.long)
    auto, _ = fused_divergence_loss(student, teacher, hs, ht, completion, mask, beta=0.3, temperature=2.0)
    torch_rows, _ = fused_divergence_loss(student, teacher, hs, ht, completion, mask, beta=0.3, temperature=2.0,
                                          options=KDLossOptions(impl="torch", chunk_size=4))
    assert seen[1] == DEFAULTS.replace(divergence="jsd", beta=0.3, temperature=2.0, impl="torch", chunk_size=4)
    assert abs(float(torch_rows.detach()) - float(auto.detach())) <= 1e-5 * abs(float(auto.detach()))
    assert trl_loss_options(0.0, 1.0).divergence == "forward_kl" and trl_loss_options(1.0, 1.0).beta == DEFAULTS.beta
    with pytest.raises(KDSetupError, match=r"^options\.temperature=3\.0: TRL sets the divergence through "
                                           r"DistillationConfig's beta"):
        trl_loss_options(0.5, 1.0, KDLossOptions(temperature=3.0))


# -- the trainer ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import AutoTokenizer

    from bench.common import make_tiny_teacher

    tdir = make_tiny_teacher(tmp_path_factory.mktemp("trl") / "teacher")
    tok = AutoTokenizer.from_pretrained(tdir)
    tok.pad_token = tok.eos_token
    return tdir, tok


def _student(tok, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))


def _dataset(with_completion=True):
    from datasets import Dataset

    d = {"prompt": ["The function returns", "A module is", "Lists hold", "Classes define"] * 2}
    if with_completion:
        d["completion"] = [" a value.", " a file.", " items.", " types."] * 2
    return Dataset.from_dict(d)


def _train(pair, tmp_path, *, cls=None, steps=2, beta=0.5, dataset=None, **kw):
    from transformers import LlamaForCausalLM
    from trl import DistillationConfig

    from minitron_fast.integrations.trl import FusedDistillationTrainer

    tdir, tok = pair
    teacher = LlamaForCausalLM.from_pretrained(tdir)
    args = DistillationConfig(output_dir=str(tmp_path / "o"), max_steps=steps, per_device_train_batch_size=2,
                              bf16=False, gradient_checkpointing=False, max_completion_length=6, logging_steps=1,
                              report_to=[], use_cpu=True, beta=beta, learning_rate=1e-3, save_strategy="no", seed=3,
                              disable_tqdm=True)
    cls = cls or FusedDistillationTrainer
    tr = cls(model=_student(tok, teacher.config.vocab_size), teacher_model=teacher, args=args,
             train_dataset=dataset if dataset is not None else _dataset(), processing_class=tok, **kw)
    tr.train()
    return tr, [h for h in tr.state.log_history if "loss" in h]


@pytest.mark.slow
@pytest.mark.parametrize("lmbda", [1.0, 0.0, 0.5])
def test_trainer_runs_on_policy_off_policy_and_mixed(pair, tmp_path, lmbda):
    tr, logs = _train(pair, tmp_path, steps=4, lmbda=lmbda)
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) and h["loss"] > 0 for h in logs)
    expect = [1.0 if lmbda == 1 else 0.0 if lmbda == 0 else
              float(random.Random(f"3:{i}").random() < lmbda) for i in range(4)]
    assert [h["on_policy"] for h in logs] == expect
    if lmbda == 0.5:
        assert set(expect) == {0.0, 1.0}  # seed 3 draws both kinds within 4 batches


@pytest.mark.slow
def test_same_loss_curve_as_trls_own_trainer(pair, tmp_path):
    """On-policy, the same seed and batches: TRL's own trainer and ours generate the same
    completions and train to the same losses, up to fp32 noise."""
    from trl import DistillationTrainer

    theirs, their_logs = _train(pair, tmp_path / "trl", cls=DistillationTrainer, steps=3)
    ours, our_logs = _train(pair, tmp_path / "ours", steps=3)
    a, b = [h["loss"] for h in their_logs], [h["loss"] for h in our_logs]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x) + 1e-8, (a, b)
    # (weights are not compared: Adam turns fp32-noise differences of near-zero gradients into
    # full-size updates of either sign)


def test_bad_input_is_one_line(pair, tmp_path):
    with pytest.raises(KDSetupError, match=r"^lmbda=1.5 lies outside \[0, 1\]"):
        check_beta_lmbda(0.5, 1.5)
    with pytest.raises(KDSetupError, match=r"^beta=-0.1 lies outside \[0, 1\]"):
        check_beta_lmbda(-0.1, 1.0)
    with pytest.raises(KDSetupError, match="lmbda=2"):
        _train(pair, tmp_path, lmbda=2)
    with pytest.raises(KDSetupError, match="needs a 'completion' column"):
        _train(pair, tmp_path, lmbda=0.0, dataset=_dataset(with_completion=False))
    from transformers import LlamaForCausalLM
    from trl import DistillationConfig

    from minitron_fast.integrations.trl import FusedDistillationTrainer

    tdir, tok = pair
    teacher = LlamaForCausalLM.from_pretrained(tdir)
    args = DistillationConfig(output_dir=str(tmp_path / "o2"), max_steps=1, bf16=False, use_cpu=True, report_to=[],
                              max_completion_length=300, gradient_checkpointing=False)
    with pytest.raises(KDSetupError, match="max_completion_length=300 leaves no room"):
        FusedDistillationTrainer(model=_student(tok, teacher.config.vocab_size), teacher_model=teacher, args=args,
                                 train_dataset=_dataset(), processing_class=tok)
    args.max_completion_length = 6
    from minitron_fast.ops.kd_loss.params import KDLossOptions

    with pytest.raises(KDSetupError, match=r"^KDSpec\.loss\.reduction='sum': the step sums"):  # before TRL builds
        FusedDistillationTrainer(model=_student(tok, teacher.config.vocab_size), teacher_model=teacher, args=args,
                                 train_dataset=_dataset(), processing_class=tok, options=KDLossOptions(reduction="sum"))
    # another vocabulary (and tokenizer) than the teacher's: TRL's own one-line refusal comes first
    with pytest.raises(ValueError, match="requires a shared vocabulary"):
        FusedDistillationTrainer(model=_student(tok, 64), teacher_model=teacher, args=args, train_dataset=_dataset(),
                                 processing_class=tok)


def test_without_trl_the_import_names_the_extra():
    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import minitron_fast.integrations.trl\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "minitron_fast.integrations.trl needs TRL: pip install minitron_fast[trl]", out
