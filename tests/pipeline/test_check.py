"""``minitron-fast run RECIPE --check``: every problem at once, one line each, in seconds, with no
weights read; the same refusals as ``prune --plan-only``, generated from prune's own function."""
from __future__ import annotations

import pytest

from tests import ROOT

SHIPPED = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture
def no_weights_read(monkeypatch):
    """Counts every safetensors file opened (the check must read configs only)."""
    import safetensors
    import safetensors.torch

    opened = []
    for mod, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"), (safetensors.torch, "safe_open")):
        if hasattr(mod, name):
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _r=real, **k: opened.append(a[0] if a else k) or _r(*a, **k))
    return opened


def _check(capsys, *argv):
    from minitron_fast.cli import main

    rc = main(["run", *argv])
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_passes_on_its_hardware(name, tmp_path, capsys, no_weights_read):
    """Each recipe against its teacher's public config (no checkpoint here), with a data source that
    exists and, for the GPU recipes, the memory plan of every stage on 80 GB GPUs."""
    data = tmp_path / "corpus.txt"
    data.write_text("some text\n")
    argv = [name, "--check", f"out={tmp_path / 'run'}"]
    if name != "demo":
        argv += ["--gpu-mem", "80GB", f"data.source={data}"]
    rc, err, out = _check(capsys, *argv)
    assert rc == 0 and not err, err
    assert out.startswith(f"ok: {name} passes every check")
    assert no_weights_read == []
    assert not (tmp_path / "run").exists()  # nothing written


def _prune_refusals():
    """Targets prune's own function refuses on the demo teacher (9 heads, 3 KV groups, FFN 1536,
    30 layers, dense), with its messages."""
    from minitron_fast.artifacts.targets import TargetError, target_geometry
    from minitron_fast.distill.memory import model_config

    config = model_config("demo")
    cases = {}
    for t in ("kv_heads=1", "kv_heads=2", "heads=4", "heads=8,kv_heads=3", "ffn=2048", "layers=31", "hidden=1024",
              "experts=2", "expert_ffn=64", "params=1e12", "ffn=768", "layers=20", "heads=6,kv_heads=2"):
        try:
            target_geometry(config, t)
        except TargetError as exc:
            cases[t] = str(exc)
    assert len(cases) >= 6 and "ffn=768" not in cases  # refusals, and the good targets pass
    return cases


def test_every_target_prune_refuses_is_refused_by_check_with_the_same_message(capsys, tmp_path):
    for target, message in _prune_refusals().items():
        rc, err, _ = _check(capsys, "demo", "--check", f"prune.target={target}", f"out={tmp_path / 'r'}")
        assert rc == 2, target
        assert len(err) == 1 and err[0].startswith("error: prune.target: ") and message in err[0], (target, err)


def test_all_problems_at_once_one_line_each_nothing_written(capsys, tmp_path):
    rc, err, _ = _check(capsys, "demo", "--check", "prune.target=kv_heads=1", "data.seq_len=9000",
                        "importance.attn_implementation=flash_attention_2", f"data.source={tmp_path / 'absent'}",
                        f"out={tmp_path / 'run'}")
    assert rc == 2
    keys = [ln.split(":")[1].strip() for ln in err]
    assert keys == ["prune.target", "data.seq_len", "importance.attn_implementation", "data.source"], err
    assert all(ln.startswith("error: ") and ln.endswith(")") for ln in err)
    assert not (tmp_path / "run").exists()


def test_a_gpu_recipe_may_not_leave_a_loading_stage_to_fp32(capsys, tmp_path):
    data = tmp_path / "c.txt"
    data.write_text("x\n")
    rc, err, _ = _check(capsys, "llama3.1-8b-to-4b-width", "--check", f"data.source={data}", "evaluate.dtype=float32",
                        "search.enabled=true", "search.params=0.6x", "search.dtype=float32")
    assert rc == 2
    assert any(ln.startswith("error: evaluate.dtype: evaluate loads its model in float32") for ln in err), err
    assert any(ln.startswith("error: search.dtype:") for ln in err), err


