"""Data: streaming sources, memory-mapped token shards (cache, resume after SIGKILL), the split
rule (disjoint, all three splits for any corpus of 3+ blocks, the demo's splits unchanged), and
block-indexed random access."""
from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from minitron_fast.data import (SPLITS, TokenBlocks, embedded_documents, iter_pieces, load_documents, open_corpus,
                                pack, split_documents, token_blocks, tokenize_documents)
from minitron_fast.data import shards as shards_mod
from minitron_fast.data import sources as sources_mod
from minitron_fast.distill.sharding import ShardedBlocks
from minitron_fast.errors import DataError


class _CharTokenizer:
    """A deterministic stand-in tokenizer: one id per character (keeps these tests instant).
    ``shift`` makes a different tokenizer; ``calls`` counts the texts it tokenized."""

    eos_token_id = 0

    def __init__(self, shift: int = 0, die_after: int | None = None):
        self.shift = shift
        self.fingerprint = f"char+{shift}"
        self.calls = 0
        self.die_after = die_after

    def __len__(self):
        return 256

    def __call__(self, texts, add_special_tokens=False):
        if self.die_after is not None and self.calls > self.die_after:
            raise KeyboardInterrupt  # a kill between two batches
        self.calls += len(texts)
        return {"input_ids": [[1 + (ord(c) + self.shift) % 250 for c in t] for t in texts]}


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINITRON_FAST_TOKEN_CACHE", str(tmp_path / "tokcache"))
    sources_mod._FP_CACHE.clear()


def _reference_blocks(tok, docs, split, seq_len):
    """The document-hash rule in memory: the behaviour before token shards."""
    return pack(tokenize_documents(tok, split_documents(docs, split)), seq_len, sep_id=tok.eos_token_id)


def test_embedded_text_is_real_and_large():
    docs = embedded_documents()
    assert len(docs) > 50
    assert sum(len(d) for d in docs) > 400_000


def test_split_documents_disjoint_cover_and_deterministic():
    docs = embedded_documents()
    parts = {s: split_documents(docs, s) for s in SPLITS}
    assert all(parts[s] for s in SPLITS)
    sets = {s: set(v) for s, v in parts.items()}
    assert not (sets["train"] & sets["calib"]) and not (sets["train"] & sets["heldout"]) and not (sets["calib"] & sets["heldout"])
    assert sum(len(v) for v in parts.values()) == len(docs)
    assert set(split_documents(list(reversed(docs)), "heldout")) == sets["heldout"]


def test_split_unknown_name():
    with pytest.raises(DataError, match="unknown split"):
        split_documents(["a"], "validation")
    with pytest.raises(DataError, match="unknown split"):
        token_blocks(_CharTokenizer(), "demo", "validation", 64)


def test_pack_blocks():
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, sep_id=0)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert blocks.dtype == torch.long
    assert pack([[1, 2, 3]], 4, sep_id=None).shape == (0, 4)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [128, 256, 1024])
def test_demo_splits_unchanged_by_the_shard_path(seq_len):
    """The demo (real SmolLM2 tokenizer, pydoc text) reads exactly the blocks of the in-memory
    document-hash rule: no demo document is long enough to be split by block."""
    from minitron_fast.models.loading import load_tokenizer

    tok = load_tokenizer("demo")
    docs = embedded_documents()
    for split in SPLITS:
        ref = _reference_blocks(tok, docs, split, seq_len)
        got = token_blocks(tok, "demo", split, seq_len)
        assert got.shape == ref.shape and torch.equal(got, ref), split
    corpus = open_corpus(tok, "demo")
    assert corpus.tokens.dtype == np.uint16  # 49,152 tokens fit 16 bits


def _three_way(tok, source, seq_len):
    out = {s: token_blocks(tok, source, s, seq_len) for s in SPLITS}
    corpus = open_corpus(tok, source)
    pos = {}
    for s in SPLITS:  # the token positions of each split must be disjoint
        starts, lens = corpus.spans(s, seq_len)
        pos[s] = set(np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lens)]).tolist()) if len(starts) else set()
    assert not (pos["train"] & pos["calib"]) and not (pos["train"] & pos["heldout"]) and not (pos["calib"] & pos["heldout"])
    return out


