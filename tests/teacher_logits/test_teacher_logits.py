"""Offline teacher logits: the shard format, the writer (resume, bad input) and training from them.

- unit: the row form and codec (16-, 17- and 32-bit ids) against float64 full logits; truncation
  of stored rows; stored rows through the KD step against float64 references of both semantics;
- writer: a tiny teacher with the real SmolLM2 tokenizer writes a few blocks; rows read back equal
  the teacher's float64 logits (up to bf16 rounding); a killed write resumes and recomputes only
  the missing shards; manifest mismatches and a truncated shard fail in one line;
- trainer (one subprocess, runs back to back): stored logits give the same loss curve as the live
  teacher truncated to the same top-k, under ZeRO-0 to 3, and across a resume;
- pipeline: ``distill.teacher: offline`` runs the stage before distill, and a rerun is cached.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minitron_fast.artifacts import teacher_logits as tl
from minitron_fast.ops.kd_step import IGNORE_INDEX
from minitron_fast.ops.kd_loss import kd_loss_reference
from tests import ROOT

torch.set_float32_matmul_precision("highest")


def _ref_rows(z: torch.Tensor, k: int):
    """float64 reference: log-probs, their top-k, and the log-mass of the rest."""
    lp = torch.log_softmax(z.double(), -1)
    v, i = lp.topk(k, -1)
    rest = lp.scatter(-1, i, -math.inf).logsumexp(-1)
    return lp, v, i, rest


# -- the row form and codec -------------------------------------------------------------------------

@pytest.mark.parametrize("V,k", [pytest.param(131, 13, id="V131-k13-u16"), pytest.param(131, 131, id="V131-k=V"),
                                 pytest.param(70_001, 64, id="V70001-k64-17bit"),
                                 pytest.param(140_000, 9, id="V140000-k9-int32")])
def test_shard_round_trip_vs_float64_logits(tmp_path, V, k):
    torch.manual_seed(0)
    n = 5
    z = torch.randn(2, n, V, dtype=torch.float64) * 4
    z[..., V - 3] += 12  # a peaked row tail: ids above 2**16 among the top-k
    v, i, t = tl.topk_rows(z.reshape(-1, V).float().clone(), k)
    enc = tl.encode(v.view(2, n, k), i.view(2, n, k), t.view(2, n), V)
    assert enc["values"].dtype == torch.bfloat16
    bits = tl.index_bits(V)
    assert enc["indices"].dtype == {16: torch.uint16, 17: torch.uint16, 32: torch.int32}[bits]
    assert ("indices_hi" in enc) == (bits == 17)
    size = tl.write_shard(tmp_path / "s.safetensors", enc, torch.arange(2), first_block=0, run_id="r")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        got = {name: f.get_slice(name)[1:2] for name in enc}
    dv, di, dt = tl.decode(got, k)
    lp, rv, ri, rest = _ref_rows(z[1], k)
    assert torch.equal(di[0], ri)                                   # ids exact (sorted, no ties here)
    assert (dv[0].double() - rv).abs().max() <= 2 ** -8 * rv.abs().max() + 1e-7  # bf16 rounding only
    if k == V:
        assert torch.isinf(dt).all() and (dt < 0).all()
    else:
        torch.testing.assert_close(dt[0].double(), rest, rtol=1e-5, atol=1e-5)
    rows = 2 * n
    assert size - 600 < rows * tl.bytes_per_row(k, V) + 8 * 2 <= size  # the header is the only overhead


def test_storage_goal_at_k64():
    assert tl.bytes_per_row(64, 49_152) == 260
    assert tl.bytes_per_row(64, 131_072) == 268
    assert tl.bytes_per_row(64, 128_256) <= 300 < 384  # int32 ids with bf16 values would take 388


def test_truncated_rows_equal_a_smaller_top_k():
    torch.manual_seed(1)
    z = torch.randn(7, 97, dtype=torch.float64) * 3
    v, i, t = tl.topk_rows(z.clone(), 40)
    v8, i8, t8 = tl.truncate_rows(v, i, t, 8)
    r8 = tl.topk_rows(z.clone(), 8)
    assert torch.equal(i8, r8[1])
    torch.testing.assert_close(v8, r8[0])
    torch.testing.assert_close(t8, r8[2])


def _head_loss(h, W, v, i, t, labels, *, divergence, temperature, num_items):
    """The trainer's loss path: the one KD step's head loss with a top-k teacher."""
    from minitron_fast.ops.kd_step import KDLossOptions, KDSpec, TopKTeacher, head_loss

    head = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    head.weight.data.copy_(W)
    head.weight.requires_grad_(False)
    return head_loss(h, head, TopKTeacher(v, i, t), labels, num_items=num_items,
                     spec=KDSpec(loss=KDLossOptions(divergence=divergence, temperature=temperature)))["loss"]


@pytest.mark.parametrize("semantics,divergence", [  # reverse KL is infinite against a renormalized top-k
    ("tail", "forward_kl"), ("tail", "jsd"), ("tail", "reverse_kl"), ("renorm", "forward_kl"), ("renorm", "jsd")])
def test_stored_rows_through_the_kd_step_match_float64(divergence, semantics):
    """Stored rows (bf16 values, packed ids, tail) fed to the KD step give the documented
    semantics: renorm = the fused loss's top-k reference; tail = k + 1 buckets, by hand."""
    torch.manual_seed(2)
    N, V, H, k, T = 23, 131, 16, 9, 2.0
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64)
    lab = torch.randint(0, V, (N,))
    lab[3] = IGNORE_INDEX
    v, i, t = tl.decode(tl.encode(*tl.topk_rows(torch.randn(N, V, dtype=torch.float64) * 3, k), V), k)
    v, t = v.double(), t.double()
    if semantics == "renorm":
        ref = kd_loss_reference(h @ W.T, teacher_topk=(v, i), labels=lab, divergence=divergence, temperature=T)
    else:
        lt = torch.log_softmax(torch.cat([v, t[:, None]], 1) / T, 1)
        ls_full = torch.log_softmax(h @ W.T / T, 1)
        ls = torch.cat([ls_full.gather(1, i), ls_full.scatter(1, i, -math.inf).logsumexp(1, keepdim=True)], 1)
        pt, ps = lt.exp(), ls.exp()
        rows = {"forward_kl": (pt * (lt - ls)).sum(1), "reverse_kl": (ps * (ls - lt)).sum(1)}.get(divergence)
        if rows is None:
            lm = torch.logaddexp(lt + math.log(0.5), ls + math.log(0.5))
            rows = 0.5 * (pt * (lt - lm)).sum(1) + 0.5 * (ps * (ls - lm)).sum(1)
        ref = (rows * (lab != IGNORE_INDEX)).sum() / (N - 1)
    (g_ref,) = torch.autograd.grad(ref, h)
    hh = h.detach().float().requires_grad_()
    got = _head_loss(hh, W.float(), v.float(), i, None if semantics == "renorm" else t.float(), lab,
                     divergence=divergence, temperature=T, num_items=N - 1)
    (g,) = torch.autograd.grad(got, hh)
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(g.double(), g_ref, rtol=2e-4, atol=2e-5)


