"""Host reads in the KD step (issue 23, defect 11): one micro-batch's forward and backward through
``kd_step`` reads tensor values on the host at most twice, however many loss chunks it runs.

On a GPU every ``.item()``, ``.tolist()``, ``bool()``, ``int()``, ``float()`` or ``__index__`` of a
device tensor blocks the host until the device has drained its queue. Before the fix this step made
7 such reads with one loss chunk (9 with a top-k teacher) and one more per chunk (a ``bool(any())``
to skip all-ignored chunks), 25-30 per micro-batch at real sizes: the valid-token count twice, the
label and top-k index checks, a tensor ``num_items``, and ``bool(grad_output == 1)`` in backward. Now the fused
loss reads once per call (``options.DeviceReads``: its checks, ``num_items`` and each chunk's
valid-token count in one transfer) and never in backward.

These tests run on the CPU, where there is no device to wait for: they count **every** such call
on any tensor during the step, a proxy for the syncs the same code makes on a GPU (the calls are
the same code path). The counter wraps the Python-level methods of ``torch.Tensor``, so a read
torch makes inside C++ would go unseen; the first test checks that the counter sees each kind of
read. The step's one read is the op's: transformers' mask code, which read once per decoder forward
(``find_packed_sequence_indices``; ``_ignore_causal_mask_sdpa`` with an all-ones mask), is skipped
for full blocks on full-attention SDPA models (``kd_step._MaskFree``), so a
live teacher adds none.
"""
from __future__ import annotations

import traceback

import pytest
import torch

from minitron_fast.ops.kd_step import KDLossOptions, KDSpec, TeacherHidden, TopKTeacher, kd_step
from minitron_fast.ops.kd_loss import KDInputError, fused_linear_cross_entropy, fused_linear_kd_loss
from minitron_fast.ops.kd_loss.sources import LinearSource

pytestmark = pytest.mark.usefixtures("one_thread")

_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
V = 131


@pytest.fixture
def host_reads(monkeypatch):
    """The list of host reads made while the test runs: ``(method, where)`` per call."""
    log = []

    def counting(name, fn):
        def read(self, *args, **kwargs):
            log.append((name, "".join(traceback.format_stack(limit=4)[:-1])))
            return fn(self, *args, **kwargs)
        return read

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return log


def _where(log):
    return "\n".join(f"{name}:\n{where}" for name, where in log)


def _cpp_or_skip(impl):
    if impl == "cpp":
        from minitron_fast._ext import _C

        if _C is None:
            pytest.skip("minitron_fast._C is not built")


def test_the_counter_sees_every_kind_of_host_read(host_reads):
    t = torch.tensor([3, 0, 2])
    bool(t.any()), int(t.sum()), float(t.max()), t.sum().item(), t.tolist(), list(range(t[0]))
    if t.all():  # an implicit bool()
        pass
    assert [n for n, _ in host_reads] == ["__bool__", "__int__", "__float__", "item", "tolist", "__index__",
                                          "__bool__"]