def test_one_long_document_yields_all_three_splits(tmp_path):
    """A text file without blank lines is one document: split by block, not all in one split."""
    p = tmp_path / "one.txt"
    p.write_text(" ".join(f"word{i}" for i in range(3000)))  # ~26k characters, one paragraph
    out = _three_way(_CharTokenizer(), p, 64)
    assert all(out[s].shape[0] > 0 for s in SPLITS)
    n = sum(out[s].shape[0] for s in SPLITS)
    assert out["train"].shape[0] >= 0.75 * n and out["heldout"].shape[0] >= 0.09 * n
    # the stream is the document's characters (+ EOS); heldout takes the first block
    ids = torch.tensor(_CharTokenizer()([p.read_text()])["input_ids"][0])
    assert torch.equal(out["heldout"][0], ids[:64]) and torch.equal(out["calib"][0], ids[64:128])


def test_tiny_corpus_of_three_blocks_falls_back_to_blocks(tmp_path):
    p = tmp_path / "few.txt"
    p.write_text("alpha beta gamma\n\ndelta epsilon\n\nzeta eta theta iota")   # 3 documents, 50 tokens
    out = _three_way(_CharTokenizer(), p, 16)
    assert [out[s].shape[0] for s in ("heldout", "calib", "train")] == [1, 1, 1]
    with pytest.raises(DataError, match=r"'calib' split of .*few.txt holds fewer than 32 tokens .*at least 96"):
        token_blocks(_CharTokenizer(), p, "calib", 32)


def test_long_documents_split_by_block_short_ones_by_hash(tmp_path):
    from minitron_fast.data.splits import LONG_DOC_TOKENS

    short = [(f"short document number {i} " * 3).strip() for i in range(200)]
    long_doc = "x" * (LONG_DOC_TOKENS + 1000)
    p = tmp_path / "mix.txt"
    p.write_text("\n\n".join(short[:100] + [long_doc] + short[100:]))
    tok = _CharTokenizer()
    out = _three_way(tok, p, 32)
    x = 1 + ord("x") % 250
    n_x = {s: int((out[s] == x).sum()) for s in SPLITS}
    assert all(n_x[s] > 0 for s in SPLITS)                        # the long document is in every split
    assert abs(n_x["heldout"] / sum(n_x.values()) - 0.1) < 0.02
    # the short documents follow the hash rule: each one lands in the split the rule names
    for s in SPLITS:
        flat = out[s].reshape(-1).tolist()
        text = "".join(chr(c - 1) if c > 1 else "|" for c in flat)
        for d in split_documents(short, s)[:5]:
            assert d.strip() in text


def test_block_random_access_and_sharding(tmp_path):
    tok = _CharTokenizer()
    ds = TokenBlocks.open(tok, "demo", "train", 64)
    full = token_blocks(tok, "demo", "train", 64)
    assert len(ds) == full.shape[0] and ds.shape == tuple(full.shape)
    for i in (0, 1, len(ds) // 2, len(ds) - 1, -1):
        assert torch.equal(ds[i], full[i])
    idx = torch.tensor([5, 0, 17, 5])
    assert torch.equal(ds[idx], full[idx]) and ds[idx].dtype == torch.long
    with pytest.raises(IndexError):
        ds[len(ds)]
    capped = TokenBlocks.open(tok, "demo", "train", 64, max_blocks=7)
    assert len(capped) == 7 and torch.equal(capped.tensor(), full[:7])
    # the trainer's sharding reads the same micro-batches from shards as from a tensor
    for rank in (0, 1):
        a = ShardedBlocks(ds, world=2, rank=rank, micro_batch=3, grad_accum=2, seed=1)
        b = ShardedBlocks(full, world=2, rank=rank, micro_batch=3, grad_accum=2, seed=1)
        for step in (0, 5):
            assert all(torch.equal(x, y) for x, y in zip(a.micro_batches(step), b.micro_batches(step)))
        assert a.position(3) == b.position(3) and a.seq_len == 64


def test_shards_cached_rebuilt_for_another_tokenizer(tmp_path, caplog):
    tok = _CharTokenizer()
    a = token_blocks(tok, "demo", "calib", 64, max_blocks=5)
    calls = tok.calls
    b = token_blocks(tok, "demo", "heldout", 64)
    assert tok.calls == calls and b.shape[0] > 10          # second split: read from the cache
    assert torch.equal(token_blocks(tok, "demo", "calib", 64, max_blocks=5), a)
    other = _CharTokenizer(shift=1)
    with caplog.at_level(logging.WARNING, logger="minitron_fast.data"):
        c = token_blocks(other, "demo", "calib", 64, max_blocks=5)
    assert "made by another tokenizer" in caplog.text and "rebuilding" in caplog.text
    assert other.calls > 0 and not torch.equal(c, a)
    corpus = open_corpus(other, "demo")
    assert corpus.tokens.dtype == np.uint16 and isinstance(corpus.tokens, np.memmap)


def test_streaming_sources_agree(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [(f"document {i}: " + "lorem ipsum " * (i % 7 + 1)).strip() for i in range(60)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    d = tmp_path / "dir"
    d.mkdir()
    (d / "1.txt").write_text("\n\n".join(docs[:30]))
    (d / "2.txt").write_text("\n\n\n".join(docs[30:]))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    pq.write_table(pa.table({"text": docs, "n": list(range(60))}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    for src in ("a.txt", "dir", "a.jsonl", "a.parquet", "ds"):
        assert load_documents(tmp_path / src) == docs, src
    tok = _CharTokenizer()
    ref = token_blocks(tok, tmp_path / "a.txt", "train", 32)
    for src in ("dir", "a.jsonl", "a.parquet", "ds"):
        assert torch.equal(token_blocks(tok, tmp_path / src, "train", 32), ref), src


def test_huge_paragraph_streams_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "MAX_PIECE_CHARS", 100)
    monkeypatch.setattr(sources_mod, "_READ_CHARS", 37)
    text = "  head\n\n" + "".join(f"w{i} " for i in range(400)) + "\n\n\n tail \n"
    p = tmp_path / "big.txt"
    p.write_text(text)
    pieces = list(iter_pieces(p))
    assert max(len(t) for t, _ in pieces) <= 100 + 37 and sum(c for _, c in pieces) > 5
    assert load_documents(p) == [x.strip() for x in text.split("\n\n") if x.strip()]
    tok = _CharTokenizer()
    corpus = open_corpus(tok, p)
    assert corpus.doc_ends.size == 3   # pieces of one paragraph stay one document (EOS only at its end)
    assert (np.asarray(corpus.tokens) == 0).sum() == 3


def test_jsonl_loader_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"content": f"doc {i}", "id": i}) for i in range(5)) + "\n\n")
    assert load_documents(p, text_field="content") == [f"doc {i}" for i in range(5)]
    with pytest.raises(DataError, match=r"d.jsonl:1: no field 'text' \(found \['content', 'id'\]\)"):
        load_documents(p)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        load_documents(bad)


