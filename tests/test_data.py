"""Data: deterministic disjoint splits, packing, and loaders for users' own data."""
from __future__ import annotations

import json

import pytest
import torch

from minitron_fast.data import (SPLITS, embedded_documents, load_documents, pack, split_documents, token_blocks,
                                tokenize_documents)
from minitron_fast.errors import DataError


def test_embedded_text_is_real_and_large():
    docs = embedded_documents()
    assert len(docs) > 50
    assert sum(len(d) for d in docs) > 400_000


def test_splits_disjoint_cover_and_deterministic():
    docs = embedded_documents()
    parts = {s: split_documents(docs, s) for s in SPLITS}
    assert all(parts[s] for s in SPLITS)
    sets = {s: set(v) for s, v in parts.items()}
    assert not (sets["train"] & sets["calib"]) and not (sets["train"] & sets["heldout"]) and not (sets["calib"] & sets["heldout"])
    assert sum(len(v) for v in parts.values()) == len(docs)
    # determinism: same documents in any order land in the same split
    assert set(split_documents(list(reversed(docs)), "heldout")) == sets["heldout"]
    assert len(parts["train"]) > len(parts["calib"])


def test_split_unknown_name():
    with pytest.raises(DataError, match="unknown split"):
        split_documents(["a"], "validation")


def test_pack_blocks():
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, sep_id=0)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert blocks.dtype == torch.long
    assert pack([[1, 2, 3]], 4, sep_id=None).shape == (0, 4)


class _CharTokenizer:
    """A deterministic stand-in tokenizer: one id per character (keeps these tests instant)."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + (ord(c) % 250) for c in t] for t in texts]}


def test_token_blocks_per_split_are_disjoint_streams():
    tok = _CharTokenizer()
    a = token_blocks(tok, "demo", "calib", 64, max_blocks=5)
    b = token_blocks(tok, "demo", "calib", 64, max_blocks=5)
    assert a.shape == (5, 64) and torch.equal(a, b)
    held = token_blocks(tok, "demo", "heldout", 64)
    assert held.shape[1] == 64 and held.shape[0] > 10


def test_jsonl_loader(tmp_path):
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


@pytest.mark.parametrize("kind", ["empty_file", "missing", "empty_dir"])
def test_bad_sources(tmp_path, kind):
    if kind == "empty_file":
        p = tmp_path / "e.txt"
        p.write_text("  \n\n")
        match = "is empty"
    elif kind == "missing":
        p = tmp_path / "nope.txt"
        match = "does not exist"
    else:
        p = tmp_path / "d"
        p.mkdir()
        match = "holds no .txt files"
    with pytest.raises(DataError, match=match):
        load_documents(p)


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets  # part of the test extra

    ds = datasets.Dataset.from_dict({"body": ["alpha beta", "", "gamma"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_documents(tmp_path / "ds", text_field="body") == ["alpha beta", "gamma"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_documents(tmp_path / "ds")


def test_split_too_small_for_one_block():
    with pytest.raises(DataError, match="fewer than"):
        token_blocks(_CharTokenizer(), "demo", "heldout", 10_000_000)


def test_tokenize_documents_uses_tokenizer():
    assert tokenize_documents(_CharTokenizer(), ["ab"]) == [[1 + ord("a") % 250, 1 + ord("b") % 250]]
