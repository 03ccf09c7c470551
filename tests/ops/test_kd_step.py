"""The one KD step (``minitron_fast.ops.kd_step``): the losses against float64, one fused
call per step (its KD and CE parts from that pass), the teacher given as a model, as cached hidden
states or as top-k logits, and the intermediate-state pairs comparing like with like."""
from __future__ import annotations

import math

import pytest
import torch

from minitron_fast.ops import kd_step as ks
from minitron_fast.ops.kd_step import KDLossOptions, KDSpec, TeacherHidden, TopKTeacher, head_loss, kd_step
from minitron_fast.ops.kd_loss import kd_loss_reference

V = 131


def _tiny(hidden, layers, seed, tie=False, vocab=V, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, initializer_range=0.2, **extra)
    return LlamaForCausalLM(cfg).eval()


def _head(w):
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    head.weight = torch.nn.Parameter(w)
    return head


@pytest.mark.parametrize("divergence, kd_w, lm_w", [
    pytest.param("forward_kl", 1.0, 0.0, id="fkl"),
    pytest.param("reverse_kl", 0.7, 0.4, id="rkl+ce"),
    pytest.param("jsd", 1.3, 0.25, id="jsd+ce"),
    pytest.param("forward_kl", 0.0, 1.0, id="ce-only"),
])
def test_head_loss_matches_float64(divergence, kd_w, lm_w):
    torch.manual_seed(0)
    N, Hs, Ht, Vo = 37, 16, 24, 123
    hs64, ws64 = torch.randn(N, Hs, dtype=torch.float64), torch.randn(Vo, Hs, dtype=torch.float64)
    ht64, wt64 = torch.randn(N, Ht, dtype=torch.float64), torch.randn(Vo, Ht, dtype=torch.float64)
    labels = torch.randint(0, Vo, (N,))
    labels[::5] = -100
    n = float((labels != -100).sum())
    loss_opts = KDLossOptions(divergence=divergence, beta=0.3, temperature=1.5)

    # float64 truth: sum over valid rows / n of kd_w * KD + lm_w * CE, and each part alone
    zs = (hs64 @ ws64.T).requires_grad_(True)
    zt = ht64 @ wt64.T
    kd_ref = kd_loss_reference(zs, zt, labels=labels, divergence=divergence, beta=0.3, temperature=1.5)
    ce_ref = torch.nn.functional.cross_entropy(zs, labels, ignore_index=-100)
    total_ref = kd_w * kd_ref + lm_w * ce_ref
    g_ref = torch.autograd.grad(total_ref, zs)[0]
    gh_ref, gw_ref = g_ref @ ws64, g_ref.T @ hs64

    for materialized in (False, True):
        hs = hs64.float().requires_grad_(True)
        head = _head(ws64.float().clone())
        # two micro-batches, each divided by the step's token count, sum to the per-token mean
        outs = [head_loss(hs[sl], head, TeacherHidden(ht64[sl].float(), wt64.float()) if kd_w else None, labels[sl],
                          spec=KDSpec(kd_w, lm_w, materialized=materialized, loss=loss_opts), num_items=n) for sl in (slice(0, 20), slice(20, N))]
        loss = sum(o["loss"] for o in outs)
        gh, gw = torch.autograd.grad(loss, (hs, head.weight))
        torch.testing.assert_close(loss.double(), total_ref, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(gh.double(), gh_ref, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(gw.double(), gw_ref, rtol=2e-5, atol=2e-6)
        if kd_w:
            torch.testing.assert_close(sum(o["kd"] for o in outs).double(), kd_ref, rtol=2e-5, atol=2e-6)
        if lm_w:
            torch.testing.assert_close(sum(o["lm"] for o in outs).double(), ce_ref, rtol=2e-5, atol=2e-6)


def test_one_fused_call_returns_both_parts_and_no_logits(monkeypatch):
    """kd + lm from ONE fused call (the student's head is read once per step), never lm_head.forward."""
    from minitron_fast.ops import kd_loss as op

    calls = []
    real_kd, real_ce = op.fused_linear_kd_loss, op.fused_linear_cross_entropy
    monkeypatch.setattr(op, "fused_linear_kd_loss", lambda *a, **k: calls.append("kd") or real_kd(*a, **k))
    monkeypatch.setattr(op, "fused_linear_cross_entropy", lambda *a, **k: calls.append("ce") or real_ce(*a, **k))
    student, teacher = _tiny(32, 2, 0, tie=True), _tiny(48, 2, 1)
    for m in (student, teacher):
        m.get_output_embeddings().forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("logits built"))
    ids = torch.randint(0, V, (2, 13))
    out = kd_step(student, teacher, ids, spec=KDSpec(kd_weight=1.0, lm_weight=0.5))
    assert calls == ["kd"]
    assert {"loss", "kd", "lm", "tokens"} <= set(out) and int(out["tokens"]) == 2 * 12
    assert not out["kd"].requires_grad and not out["lm"].requires_grad
    torch.testing.assert_close(out["loss"].detach(), out["kd"] + 0.5 * out["lm"], rtol=1e-6, atol=1e-7)
    calls.clear()
    kd_step(student, None, ids, spec=KDSpec(kd_weight=0.0, lm_weight=1.0))  # LM only: no teacher at all
    assert calls == ["ce"]


def test_teacher_as_model_cached_hidden_states_or_full_topk_agree():
    student, teacher = _tiny(32, 2, 0), _tiny(48, 3, 1)
    ids = torch.randint(0, V, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    spec = KDSpec(loss=KDLossOptions(temperature=2.0))
    ref = kd_step(student, teacher, ids, mask, spec=spec)
    cached = ks.teacher_hidden(teacher, ids, mask)
    assert cached.hidden.shape == (3 * 10, 48)
    th_full = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state.detach()
    w = teacher.lm_head.weight.detach()
    for t in (cached, TeacherHidden(th_full, w), TeacherHidden(th_full[:, :-1], w)):
        torch.testing.assert_close(kd_step(student, t, ids, mask, spec=spec)["loss"], ref["loss"], rtol=1e-6, atol=0)
    # top-k with k = V is the whole teacher distribution
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=mask).logits
    vals, idx = zt.topk(V, dim=-1)
    topk = kd_step(student, TopKTeacher(vals, idx), ids, mask, spec=spec)
    torch.testing.assert_close(topk["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    # rows [N, k] as the offline teacher stores them
    rows = TopKTeacher(vals[:, :-1].reshape(-1, V), idx[:, :-1].reshape(-1, V))
    torch.testing.assert_close(kd_step(student, rows, ids, mask, spec=spec)["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"TopKTeacher.values has shape \(5, 131\)"):
        kd_step(student, TopKTeacher(vals[0, :5], idx[0, :5]), ids, mask, spec=spec)
    with pytest.raises(ValueError, match="a top-k teacher runs through the fused loss: materialized=True"):
        kd_step(student, TopKTeacher(vals, idx), ids, spec=KDSpec(materialized=True))


def test_topk_tail_bucket_reaches_the_op():
    """A top-k teacher with the log-sum-exp of the rest: the tail bucket makes it exact at any k."""
    student, teacher = _tiny(32, 1, 0), _tiny(48, 1, 1)
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits
    vals, idx = zt.topk(8, dim=-1)
    rest = zt.scatter(-1, idx, float("-inf")).logsumexp(-1)
    spec = KDSpec()
    renorm = kd_step(student, TopKTeacher(vals, idx), ids, spec=spec)["loss"]
    tail = kd_step(student, TopKTeacher(vals, idx, rest), ids, spec=spec)["loss"]
    # float64 truth for the tail semantics: the teacher's mass outside the top-k is one bucket,
    # against the student's mass on the same tokens
    with torch.no_grad():
        zs = student(input_ids=ids).logits[:, :-1].reshape(-1, V).double()
    lt = torch.log_softmax(zt[:, :-1].reshape(-1, V).double(), -1)
    ls = torch.log_softmax(zs, -1)
    i = idx[:, :-1].reshape(-1, 8)
    pt_k, lt_k, ls_k = lt.gather(1, i).exp(), lt.gather(1, i), ls.gather(1, i)
    lt_tail = torch.log1p(-pt_k.sum(-1))
    ls_tail = torch.log1p(-ls_k.exp().sum(-1))
    ref = ((pt_k * (lt_k - ls_k)).sum(-1) + lt_tail.exp() * (lt_tail - ls_tail)).mean()
    torch.testing.assert_close(tail.double(), ref, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(tail, renorm)


def test_decoder_states_are_raw_layer_outputs():
    """transformers 5's last hidden_states entry is the final-norm output; ours is the raw output."""
    m = _tiny(32, 3, 0)
    ids = torch.randint(0, V, (2, 7))
    final, (first, last) = ks.decoder_states(m, ids, layers=[0, 2])
    hf = m.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(first, hf[1])
    torch.testing.assert_close(final, hf[3])
    torch.testing.assert_close(m.model.norm(last), final)  # raw, before the final norm
    assert not torch.allclose(last, hf[3])


def test_intermediate_pairs_compare_like_with_like():
    """A student that is the teacher's first two layers: its last layer's raw output equals the
    teacher's layer-1 output, so the pair (student's last, teacher's layer 1) costs exactly 0. The
    old pairing took the student's final-norm output for its last layer and the teacher's raw
    output for a middle one, and was far from 0 here."""
    import copy

    teacher = _tiny(32, 3, 0)
    student = copy.deepcopy(teacher)
    student.model.layers = student.model.layers[:2]
    student.config.num_hidden_layers = 2
    ids = torch.randint(0, V, (2, 9))
    proj = torch.nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(32))
    spec = KDSpec(kd_weight=0.0, lm_weight=0.0, inter_weight=1.0)
    same = kd_step(student, teacher, ids, spec=spec, pairs=[(1, 1), (0, 0)], proj=proj)
    assert float(same["inter"]) < 1e-10
    off = kd_step(student, teacher, ids, spec=spec, pairs=[(1, 2)], proj=proj)
    assert float(off["inter"]) > 1e-3
    # the unlike pairing the old code made, for the record: final-norm student vs raw teacher layer 1
    hs = student.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    ht = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert float((hs - ht).detach().pow(2).mean()) > 1e-2
    # the loss reaches the student (and the projection) through the hooked layer outputs, with
    # activation checkpointing too (reentrant: the hooks see the checkpointed layer's own output)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            student.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        student.zero_grad()
        proj.zero_grad()
        kd_step(student, teacher, ids, spec=spec, pairs=[(1, 2)], proj=proj)["loss"].backward()
        grads.append([student.model.layers[0].mlp.down_proj.weight.grad.clone(), proj.weight.grad.clone()])
    assert grads[0][0].abs().sum() > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in teacher.parameters())


def test_softcap_and_padded_vocabulary_from_the_configs():
    """``head_options`` reads the final-logit softcap and the padded vocabulary from the configs;
    the step's loss then equals float64 on softcapped logits over the shared rows."""
    student = _tiny(32, 1, 0, vocab=V + 5, final_logit_softcapping=3.0)
    teacher = _tiny(48, 1, 1, final_logit_softcapping=3.0)
    opts = ks.head_options(student, teacher, n_tokens=V)
    assert opts == {"softcap": 3.0, "vocab_size": V}
    ids = torch.randint(0, V, (2, 10))
    spec = KDSpec(lm_weight=0.5, loss=KDLossOptions(**opts))
    with torch.no_grad():
        zs = student(input_ids=ids).logits[:, :-1, :V].reshape(-1, V).double()
        zt = teacher(input_ids=ids).logits[:, :-1].reshape(-1, V).double()
    # transformers' Llama does not cap its logits; the cap is the loss's job here
    zs, zt = 3.0 * torch.tanh(zs / 3.0), 3.0 * torch.tanh(zt / 3.0)
    labels = ids[:, 1:].reshape(-1)
    ref = kd_loss_reference(zs, zt, labels=labels, hard_label_weight=0.5)
    for materialized in (False, True):
        out = kd_step(student, teacher, ids, spec=KDSpec(lm_weight=0.5, materialized=materialized,
                                                         loss=KDLossOptions(**opts)))
        torch.testing.assert_close(out["loss"].double(), ref, rtol=2e-5, atol=2e-6)
    with pytest.raises(ks.KDSetupError, match="softcap is None but the student's 3.0"):
        ks.head_options(student, _tiny(48, 1, 1))
    with pytest.raises(ks.KDSetupError, match=r"tokenizer has 136 tokens but the teacher vocabulary only 131"):
        ks.head_options(student, teacher, n_tokens=V + 5)
    assert math.isclose(float(kd_step(student, teacher, ids, spec=spec)["loss"]), float(ref), rel_tol=2e-5)


def test_gemma2_softcap_reaches_the_loss(tiny_builders):
    """A real Gemma-2 pair: the step (decoders only, the cap from the configs) equals float64 on
    the logits stock transformers computes, which carry Gemma's final-logit softcap."""
    torch.manual_seed(0)
    teacher = tiny_builders["gemma2"](initializer_range=0.2)
    student = tiny_builders["gemma2"](hidden_size=48, num_hidden_layers=2, initializer_range=0.2)
    opts = ks.head_options(student, teacher)
    assert opts == {"softcap": 3.0, "vocab_size": None}
    ids = torch.randint(0, 137, (2, 11))
    with torch.no_grad():
        zs = student(input_ids=ids).logits[:, :-1].reshape(-1, 137)
        zt = teacher(input_ids=ids).logits[:, :-1].reshape(-1, 137)
    assert zs.abs().max() <= 3.0  # transformers applied the cap
    ref = kd_loss_reference(zs, zt, labels=ids[:, 1:].reshape(-1), temperature=2.0, hard_label_weight=0.3)
    for materialized in (False, True):
        out = kd_step(student, teacher, ids, spec=KDSpec(lm_weight=0.3, materialized=materialized,
                                                         loss=KDLossOptions(temperature=2.0, **opts)))
        torch.testing.assert_close(out["loss"].double(), ref, rtol=2e-5, atol=2e-6)
    uncapped = kd_step(student, teacher, ids, spec=KDSpec(lm_weight=0.3, loss=KDLossOptions(temperature=2.0)))["loss"]
    assert abs(float(uncapped) - float(ref)) > 1e-3  # without the cap it is another objective