def test_text_and_directory_loaders(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("first paragraph\nstill first\n\nsecond\n\n\n")
    assert load_documents(t) == ["first paragraph\nstill first", "second"]
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x.txt").write_text("one")
    (d / "y.txt").write_text("two\n\nthree")
    assert load_documents(d) == ["one", "two", "three"]


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and isinstance(exc, DataError)
    return msg


@pytest.mark.parametrize("kind", ["empty_file", "missing", "empty_dir", "non_utf8_jsonl", "fake_hf_dataset",
                                  "bad_parquet", "parquet_no_column", "hf_no_column", "split_without_documents"])
def test_bad_sources_are_one_line_errors(tmp_path, kind):
    """Issue 16's data rows: each bad source is one DataError line naming the file and the fix."""
    tok = _CharTokenizer()
    if kind == "empty_file":
        p, match = tmp_path / "e.txt", "is empty"
        p.write_text("  \n\n")
    elif kind == "missing":
        p, match = tmp_path / "nope.txt", "does not exist"
    elif kind == "empty_dir":
        p, match = tmp_path / "d", "holds no .txt files"
        p.mkdir()
    elif kind == "non_utf8_jsonl":
        p, match = tmp_path / "latin1.jsonl", r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"
        p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    elif kind == "fake_hf_dataset":
        p, match = tmp_path / "fake", "looks like a saved HF dataset but cannot be read"
        p.mkdir()
        (p / "dataset_info.json").write_text("{}")
    elif kind == "bad_parquet":
        p, match = tmp_path / "x.parquet", "is not a readable Parquet file"
        p.write_bytes(b"PAR1 not really")
    elif kind == "parquet_no_column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p, match = tmp_path / "y.parquet", r"has no column 'text' \(columns: \['body'\]\)"
        pq.write_table(pa.table({"body": ["a"]}), p)
    elif kind == "hf_no_column":
        import datasets

        p, match = tmp_path / "ds", "no column 'text'"
        datasets.Dataset.from_dict({"body": ["alpha beta", "", "gamma"]}).save_to_disk(str(p))
    else:  # one short document: no split can hold a block
        p, match = tmp_path / "short.txt", r"'heldout' split of .* holds fewer than 64 tokens \(the corpus holds 11"
        p.write_text("ten chars!")
    with pytest.raises(DataError, match=match) as ei:
        token_blocks(tok, p, "heldout", 64)
    _one_line(ei.value)
    if kind != "split_without_documents":  # (that corpus's shards are whole; they are just small)
        assert not list((tmp_path / "tokcache").glob("*/meta.json"))   # nothing cached that looks complete


_BUILD = textwrap.dedent("""
    import sys, time
    from minitron_fast.data import shards
    class Tok:
        eos_token_id = 0
        fingerprint = "char"
        def __len__(self): return 256
        def __call__(self, texts, add_special_tokens=False):
            time.sleep(float(sys.argv[2]))
            return {"input_ids": [[1 + ord(c) % 250 for c in t] for t in texts]}
    shards.BATCH_CHARS = 4000
    c = shards.open_corpus(Tok(), sys.argv[1], progress=False)
    print("DONE", c.n_tokens, flush=True)
""")


def test_sigkill_during_tokenization_resumes_exactly(tmp_path):
    """Issue 16 item 3: a tokenization killed midway never leaves a complete-looking shard
    directory, and the rerun resumes from its last batch to the same bytes as a clean build."""
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(f"paragraph {i} " + "text " * (i % 50) for i in range(3000)))  # ~420 kB, ~100 batches
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    root = tmp_path / "tokcache"
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, str(src), "0.02"], env=env)
    deadline = time.time() + 60
    progress = None
    while time.time() < deadline:
        progress = next(root.glob("*.partial/progress.json"), None)
        if progress is not None and json.loads(progress.read_text())["pieces"] >= 200:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert progress is not None, "the build never recorded progress"
    done_before = json.loads(progress.read_text())["pieces"]
    assert not list(root.glob("*/meta.json"))        # nothing under a final name
    # the rerun resumes the partial build
    out = subprocess.run([sys.executable, "-c", _BUILD, str(src), "0"], env=dict(env, MINITRON_FAST_TOKEN_CACHE=str(root)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    resumed = next(p for p in root.iterdir() if p.is_dir())
    assert not resumed.name.endswith(".partial")
    clean_root = tmp_path / "clean"
    subprocess.run([sys.executable, "-c", _BUILD, str(src), "0"], env=dict(env, MINITRON_FAST_TOKEN_CACHE=str(clean_root)),
                   check=True, capture_output=True, timeout=120)
    clean = next(p for p in clean_root.iterdir() if p.is_dir())
    for f in ("tokens.bin", "doc_ends.bin", "buckets.bin", "meta.json"):
        assert (resumed / f).read_bytes() == (clean / f).read_bytes(), f
    assert done_before >= 200 and json.loads((clean / "meta.json").read_text())["n_docs"] == 3000


def test_resume_is_used_not_restarted(tmp_path, monkeypatch):
    """In-process twin of the SIGKILL test: a build that dies after some batches resumes at the
    recorded piece, so only the rest is tokenized, and the result equals a clean build."""
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(f"p{i} " * 20 for i in range(500)))
    monkeypatch.setattr(shards_mod, "BATCH_CHARS", 2000)
    with pytest.raises(KeyboardInterrupt):
        open_corpus(_CharTokenizer(die_after=150), src, progress=False)
    tok = _CharTokenizer()
    corpus = open_corpus(tok, src, progress=False)
    assert corpus.meta["n_docs"] == 500 and 0 < tok.calls < 400
    ref = [t for ids in tokenize_documents(_CharTokenizer(), load_documents(src)) for t in ids + [0]]
    assert np.asarray(corpus.tokens).tolist() == ref


# -- the epoch order of training blocks (data/order.py) ---------------------------------------------------

_ORDER_NS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 31, 32, 33, 37, 97, 101, 127, 128, 129, 1000, 1023, 1024, 1025,
             4093, 65535, 65536, 65537]


