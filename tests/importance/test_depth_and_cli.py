"""Depth by LM loss (skipped layer == dropped layer), the end-to-end API and the CLI on a tiny
checkpoint that carries the real SmolLM2 tokenizer, and the bad-input errors."""
import copy

import pytest
import torch

from minitron_fast.cli import main
from minitron_fast.errors import MinitronError
from minitron_fast.importance import ImportanceConfig, depth_lm_loss, load_scores, run_importance, skip_layers
from minitron_fast.importance.depth import heldout_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def test_skipped_layer_equals_dropped_layer(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    with torch.no_grad(), skip_layers(tiny_model, [1]):
        skipped = tiny_model(input_ids=ids, use_cache=False).logits
    dropped = copy.deepcopy(tiny_model)
    del dropped.model.layers[1]
    dropped.config.num_hidden_layers -= 1
    if getattr(dropped.config, "layer_types", None):  # the kept layers keep their own types
        dropped.config.layer_types = [t for i, t in enumerate(dropped.config.layer_types) if i != 1]
    with torch.no_grad():
        torch.testing.assert_close(dropped(input_ids=ids, use_cache=False).logits, skipped, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the skip is undone
        full = tiny_model(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(full, skipped)


def test_depth_lm_loss_per_layer_and_blocks(tiny_builders):
    model = tiny_builders["llama"](num_hidden_layers=4)
    blocks = torch.randint(0, 131, (3, 8))
    d = depth_lm_loss(model, blocks, block_size=2, batch_size=2, progress=False)
    assert d["per_layer"].shape == (4,) and d["block"].shape == (3,)
    with skip_layers(model, [2, 3]):
        torch.testing.assert_close(torch.tensor(heldout_loss(model, blocks)), d["block"][2], rtol=1e-5, atol=1e-6)
    assert d["best_block_start"] == int(d["block"].argmin())
    assert d["base"] == pytest.approx(heldout_loss(model, blocks), rel=1e-6)
    with pytest.raises(MinitronError, match="block size"):
        depth_lm_loss(model, blocks, block_size=4, progress=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, demo_model_dir):
    """A 4-layer random Llama with SmolLM2's 49,152-token vocabulary and real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(d)
    return d


def test_cli_writes_scores_heatmap_and_summary(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "scores.safetensors"
    rc = main(["importance", "--model", str(tiny_ckpt), "--data", "demo", "--samples", "6", "--seq-len", "32",
               "--batch-size", "4", "--depth-lm-loss", "--heldout-samples", "2", "--depth-block", "2",
               "--out", str(out)])
    assert rc == 0
    s = load_scores(out)
    assert s.num_layers == 4 and s.heads[0].shape == (4,) and s.kv_groups[0].shape == (2,)
    assert s.neurons[3].shape == (48,) and s.channels.shape == (32,)
    assert s.lm_loss.shape == (4,) and s.block_lm_loss.shape == (3,)
    assert s.meta["calib_tokens"] == 6 * 32 and s.meta["calib_samples"] == 6 and s.meta["seq_len"] == 32
    assert (s.meta["seq_agg"], s.meta["batch_agg"]) == ("mean", "l2")
    assert out.with_suffix(".png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "best contiguous block of 2 layers" in text and "block importance" in text


def test_bad_inputs(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "s.safetensors")
    base = ["importance", "--model", str(tiny_ckpt), "--out", out]
    assert main(base + ["--samples", "100000", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert "fewer than --samples 100000" in err and "--allow-fewer" in err
    assert main(base + ["--seq-len", "65"]) == 2
    assert "max_position_embeddings (64)" in capsys.readouterr().err
    assert main(["importance", "--model", str(tiny_ckpt), "--out", str(tiny_ckpt / "s.safetensors")]) == 2
    assert "inside the input model directory" in capsys.readouterr().err
    with pytest.raises(MinitronError):  # fewer is allowed when asked
        run_importance(tiny_ckpt, "demo", out=out, config=ImportanceConfig(samples=100000, seq_len=32), progress=False)
    cfg = ImportanceConfig(samples=100000, seq_len=32, allow_fewer=True, batch_size=64)
    s, _ = run_importance(tiny_ckpt, "demo", out=out, config=cfg, progress=False, heatmap_png=False)
    assert 0 < s.meta["calib_samples"] < 100000


def test_unsupported_family(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    assert main(["importance", "--model", str(tmp_path), "--out", str(tmp_path / "x" / "s.safetensors")]) == 2
    assert "unsupported model family" in capsys.readouterr().err


def _depth_by_whole_forwards(model, blocks, block_size, batch_size):
    """The definition: every skipped run's loss from whole forwards with the run's layers skipped."""
    L = len(model.model.layers)
    runs = [[i] for i in range(L)] + [list(range(s, s + block_size)) for s in range(L - block_size + 1)]
    out = []
    for idx in runs:
        with skip_layers(model, idx):
            out.append(heldout_loss(model, blocks, batch_size=batch_size))
    return out[:L], out[L:]


def _count_layer_calls(model):
    calls = [0]
    for layer in model.model.layers:
        layer.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_depth_lm_loss_resumed_runs_equal_whole_forwards(tiny_model):
    """Each family (sliding-window Gemma, soft-capped logits, biases, rope scaling): the runs that
    resume from a recorded layer input give the losses of whole forwards with the layers skipped,
    over batches of unequal size, and compute only the layers after each run."""
    model = tiny_model
    L = len(model.model.layers)
    blocks = torch.randint(0, model.config.vocab_size, (5, 11))
    k = 2 if L > 2 else 1
    per_layer, block = _depth_by_whole_forwards(model, blocks, k, batch_size=2)
    calls = _count_layer_calls(model)
    d = depth_lm_loss(model, blocks, block_size=k, batch_size=2, progress=False)
    torch.testing.assert_close(d["per_layer"], torch.tensor(per_layer), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d["block"], torch.tensor(block), rtol=1e-6, atol=1e-6)
    # per batch: one whole forward, then layers e+1.. for every run s..e (not L-1 or L-2 each)
    resumed = sum(L - 1 - i for i in range(L)) + sum(L - 1 - (s + k - 1) for s in range(L - k + 1))
    assert calls[0] == 3 * (L + resumed)
    assert all(type(m).__name__ not in ("_SkipLayer", "_InjectLayer") for m in model.model.layers)   # restored


def test_depth_lm_loss_restores_layers_after_an_error(tiny_builders, monkeypatch):
    from minitron_fast.importance import depth as depth_mod

    model = tiny_builders["llama"](num_hidden_layers=3)
    layers = list(model.model.layers)
    real = depth_mod._nll_sum
    n = [0]

    def failing(m, ids):
        n[0] += 1
        if n[0] == 3:
            raise RuntimeError("boom")
        return real(m, ids)

    monkeypatch.setattr(depth_mod, "_nll_sum", failing)
    with pytest.raises(RuntimeError, match="boom"):
        depth_lm_loss(model, torch.randint(0, 131, (2, 8)), progress=False)
    assert list(model.model.layers) == layers


def test_depth_lm_loss_takes_the_loss_a_sequence_at_a_time(tiny_builders, monkeypatch):
    """The importance memory plan (distill/memory.py, ``per_sequence``) counts one sequence's fp32
    logits, not the batch's: the cross entropy must see one sequence's ``[T - 1, V]`` at a time."""
    from minitron_fast.importance import depth as depth_mod

    model = tiny_builders["llama"](num_hidden_layers=3)
    seen = []
    real = depth_mod.F.cross_entropy

    def spy(x, y, *a, **kw):
        seen.append((tuple(x.shape), x.dtype))
        return real(x, y, *a, **kw)

    monkeypatch.setattr(depth_mod.F, "cross_entropy", spy)
    blocks = torch.randint(0, model.config.vocab_size, (3, 9))
    depth_lm_loss(model, blocks, batch_size=3, progress=False)
    assert seen and set(seen) == {((8, model.config.vocab_size), torch.float32)}