def test_tail_at_full_k_is_the_full_teacher():
    torch.manual_seed(3)
    h, W, zt = torch.randn(6, 8), torch.randn(50, 8), torch.randn(6, 50, dtype=torch.float64) * 2
    v, i, t = tl.topk_rows(zt.clone(), 50)
    got = _head_loss(h, W, v.float(), i, t.float(), torch.arange(6), divergence="forward_kl", temperature=1.0,
                     num_items=6)
    torch.testing.assert_close(got.double(), kd_loss_reference((h @ W.T).double(), zt), rtol=1e-5, atol=1e-6)


# -- the writer ------------------------------------------------------------------------------------------

SEQ = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_model_dir):
    """A tiny teacher (peaked logits) and a narrower student sharing the real SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron_fast.models.export import copy_tokenizer_files

    root = tmp_path_factory.mktemp("tl_models")
    for seed, (name, h, f, tied, std) in enumerate([("teacher", 64, 128, False, 0.2), ("student", 48, 96, True, 0.02)]):
        torch.manual_seed(seed + 1)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=h, intermediate_size=f, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=tied, initializer_range=std))
        m.save_pretrained(root / name)
        copy_tokenizer_files(demo_model_dir, root / name)
    return root


def _write(tiny, out, *, module=None, **kw):
    """Writes the tiny teacher's logits of 16 demo train blocks (4 shards of 5, 5, 5, 1 blocks)."""
    from minitron_fast.teacher_logits import TeacherLogitsConfig
    from minitron_fast.teacher_logits import run as run_mod

    d = dict(top_k=16, seq_len=SEQ, samples=16, batch_size=4, shard_tokens=5 * (SEQ - 1), device="cpu")
    d.update(kw)
    return (module or run_mod).write_teacher_logits(str(tiny / "teacher"), "demo", out=out,
                                                    config=TeacherLogitsConfig(**d), progress=False)