@pytest.mark.parametrize("n", _ORDER_NS, ids=[f"n{n}" for n in _ORDER_NS])
def test_feistel_is_a_permutation_for_every_n(n):
    from minitron_fast.data.order import FeistelPermutation

    for key in ("0:0", "0:1", "-5:3"):
        v = FeistelPermutation(n, key)(np.arange(n))
        assert v.dtype == np.int64 and v.min() >= 0 and v.max() < n
        assert np.array_equal(np.bincount(v, minlength=n), np.ones(n, dtype=np.int64))  # each value exactly once
    # any shape, any order of queries: the same map
    perm = FeistelPermutation(n, "-5:3")
    assert np.array_equal(perm(np.arange(n)[::-1].reshape(-1, 1)), v[::-1].reshape(-1, 1))


def test_feistel_is_pinned_and_seeded():
    """Fixed values (blake2b keys, no Python ``hash``: the same in every process, platform and
    PYTHONHASHSEED; a change here changes every large run's data order); every (seed, epoch)
    its own permutation; at n = 3 and 4 the seeds reach all 3! and 4! orders."""
    from minitron_fast.data.order import FeistelPermutation

    assert FeistelPermutation(1000, "0:0")(np.arange(8)).tolist() == [183, 392, 560, 449, 578, 995, 178, 179]
    assert FeistelPermutation(12_000_000, "7:2")(np.arange(4)).tolist() == [11496525, 2472694, 6752489, 1188821]
    n = 1000
    perms = {k: FeistelPermutation(n, k)(np.arange(n)) for k in ("0:0", "0:1", "1:0", "-1:0", "10:0")}
    for a, b in itertools.combinations(perms.values(), 2):
        assert (a == b).sum() < 10  # about 1 agreement expected between independent permutations
    for n, count in ((2, 2), (3, 6), (4, 24)):
        assert len({tuple(FeistelPermutation(n, f"{s}:0")(np.arange(n)).tolist()) for s in range(200)}) == count


