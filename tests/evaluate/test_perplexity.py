"""``minitron-fast eval``: held-out perplexity of a checkpoint (lm-evaluation-harness tasks:
test_lm_eval.py)."""
from __future__ import annotations

import json
import math

import pytest

from bench.common import make_tiny_teacher
from minitron_fast.evaluate.config import EvaluateConfig
from minitron_fast.evaluate.harness import evaluate_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("eval") / "tiny")


def test_eval_cli_perplexity_matches_api(tiny, tmp_path, capsys):
    from minitron_fast.cli import main
    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate import lm_loss
    from minitron_fast.models.loading import load_model, load_tokenizer

    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny), "--seq-len", "32", "--eval-blocks", "3", "--batch-size", "2",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert "perplexity" in printed and f"{rec['ppl']:.3f}" in printed
    assert rec["tokens"] == 3 * 31 and rec["blocks"] == 3
    ref = lm_loss(load_model(tiny), token_blocks(load_tokenizer(tiny), "demo", "heldout", 32, max_blocks=3),
                  progress=False)
    assert rec["loss"] == pytest.approx(ref, rel=1e-6) and rec["ppl"] == pytest.approx(math.exp(ref), rel=1e-6)
    # another split gives another number, from the same API
    assert evaluate_model(str(tiny), EvaluateConfig(eval_blocks=2), split="calib", seq_len=32, progress=False)["loss"] != rec["loss"]


def test_eval_bad_input(tiny, tmp_path, capsys):
    from minitron_fast.cli import main

    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny), "--seq-len", "100000"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