def _tiny(hidden, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return _tiny(32, 0), _tiny(48, 1)


@pytest.mark.parametrize("teacher_form", ["hidden", "topk"])
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_kd_step_reads_the_host_at_most_twice_whatever_the_chunk_count(host_reads, models, impl, teacher_form):
    _cpp_or_skip(impl)
    student, teacher = models
    B, T = 4, 17  # N = 64 next-token rows: 2 chunks of 32, or 8 of 8
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[1, 5:] = -100  # a partly ignored chunk
    labels[3] = -100  # and, at 8 rows a chunk, two wholly ignored ones (skipped)
    with torch.no_grad():
        th = teacher.model(input_ids=ids).last_hidden_state
        vals, idx = teacher.lm_head(th).topk(8, dim=-1)
    t = TeacherHidden(th, teacher.lm_head.weight.detach()) if teacher_form == "hidden" else TopKTeacher(vals, idx)
    counts, losses = {}, {}
    for n_chunks in (2, 8):
        spec = KDSpec(lm_weight=0.5, loss=KDLossOptions(impl=impl, chunk_size=B * (T - 1) // n_chunks))
        student.zero_grad()
        host_reads.clear()
        out = kd_step(student, t, ids, labels=labels, spec=spec)
        out["loss"].backward()
        counts[n_chunks] = len(host_reads)
        assert counts[n_chunks] <= 2, f"{counts[n_chunks]} host reads with {n_chunks} chunks:\n{_where(host_reads)}"
        losses[n_chunks] = out["loss"].detach()
        assert student.lm_head.weight.grad.abs().sum() > 0
    assert counts[2] == counts[8], f"the host reads grow with the chunk count: {counts}"
    torch.testing.assert_close(losses[2], losses[8], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call", ["kd-hidden", "kd-topk", "kd-tensor-num_items", "ce"])
@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_the_fused_loss_reads_once_in_forward_never_in_backward(host_reads, monkeypatch, impl, call):
    """One read per forward (checks, ``num_items``, per-chunk counts), none in backward, and the
    wholly ignored chunks still skipped (never filled) without a read of their own."""
    _cpp_or_skip(impl)
    N, H, chunk = 70, 16, 8
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    th, tW = torch.randn(N, 12), torch.randn(V, 12)
    labels = torch.randint(0, V, (N,))
    labels[::3] = -100
    labels[16:40] = -100  # chunks 2, 3 and 4 wholly ignored
    filled = []
    fill = LinearSource.fill
    monkeypatch.setattr(LinearSource, "fill", lambda self, out, c0, *a: filled.append(c0) or fill(self, out, c0, *a))
    kw = dict(labels=labels, chunk_size=chunk, impl=impl)
    if call == "ce":
        loss = fused_linear_cross_entropy(h, W, **kw)
    elif call == "kd-topk":
        loss = fused_linear_kd_loss(h, W, teacher_topk=(th @ tW.t()).topk(5, dim=-1), hard_label_weight=0.5, **kw)
    else:
        items = torch.tensor(55.0) if call == "kd-tensor-num_items" else None
        loss = fused_linear_kd_loss(h, W, th, tW, hard_label_weight=0.5, num_items=items, **kw)
    assert len(host_reads) == 1, _where(host_reads)
    host_reads.clear()
    (loss * 2.0).backward()
    assert not host_reads, _where(host_reads)
    assert h.grad.abs().sum() > 0
    kept = sorted(set(filled))
    assert kept == [c0 for c0 in range(0, N, chunk) if not 16 <= c0 < 40]


def test_a_tensor_num_items_is_checked_when_read():
    h, W, th, tW = torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 6), torch.randn(10, 6)
    with pytest.raises(KDInputError, match="num_items must be positive"):
        fused_linear_kd_loss(h, W, th, tW, num_items=torch.tensor(0.0))
    with pytest.raises(KDInputError, match="num_items must be a positive number or a one-element"):
        fused_linear_kd_loss(h, W, th, tW, num_items=torch.tensor([3.0, 4.0]))
    loss = fused_linear_kd_loss(h, W, th, tW, num_items=torch.tensor(8))
    torch.testing.assert_close(loss * 8, fused_linear_kd_loss(h, W, th, tW, reduction="sum"))


def _live_pair(attn="sdpa", **cfg_kw):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    def make(hidden, seed):
        torch.manual_seed(seed)
        cls = MistralConfig if "sliding_window" in cfg_kw else LlamaConfig
        cfg = cls(vocab_size=V, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
                  **cfg_kw)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    return make(32, 0), make(48, 1)


def test_a_live_teacher_step_reads_the_host_once_and_equals_the_masked_path(host_reads):
    """Student and live teacher on SDPA, full blocks: the step's only read is the fused loss's; its
    loss and gradients equal the same step through transformers' own mask code (an all-ones
    attention_mask, which takes that path)."""
    student, teacher = _live_pair()
    ids = torch.randint(0, V, (3, 13))
    spec = KDSpec(lm_weight=0.5, loss=KDLossOptions(impl="torch", chunk_size=8))
    host_reads.clear()
    out = kd_step(student, teacher, ids, spec=spec)
    out["loss"].backward()
    assert len(host_reads) == 1, _where(host_reads)
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ref = kd_step(student, teacher, ids, attention_mask=torch.ones_like(ids), spec=spec)
    ref["loss"].backward()
    torch.testing.assert_close(out["loss"].detach(), ref["loss"].detach(), rtol=1e-6, atol=1e-7)
    for g, p in zip(grads, student.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("case", ["eager", "sliding_window"])
def test_models_that_need_their_mask_keep_it(host_reads, case):
    """Eager attention needs an explicit causal mask, a sliding window its band: neither runs
    mask-free (transformers' mask code runs, with its read), and the result is the stock forward's."""
    from minitron_fast.ops.kd_step import _causal_alias, decoder_states

    kw = {"attn": "eager"} if case == "eager" else {"sliding_window": 4}
    student, _ = _live_pair(**kw)
    assert _causal_alias(student.config) is None
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        host_reads.clear()
        h, _ = decoder_states(student, ids)
        assert host_reads, "transformers' mask code should have run"
        torch.testing.assert_close(h, student.model(input_ids=ids).last_hidden_state)


def test_the_attention_implementation_is_restored_when_the_forward_raises():
    from minitron_fast.ops.kd_step import decoder_states

    student, _ = _live_pair()
    with pytest.raises(Exception):
        decoder_states(student, torch.full((1, 5), V + 10))  # an id past the vocabulary
    assert student.config._attn_implementation == "sdpa"
