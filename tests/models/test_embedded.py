"""The embedded SmolLM2-135M teacher: converted once, loadable by stock transformers, sane."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_checkpoint_layout(demo_model_dir):
    from minitron_fast.io import MARKER, current_umask

    names = {p.name for p in demo_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    cfg = json.loads((demo_model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    # the only dot-file is the output marker; no temporary leftovers inside or beside it
    assert {n for n in names if n.startswith(".")} == {MARKER}
    assert not [p.name for p in demo_model_dir.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    # readable by others as the umask allows (save_pretrained writes model.safetensors through mkstemp, 0600)
    want = 0o666 & ~current_umask()
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in demo_model_dir.iterdir()}
    assert set(modes.values()) == {oct(want)}, modes


def test_reused_without_reconversion(demo_model_dir):
    from minitron_fast.models.embedded import embedded_model_path

    before = (demo_model_dir / "model.safetensors").stat().st_mtime_ns
    assert embedded_model_path() == demo_model_dir
    assert (demo_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_loads_in_stock_transformers_and_gives_finite_perplexity(demo_model_dir):
    # A fresh interpreter that never imports minitron_fast: the checkpoint is a stock HF one.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(demo_model_dir)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(demo_model_dir)!r})\n"
        "ids = t('The quick brown fox', return_tensors='pt').input_ids\n"
        "print(type(m).__name__, m.num_parameters(), len(t), tuple(m(ids).logits.shape))\n"
        "assert 'minitron_fast' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, n, vocab, shape = out.stdout.split(maxsplit=3)
    assert name == "LlamaForCausalLM" and int(n) == 134_515_008 and int(vocab) == 49152


def test_geometry_and_heldout_perplexity(demo_model_dir):
    from minitron_fast.data import token_blocks
    from minitron_fast.evaluate import lm_loss
    from minitron_fast.models import get_view
    from minitron_fast.models.loading import load_model, load_tokenizer

    model = load_model("demo")
    view = get_view(model)
    g = view.geometry()
    assert (g.hidden_size, g.intermediate_size, g.num_attention_heads, g.num_key_value_heads, g.head_dim,
            g.num_hidden_layers, g.vocab_size) == (576, 1536, 9, 3, 64, 30, 49152)
    assert view.tied
    tok = load_tokenizer("demo")
    blocks = token_blocks(tok, "demo", "heldout", 128, max_blocks=2)
    loss = lm_loss(model, blocks, batch_size=2, progress=False)
    assert math.isfinite(loss)
    # A trained model is far better than uniform guessing over 49,152 tokens (ln V = 10.8 nats).
    assert loss < 0.5 * math.log(g.vocab_size)
    assert next(model.parameters()).dtype == torch.float32
