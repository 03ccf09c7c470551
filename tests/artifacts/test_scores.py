"""The scores file contract: round trip, metadata, validation errors."""
import pytest
import torch

from minitron_fast.artifacts.scores import (ImportanceScores, ScoresFileError, load_scores, read_metadata,
                                             save_scores)


def _scores(n_layers=3, heads=6, kv=2, ffn=7, hidden=5, lm=True):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    return ImportanceScores(
        heads=[r(heads) for _ in range(n_layers)], kv_groups=[r(kv) for _ in range(n_layers)],
        neurons=[r(ffn) for _ in range(n_layers)], layer_channels=[r(hidden) for _ in range(n_layers)],
        channels=r(hidden), block_importance=r(n_layers), lm_loss=r(n_layers) if lm else None,
        block_lm_loss=r(n_layers - 1) if lm else None, meta={"source_model": "x", "seq_agg": "mean"})


def test_round_trip_keys_and_metadata(tmp_path):
    s = _scores()
    p = save_scores(s, tmp_path / "s.safetensors")
    from safetensors.torch import load_file

    raw = load_file(str(p))
    assert {"layers.0.heads", "layers.2.kv_groups", "layers.1.neurons", "layers.1.channels", "channels",
            "depth.block_importance", "depth.lm_loss", "depth.lm_loss_block"} <= set(raw)
    assert all(t.dtype == torch.float32 for t in raw.values())
    t = load_scores(p)
    assert read_metadata(p)["source_model"] == "x" and t.meta["format"] == 1
    for a, b in zip(s.to_tensors().values(), t.to_tensors().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary behind


def test_optional_depth_lm_loss(tmp_path):
    t = load_scores(save_scores(_scores(lm=False), tmp_path / "s.safetensors"))
    assert t.lm_loss is None and t.block_lm_loss is None


def test_bad_files(tmp_path):
    with pytest.raises(ScoresFileError, match="does not exist"):
        load_scores(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ScoresFileError, match="not a safetensors"):
        load_scores(tmp_path / "junk.safetensors")
    s = _scores()
    s.neurons[1][3] = float("nan")
    with pytest.raises(ScoresFileError, match="layers.1.neurons holds NaN"):
        save_scores(s, tmp_path / "nan.safetensors")
    s = _scores(heads=5, kv=2)
    with pytest.raises(ScoresFileError, match="do not split"):
        s.validate()