@pytest.fixture(scope="module")
def written(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tl") / "logits"
    return out, _write(tiny, out)


@pytest.mark.slow
def test_written_rows_match_the_teacher_in_float64(tiny, written):
    from minitron_fast.data import token_blocks
    from minitron_fast.models.loading import load_model, load_tokenizer

    out, m = written
    assert m["n_blocks"] == 16 and len(m["shards"]) == 4 and m["index_bits"] == 16 and m["form"] == "log_softmax"
    assert m["bytes_per_token"] <= tl.bytes_per_row(16, 49152) * 1.1
    reader = tl.TeacherLogits(out)
    blocks = token_blocks(load_tokenizer(tiny / "teacher"), "demo", "train", SEQ, max_blocks=16)
    want = [13, 0, 7]  # across shards, out of order
    v, i, t = reader.rows(want)
    assert v.shape == (3, SEQ - 1, 16) and i.dtype == torch.int64 and t.shape == (3, SEQ - 1)
    model = load_model(tiny / "teacher", dtype=torch.float64)
    with torch.no_grad():
        z = model(blocks[want]).logits[:, :-1]
    lp, rv, ri, rest = _ref_rows(z, 16)
    stored_lp = lp.gather(-1, i)
    assert (v.double() - stored_lp).abs().max() <= 2 ** -8 * stored_lp.abs().max()  # values: bf16 of the truth
    assert (stored_lp[..., -1] >= rv[..., -1] - 1e-6).all()       # ids: the top-k (up to fp32 near-ties)
    assert (stored_lp[..., :-1] >= stored_lp[..., 1:] - 1e-6).all()  # sorted descending
    torch.testing.assert_close(t.double(), rest, rtol=1e-4, atol=1e-4)
    assert torch.equal(reader.block_hashes(), tl.block_hashes(blocks))


@pytest.mark.slow
def test_killed_write_resumes_only_missing_shards(tiny, written, tmp_path, monkeypatch):
    from minitron_fast.teacher_logits import run as run_mod

    out = tmp_path / "logits"
    real_write, calls = tl.write_shard, []

    def dies_after_two(path, *a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        calls.append(Path(path).name)
        return real_write(path, *a, **kw)

    monkeypatch.setattr(tl, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _write(tiny, out)
    assert not (out / tl.MANIFEST).exists() and sorted(p.name for p in out.glob("shard-*")) == calls
    assert not list(out.glob(".*tmp*"))  # nothing half-written left behind
    with pytest.raises(tl.TeacherLogitsError, match="no manifest.json.*interrupted"):
        tl.TeacherLogits(out)
    monkeypatch.setattr(tl, "write_shard", real_write)
    blocks_seen = []
    real_rows = run_mod.teacher_rows
    monkeypatch.setattr(run_mod, "teacher_rows", lambda m, ids, k: blocks_seen.append(len(ids)) or real_rows(m, ids, k))
    m = _write(tiny, out)
    assert m["status"] == "resumed" and sum(blocks_seen) == 16 - 10  # shards 0-1 (10 blocks) were kept
    from safetensors.torch import load_file

    for s in written[1]["shards"]:  # identical to the uninterrupted write
        a, b = load_file(out / s["file"]), load_file(written[0] / s["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert _write(tiny, out)["status"] == "complete"


@pytest.mark.slow
def test_bad_input(tiny, written, tmp_path):
    from minitron_fast.models.loading import load_tokenizer

    out, m = written
    reader = tl.TeacherLogits(out)
    tok = tl.tokenizer_digest(load_tokenizer(tiny / "student"))
    good = dict(seq_len=SEQ, tokenizer_digest=tok, vocab_size=49152, data_source="demo", text_field="text",
                teacher_digest=tl.model_digest(tiny / "teacher"))
    reader.check_run(tl.RunIdentity(**good), reader.block_hashes()[:10])
    bad = {"seq_len": (dict(seq_len=64), "seq_len 32 but this run uses seq_len 64"),
           "tokenizer": (dict(tokenizer_digest="0" * 16), "another tokenizer"),
           "teacher": (dict(teacher_digest=tl.model_digest(tiny / "student")), "another teacher"),
           "data": (dict(data_source="other.txt"), "data source 'demo'"),
           "vocab": (dict(vocab_size=49000), "49152-token vocabulary")}
    for name, (change, msg) in bad.items():
        with pytest.raises(tl.TeacherLogitsError, match=msg) as e:
            reader.check_run(tl.RunIdentity(**{**good, **change}))
        assert "\n" not in str(e.value), name
    other = reader.block_hashes()[:10].clone()
    other[4] += 1
    with pytest.raises(tl.TeacherLogitsError, match="train block 4 holds different tokens"):
        reader.check_run(tl.RunIdentity(**good), other)
    with pytest.raises(tl.TeacherLogitsError, match=r"reads 20 train blocks .* hold 16 blocks \(496 tokens\)"):
        reader.check_run(tl.RunIdentity(**good), torch.zeros(20, dtype=torch.int64))
    with pytest.raises(tl.TeacherLogitsError, match="block 16 is not stored.*0..15"):
        reader.rows([16])
    # the writer: other inputs into the same directory; more samples than the split holds
    with pytest.raises(tl.TeacherLogitsError, match="other inputs .*top_k: 16 -> 8"):
        _write(tiny, out, top_k=8)
    with pytest.raises(tl.TeacherLogitsError, match=r"holds only \d+ blocks of 32 tokens; ask for at most"):
        _write(tiny, tmp_path / "x", samples=10**6)
    # a truncated shard: named, never read as zeros
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shard = cut / m["shards"][2]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(tl.TeacherLogitsError, match=f"shard {shard} is truncated or damaged"):
        tl.TeacherLogits(cut)


# -- training from stored logits (one subprocess) -----------------------------------------------------------

WORKER = """
import json, sys
from minitron_fast.distill import load_config, train
from minitron_fast.errors import MinitronError
for run in json.load(open(sys.argv[1])):
    try:
        res = train(load_config(None, run["overrides"]), resume=run.get("resume", False), progress=False)
        line = {"name": run["name"], "ok": True, "result": res}
    except MinitronError as exc:
        line = {"name": run["name"], "ok": False, "error": str(exc)}
    print("RESULT " + json.dumps(line), flush=True)
from minitron_fast.distill.engine import exit_process
exit_process(0)
"""


@pytest.fixture(scope="module")
def trained(tiny, written, tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("tl_train")
    logits = written[0]

    def ov(out, **kw):
        d = {"teacher": tiny / "teacher", "student": tiny / "student", "out": root / out, "steps": 4,
             "micro_batch_size": 2, "grad_accum": 2, "data.seq_len": SEQ, "data.max_blocks": 16,
             "data.eval_blocks": 2, "eval_every": 100, "save_every": 2, "lr": 3e-3, "warmup_steps": 0,
             "schedule": "constant", "export": False, "threads": 1, "loss.topk": 8, "ds.zero_stage": 0}
        d.update(kw)
        return [f"{k}={v}" for k, v in d.items() if v is not None]

    runs = [
        {"name": "live", "overrides": ov("live")},
        {"name": "offline", "overrides": ov("offline", teacher=None, teacher_logits=logits)},
        {"name": "offline_z3", "overrides": ov("offline_z3", teacher_logits=logits,
                                               **{"ds.zero_stage": 3, "ds.persistence_threshold": 0})},
        {"name": "live_renorm", "overrides": ov("live_renorm", **{"loss.topk_semantics": "renorm"})},
        {"name": "offline_renorm", "overrides": ov("offline_renorm", teacher_logits=logits,
                                                   **{"loss.topk_semantics": "renorm", "ds.zero_stage": 1})},
        {"name": "resume_a", "overrides": ov("resumed", teacher=None, teacher_logits=logits, steps=2,
                                             **{"ds.zero_stage": 2})},
        {"name": "resume_b", "resume": True, "overrides": ov("resumed", teacher=None, teacher_logits=logits,
                                                             **{"ds.zero_stage": 2})},
        {"name": "bad_seq", "overrides": ov("bad_seq", teacher=None, teacher_logits=logits, **{"data.seq_len": 64})},
        {"name": "too_many", "overrides": ov("too_many", teacher=None, teacher_logits=logits,
                                             **{"data.max_blocks": 40})},
    ]
    spec = root / "runs.json"
    spec.write_text(json.dumps([{**r, "overrides": [str(o) for o in r["overrides"]]} for r in runs]))
    (root / "worker.py").write_text(WORKER)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, str(root / "worker.py"), str(spec)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    res = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[7:])
            res[rec["name"]] = rec
    assert proc.returncode == 0 and len(res) == len(runs), proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, res


def _curve(root: Path, name: str) -> list[float]:
    recs = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.slow
def test_stored_logits_train_like_the_live_top_k_teacher(trained):
    root, res = trained
    for name in ("live", "offline", "offline_z3", "live_renorm", "offline_renorm", "resume_a", "resume_b"):
        assert res[name]["ok"], (name, res[name])
    live = _curve(root, "live")
    assert len(live) == 4 and live[-1] < live[0]
    # the same teacher rows (stored vs recomputed online, both rounded the same way): the same curve
    torch.testing.assert_close(_curve(root, "offline"), live, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_curve(root, "offline_z3"), live, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_curve(root, "offline_renorm"), _curve(root, "live_renorm"), rtol=1e-4, atol=1e-5)
    assert abs(_curve(root, "offline_renorm")[0] - live[0]) > 1e-3  # the semantics option does change the loss
    # ZeRO-2, stopped after step 2 and resumed: the uninterrupted (ZeRO-0) curve
    torch.testing.assert_close(_curve(root, "resumed"), _curve(root, "offline"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trainer_refuses_mismatched_logits_in_one_line(trained):
    _, res = trained
    assert not res["bad_seq"]["ok"] and "seq_len 32 but this run uses seq_len 64" in res["bad_seq"]["error"]
    assert not res["too_many"]["ok"] and "reads 40 train blocks" in res["too_many"]["error"]
    assert "hold 16 blocks (496 tokens)" in res["too_many"]["error"]


# -- the pipeline: distill.teacher: offline ----------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_offline_teacher_stage_is_cached_by_its_inputs(tmp_path):
    from bench.common import make_tiny_teacher
    from minitron_fast.pipeline.recipe import RecipeError, load_recipe
    from minitron_fast.pipeline.runner import run_recipe
    from tests.pipeline.test_pipeline import TRAIN

    teacher = make_tiny_teacher(tmp_path / "teacher")
    p = tmp_path / "r.yaml"
    p.write_text(f"""
teacher: {teacher}
out: {tmp_path / 'run'}
data: {{source: demo, seq_len: 32}}
importance: {{samples: 4, batch_size: 4}}
prune: {{target: "ffn=64"}}
distill: {{teacher: offline, steps: 2, {TRAIN}}}
teacher_logits: {{top_k: 8}}
evaluate: {{eval_blocks: 2, batch_size: 2}}
""")
    logs: list[str] = []
    rep = run_recipe(load_recipe(p), progress=False, log=logs.append)["report"]
    assert math.isfinite(rep["distilled_ppl"])
    run = tmp_path / "run"
    m = json.loads((run / "teacher_logits" / "logits" / "manifest.json").read_text())
    assert m["top_k"] == 8 and m["n_blocks"] == 16 and m["seq_len"] == 32  # the blocks distill reads
    trainer = json.loads(json.dumps(__import__("yaml").safe_load((run / "distill" / "trainer.yaml").read_text())))
    assert trainer["teacher_logits"] == str(run / "teacher_logits" / "logits") and "teacher" not in \
        {k for k, v in trainer.items() if v == "offline"}
    order = [m_.split("]")[0][1:] for m_ in logs if m_.startswith("[") and "] running" in m_]
    assert order.index("teacher_logits") < order.index("distill")
    logs.clear()
    run_recipe(load_recipe(p), progress=False, log=logs.append)  # the same inputs: nothing reruns
    assert any(m_.startswith("[teacher_logits] cached") for m_ in logs)
    assert any(m_.startswith("[distill] cached") for m_ in logs)
    # its cache key: the stage's config (not where it writes or how fast) + the teacher's identity
    from minitron_fast.pipeline.recipe import teacher_logits_config

    from minitron_fast.pipeline.runner import PipelineRunner

    def key(*ov):
        return PipelineRunner(load_recipe(p, list(ov)), out=tmp_path / "k").stage_inputs("teacher_logits", upstream={})

    assert key() != key("teacher_logits.top_k=4") and key()["config"]["samples"] == 16
    assert key()["config"]["seq_len"] == 32
    with pytest.raises(RecipeError, match="distill.teacher='maybe' is not one of online, offline"):
        load_recipe(p, ["distill.teacher=maybe"])
    with pytest.raises(RecipeError, match="teacher_logits.seq_len=16 differs from data.seq_len=32"):
        load_recipe(p, ["teacher_logits.seq_len=16"])


@pytest.mark.parametrize("vocab", [128_256, 131_072, 50_000, 2**20], ids=lambda v: f"V{v}")
def test_live_top_k_teacher_keeps_its_rows_on_the_model_device(vocab, monkeypatch):
    """The live top-k teacher rounds its rows as the stored ones are (encode -> decode) on the
    teacher's device: at 17-bit vocabularies (Llama-3.x, Mistral-NeMo) the bit-16 packing once mixed
    in a CPU ``arange``, which crashes on CUDA. On the meta device, mixing in a CPU tensor raises as
    CUDA would."""
    from types import SimpleNamespace

    from minitron_fast.artifacts import teacher_logits as tl
    from minitron_fast.distill.teacher import LiveTeacher

    B, L, k = 2, 3, 5
    meta = torch.device("meta")
    rows = (torch.empty(B, L, k, device=meta), torch.empty(B, L, k, dtype=torch.int64, device=meta),
            torch.empty(B, L, device=meta))
    monkeypatch.setattr(tl, "model_rows", lambda model, ids, topk, gather=None: rows)
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))
    teacher = LiveTeacher(model, topk=k).for_batch(torch.empty(B, L, dtype=torch.int64, device=meta), torch.arange(B))
    assert teacher.indices.device == meta and teacher.values.device == meta and teacher.indices.shape == (B * L, k)


def test_bit16_packing_round_trips_ids_above_65535():
    from minitron_fast.artifacts import teacher_logits as tl

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 131_072, (4, 7, 13), generator=g)
    idx[0, 0, :3] = torch.tensor([65_535, 65_536, 131_071])
    vals, tail = torch.randn(4, 7, 13, generator=g), torch.randn(4, 7, generator=g)
    v, i, t = tl.decode(tl.encode(vals, idx, tail, 131_072), 13)
    assert torch.equal(i, idx) and torch.equal(t, tail)


@pytest.mark.slow
def test_pipeline_reads_stored_logits_checked_before_any_stage(tmp_path, capsys):
    """``distill.stored_logits``: logits written earlier are checked by ``run --check`` (and by
    the stage) against the teacher and the data, then read: no teacher_logits write, distill
    trains on them. Each mismatch is one line naming the key."""
    from bench.common import make_tiny_teacher
    from minitron_fast.cli import main
    from minitron_fast.pipeline.recipe import RecipeError, load_recipe
    from minitron_fast.pipeline.runner import run_recipe
    from minitron_fast.teacher_logits import TeacherLogitsConfig, write_teacher_logits
    from tests.pipeline.test_pipeline import TRAIN

    teacher = make_tiny_teacher(tmp_path / "teacher")
    stored = tmp_path / "stored"
    write_teacher_logits(str(teacher), "demo", out=stored, config=TeacherLogitsConfig(top_k=8, seq_len=32, samples=16),
                         progress=False)
    p = tmp_path / "r.yaml"
    p.write_text(f"""
teacher: {teacher}
out: {tmp_path / 'run'}
data: {{source: demo, seq_len: 32}}
importance: {{samples: 4, batch_size: 4}}
prune: {{target: "ffn=64"}}
distill: {{teacher: offline, stored_logits: {stored}, steps: 2, {TRAIN}}}
evaluate: {{eval_blocks: 2, batch_size: 2}}
""")

    def check(*ov):
        rc = main(["run", str(p), "--check", *ov])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
        return rc, err

    rc, err = check()
    assert (rc, err) == (0, []), err
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Paragraph {i} of other words, enough of them to fill blocks." for i in range(400)))
    wide = tmp_path / "wide"
    shutil.copytree(teacher, wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(dict(cfg, vocab_size=cfg["vocab_size"] + 8)))
    for ov, what in ((["data.seq_len=16"], "seq_len"), ([f"data.source={other}"], "data source"),
                     ([f"teacher={wide}"], "vocabulary"), (["distill.data.max_blocks=40"], "hold 16 blocks"),
                     ([f"distill.stored_logits={tmp_path / 'nowhere'}"], "does not exist")):
        rc, err = check(*ov)
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: distill.stored_logits: ") and what in err[0], \
            (ov, err)
    with pytest.raises(RecipeError, match="needs distill.teacher: offline"):
        load_recipe(p, ["distill.teacher=online"])
    with pytest.raises(RecipeError, match="correct_teacher.enabled"):
        load_recipe(p, ["correct_teacher.enabled=true"])

    logs: list[str] = []
    rep = run_recipe(load_recipe(p), progress=False, log=logs.append)["report"]
    assert math.isfinite(rep["distilled_ppl"])
    run = tmp_path / "run"
    assert not (run / "teacher_logits" / "logits").exists()  # read, not written
    trainer = __import__("yaml").safe_load((run / "distill" / "trainer.yaml").read_text())
    assert trainer["teacher_logits"] == str(stored.resolve())
    assert any("reading the stored teacher logits" in m for m in logs)