def test_a_stage_that_cannot_fit_is_an_error_with_the_plans_numbers(capsys, tmp_path):
    data = tmp_path / "c.txt"
    data.write_text("x\n")
    rc, err, _ = _check(capsys, "mixtral-8x7b-experts-8-to-6", "--check", "--gpu-mem", "80GB", f"data.source={data}",
                        "distill.deepspeed.teacher_zero3=false", "importance.device_map=null")
    assert rc == 2
    stages = {ln.split(":")[1].strip() for ln in err}
    assert {"distill", "importance"} <= stages, err
    assert all("GB per GPU" in ln for ln in err if ln.split(":")[1].strip() in ("distill", "importance"))


def test_dry_run_and_run_check_before_anything_runs(capsys, tmp_path):
    rc, err, out = _check(capsys, "demo", "--dry-run", "prune.target=experts=2", f"out={tmp_path / 'run'}")
    assert rc == 2 and "applies to mixture-of-experts models only" in err[0] and out == ""
    rc, err, _ = _check(capsys, "demo", "prune.target=experts=2", f"out={tmp_path / 'run'}", "--no-progress")
    assert rc == 2 and len(err) == 1 and not (tmp_path / "run").exists()  # refused before the first stage


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from bench.common import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")


def test_data_too_small_for_what_each_stage_asks_is_one_line_per_key(capsys, tmp_path, tiny_teacher):
    """The requirements come from ``check.data_needs`` (one per stage that asks the data for
    blocks), so a new one is checked without a new case here."""
    from minitron_fast.data.shards import token_cache_root
    from minitron_fast.data.sources import corpus_fingerprint
    from minitron_fast.pipeline.check import data_needs
    from minitron_fast.pipeline.recipe import load_recipe

    small = tmp_path / "small.txt"
    small.write_text("A few words.\n\nAnd a second paragraph.\n")
    over = [f"teacher={tiny_teacher}", "prune.target=ffn=64", f"data.source={small}", "data.seq_len=64",
            "importance.depth_lm_loss=true", "distill.teacher=offline", "teacher_logits.samples=3"]
    keys = {k for k, *_ in data_needs(load_recipe("demo", over))}
    assert len(keys) == 5
    rc, err, _ = _check(capsys, "demo", "--check", *over, f"out={tmp_path / 'run'}")
    assert rc == 2 and {ln.split(":")[1].strip() for ln in err} == keys, err
    assert all(" split of " in ln and "holds 0" in ln for ln in err), err
    # the count built the token shards the stages will read
    assert (token_cache_root() / corpus_fingerprint(small) / "meta.json").is_file()

    # enough data for all but the sample counts asked for
    rc, err, _ = _check(capsys, "demo", "--check", f"teacher={tiny_teacher}", "prune.target=ffn=64",
                        "importance.samples=100000", "distill.teacher=offline", "teacher_logits.samples=100000",
                        "data.seq_len=64", f"out={tmp_path / 'run'}")
    assert rc == 2 and [ln.split(":")[1].strip() for ln in err] == ["importance.samples", "teacher_logits.samples"]
    assert "needs 100,000 calib blocks of 64 tokens" in err[0]
    rc, err, _ = _check(capsys, "demo", "--check", f"teacher={tiny_teacher}", "prune.target=ffn=64",
                        "importance.samples=100000", "importance.allow_fewer=true", f"out={tmp_path / 'run'}")
    assert rc == 0 and not err, err


def test_a_large_source_not_yet_tokenized_is_not_tokenized_by_the_check(capsys, tmp_path, tiny_teacher, monkeypatch):
    from minitron_fast.data.shards import token_cache_root
    from minitron_fast.data.sources import corpus_fingerprint
    from minitron_fast.pipeline import check

    monkeypatch.setattr(check, "TOKENIZE_BYTES", 8)
    src = tmp_path / "big.txt"
    src.write_text("Words enough to pass the byte limit.\n")
    rc, err, _ = _check(capsys, "demo", "--check", f"teacher={tiny_teacher}", "prune.target=ffn=64",
                        f"data.source={src}", "importance.samples=100000", f"out={tmp_path / 'run'}")
    assert rc == 0 and not err  # not counted: nothing to report, and nothing built
    assert not (token_cache_root() / corpus_fingerprint(src)).exists()