@pytest.mark.parametrize("n", [10007, 1 << 14, (1 << 14) + 1])
def test_feistel_order_is_well_mixed(n):
    """The statistics of a uniform random permutation: mean displacement (n^2 - 1) / 3n, about one
    fixed point, no runs of consecutive blocks, nearby positions far apart, and which tenth of the
    epoch a position is in independent of which tenth of the blocks it reads (chi-square, 81
    degrees of freedom: a uniform permutation exceeds 137 with probability 1e-4)."""
    from minitron_fast.data.order import FeistelPermutation

    i = np.arange(n)
    for key in ("0:0", "5:7"):
        v = FeistelPermutation(n, key)(i)
        assert abs(np.abs(v - i).mean() / n - (n * n - 1) / (3 * n * n)) < 0.01
        assert (v == i).sum() < 10
        step = np.diff(v)
        assert (step == 1).sum() < 10 and (np.abs(step) == 1).sum() < 20  # ~1 and ~2 expected
        assert (np.abs(step) < n // 100).mean() < 0.03                # ~0.02 expected
        table = np.bincount(i * 10 // n * 10 + v * 10 // n, minlength=100).reshape(10, 10)
        expected = np.outer(table.sum(1), table.sum(0)) / n
        assert ((table - expected) ** 2 / expected).sum() < 137


def test_block_order_keeps_randperm_below_dense_max_and_is_lazy_above(monkeypatch):
    """Up to DENSE_MAX blocks the order is the randperm one every earlier run read (the demo's
    numbers stay); above it no randperm is drawn and a query evaluates about its own positions only."""
    from minitron_fast.data import order as order_mod
    from minitron_fast.data.order import BlockOrder, FeistelPermutation

    n, seed = 37, 3
    old = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed + e)) for e in range(3)])
    small = BlockOrder(n, seed)
    assert small.kind == "randperm" and torch.equal(small(range(3 * n)), old)
    assert torch.equal(small(torch.tensor([40, 2, 80])), old[[40, 2, 80]])

    def no_randperm(*a, **k):
        raise AssertionError("randperm drawn for a lazy order")

    evaluated = []
    network = FeistelPermutation._network

    def counting(self, x):
        evaluated.append(x.size)
        return network(self, x)

    monkeypatch.setattr(order_mod.torch, "randperm", no_randperm)
    monkeypatch.setattr(FeistelPermutation, "_network", counting)
    big = BlockOrder(n, seed, dense_max=n - 1)
    assert big.kind == "feistel"
    out = big(range(3 * n))
    for e in range(3):  # every epoch reads every block once
        assert sorted(out[e * n:(e + 1) * n].tolist()) == list(range(n))
        assert not torch.equal(out[e * n:(e + 1) * n], out[((e + 1) % 3) * n:((e + 1) % 3 + 1) * n])
    huge = BlockOrder(12_000_000, seed)  # ~100 B tokens of 8,192-token blocks
    evaluated.clear()
    got = huge(range(5_000_000, 5_000_006))
    assert huge.kind == "feistel" and 6 <= sum(evaluated) <= 6 * 8  # the 6 asked, plus short walks; not 12 M
    assert torch.equal(got, torch.from_numpy(FeistelPermutation(12_000_000, f"{seed}:0")(np.arange(5_000_000, 5_000_006))))
    assert huge(range(12_000_000, 12_000_002)).tolist() == FeistelPermutation(12_000_000, f"{seed}:1")(np.arange(2)).tolist()
    with pytest.raises(IndexError):
        big([-1])
