"""The table-driven bad-input suite: every row is one kind of bad input or fault, run in process
through ``minitron_fast.cli.main(argv)``.

Each row names the command, the expected exit status and a substring of the one-line ``error:``
message. For every row the suite also checks that

- stderr holds exactly one ``error:`` line and no traceback;
- no file under the suite's root changed (every input's sha256 is the same) and nothing was
  added or removed: no partial output, no hidden temporary file, no record.

The inputs are tiny random models (saved with the real SmolLM2 tokenizer) and a short text file,
so the whole table runs in seconds.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TEXT = None


def _text() -> str:
    import pydoc_data.topics as t

    return "\n\n".join(list(t.topics.values())[:40])


def _save_tiny(path: Path, tok_src: Path, *, seed: int = 0, **kw: Any) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron_fast.models.export import copy_tokenizer_files

    torch.manual_seed(seed)
    cfg = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    cfg.update(kw)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(path)
    copy_tokenizer_files(tok_src, path)


def _variant(root: Path, name: str, edit: Callable[[Path], None]) -> Path:
    dst = root / name
    shutil.copytree(root / "model", dst)
    edit(dst)
    return dst


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        sd = load_file(d / "model.safetensors")
        fn(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return edit


def _edit_config(fn: Callable[[dict], Any]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        c = json.loads((d / "config.json").read_text())
        r = fn(c)
        (d / "config.json").write_text(json.dumps(c if r is None else r))
    return edit


def _write(d: Path, name: str, data: bytes) -> None:
    (d / name).write_bytes(data)


@pytest.fixture(scope="module")
def env(tmp_path_factory, demo_model_dir):
    """The suite's root: a tiny model and its broken variants, data, scores, a plan, recipes."""
    from minitron_fast.cli import main

    root = tmp_path_factory.mktemp("bad_input")
    tok = Path(demo_model_dir)
    _save_tiny(root / "model", tok)
    (root / "data.txt").write_text(_text())
    (root / "notes.txt").write_text("my notes\n")
    assert main(["importance", "--model", str(root / "model"), "--data", str(root / "data.txt"), "--out",
                 str(root / "scores.safetensors"), "--samples", "4", "--seq-len", "16", "--batch-size", "4",
                 "--no-heatmap", "--threads", "1"]) == 0
    assert main(["prune", "--model", str(root / "model"), "--scores", str(root / "scores.safetensors"),
                 "--target", "ffn=32", "--plan-only", "--out", str(root / "plan.json")]) == 0
    # broken model directories
    _variant(root, "m_missing", _edit_tensors(lambda sd: sd.pop("model.layers.0.mlp.up_proj.weight")))
    _variant(root, "m_extra", _edit_tensors(lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight",
                                                                        torch.zeros(4, 4))))
    _variant(root, "m_shape", _edit_tensors(lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.weight",
                                                                        torch.zeros(63, 32))))

    def truncate(d: Path) -> None:
        b = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(b[: len(b) // 2])
    _variant(root, "m_trunc", truncate)
    _variant(root, "m_garbage", lambda d: _write(d, "model.safetensors", b"\x00garbage" * 100))

    def weights_dir(d: Path) -> None:
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").mkdir()
    _variant(root, "m_weights_dir", weights_dir)
    _variant(root, "m_no_weights", lambda d: (d / "model.safetensors").unlink())
    _variant(root, "m_badjson", lambda d: _write(d, "config.json", b'{"model_type": "llama", '))
    _variant(root, "m_list", lambda d: _write(d, "config.json", b"[1, 2]"))
    _variant(root, "m_latin1", lambda d: _write(d, "config.json", '{"model_type": "llama", "x": "\xe9"}'.encode("latin-1")))
    _variant(root, "m_typo", _edit_config(lambda c: c.__setitem__("hidden_size", "thirty-two")))
    _variant(root, "m_neg", _edit_config(lambda c: c.__setitem__("num_hidden_layers", -1)))
    _variant(root, "m_automap", _edit_config(lambda c: c.__setitem__("auto_map", {
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})))
    _variant(root, "m_gpt2", _edit_config(lambda c: {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))

    def config_dir(d: Path) -> None:
        (d / "config.json").unlink()
        (d / "config.json").mkdir()
    _variant(root, "m_config_dir", config_dir)
    _variant(root, "m_no_tokenizer", lambda d: [(d / t).unlink() for t in ("tokenizer.json", "tokenizer_config.json")
                                                 if (d / t).exists()])
    (root / "empty_dir").mkdir()
    (root / "not_mine").mkdir()
    (root / "not_mine" / "precious.txt").write_text("do not delete\n")
    (root / "has_scores").mkdir()
    shutil.copy2(root / "scores.safetensors", root / "has_scores" / "scores.safetensors")
    (root / "scores.png").write_bytes(b"\x89PNG not really")
    (root / "out_scores.safetensors").write_bytes(b"an earlier result")
    (root / "plan_bad.json").write_text("{not json")
    (root / "garbage.safetensors").write_bytes(b"\x01\x02garbage")
    (root / "text.bin").write_bytes(b"\xff\xfe\x00bad")
    (root / "recipe_bad.yaml").write_text("steps: [1, 2\n")
    (root / "recipe_latin1.yaml").write_bytes("teacher: caf\xe9\n".encode("latin-1"))
    (root / "recipe_list.yaml").write_text("- 1\n- 2\n")
    # a distill run directory: run.json, latest, a checkpoint directory (no weights needed for the
    # checks that fail before loading)
    distill = {"teacher": str(root / "model"), "student": str(root / "model2"), "data.source": str(root / "data.txt"),
               "data.seq_len": 16, "steps": 2, "micro_batch_size": 1, "data.eval_blocks": 0, "export": False}
    _save_tiny(root / "model2", tok, seed=1, hidden_size=16, intermediate_size=32)
    from minitron_fast.distill.config import load_config as load_distill

    cfg = load_distill(None, [f"{k}={v}" for k, v in distill.items()] + [f"out={root / 'run'}"])
    (root / "run" / "checkpoints" / "step2").mkdir(parents=True)
    (root / "run" / "run.json").write_text(json.dumps({"fingerprint": cfg.fingerprint(), "world_size": 1}))
    (root / "run" / "checkpoints" / "latest").write_text("step2")
    for name, edit in {"run_bad_latest": lambda d: _write(d / "checkpoints", "latest", b"\x00garbage"),
                       "run_missing_step": lambda d: _write(d / "checkpoints", "latest", b"step9"),
                       "run_bad_json": lambda d: _write(d, "run.json", b"{truncated"),
                       "run_world": lambda d: _write(d, "run.json", json.dumps(
                           {"fingerprint": cfg.fingerprint(), "world_size": 4}).encode())}.items():
        shutil.copytree(root / "run", root / name)
        edit(root / name)
    (root / "recipe.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {
        "teacher": str(root / "model"), "student": str(root / "model2"), "steps": 2, "micro_batch_size": 1,
        "export": False}.items()) + f"data: {{source: {json.dumps(str(root / 'data.txt'))}, seq_len: 16, "
        "eval_blocks: 0}\n")
    (root / "pipeline.yaml").write_text(
        f"teacher: {json.dumps(str(root / 'model'))}\nout: {json.dumps(str(root / 'pipe'))}\n"
        f"data: {{source: {json.dumps(str(root / 'data.txt'))}, seq_len: 16}}\n"
        "importance: {samples: 8}\n"  # what the small data file holds (run --check counts it)
        "prune: {target: ffn=32}\n")
    return root


def _d(root: Path, *overrides: str) -> list[str]:
    """distill argv with the suite's recipe and extra key=value overrides."""
    return ["distill", "--config", str(root / "recipe.yaml"), f"out={root / 'dout'}", *overrides]


# (id, argv template, expected exit status, substring of the error line[, setup]). In the argv,
# "{r}" is the suite's root; setup(root, monkeypatch) arranges a fault for the row.
M = "--model {r}/model"
IMP = "importance --data {r}/data.txt --samples 2 --seq-len 16 --batch-size 2 --threads 1 --no-heatmap"
PRUNE = "prune --model {r}/model --scores {r}/scores.safetensors --target ffn=32"
TL = "teacher-logits --data {r}/data.txt --top-k 4 --seq-len 16 --samples 2"
EVAL = "eval --data {r}/data.txt --seq-len 16 --eval-blocks 1 --batch-size 1"
SEARCH = "search --model {r}/model --scores {r}/scores.safetensors --params 0.9x --data {r}/data.txt --seq-len 16"


def _enospc_on_fsync(root, mp):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    mp.setattr(os, "fsync", full)


def _enospc_on_save(root, mp):
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def full(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)  # a partial file on disk, then the device fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
    mp.setattr(mu, "safe_save_file", full)


def _eacces_on_mkstemp(root, mp):
    import tempfile

    def deny(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(k.get("dir")))
    mp.setattr(tempfile, "mkstemp", deny)


def _unreadable_config(root, mp):
    import pathlib

    real = pathlib.Path.read_text

    def read_text(self, *a, **k):  # what chmod 000 does to a non-root user
        if self.name == "config.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *a, **k)
    mp.setattr(pathlib.Path, "read_text", read_text)


def _hold_lock(sub: str):
    def setup(root, mp):
        from minitron_fast.io import RunLock

        # the holder's lock file is part of the snapshot taken after setup; released at teardown
        _HOLDERS.append(RunLock(root / sub).acquire())
    return setup


_HOLDERS: list = []


def _no_cuda(root, mp):
    mp.setattr(torch.cuda, "is_available", lambda: False)


ROWS: list[tuple] = [
    # -- info: model directories and configs
    ("info-no-such-dir", "info --model {r}/nope", 2, "does not exist"),
    ("info-model-is-file", "info --model {r}/data.txt", 2, "is a file"),
    ("info-no-config", "info --model {r}/empty_dir", 2, "has no config.json"),
    ("info-config-is-dir", "info --model {r}/m_config_dir", 2, "has no config.json"),
    ("info-config-bad-json", "info --model {r}/m_badjson", 2, "cannot read"),
    ("info-config-list", "info --model {r}/m_list", 2, "not an object"),
    ("info-config-not-utf8", "info --model {r}/m_latin1", 2, "cannot read"),
    ("info-config-mistyped", "info --model {r}/m_typo", 2, "hidden_size"),
    ("info-config-negative", "info --model {r}/m_neg", 2, "num_hidden_layers must be a positive integer"),
    ("info-config-auto-map", "info --model {r}/m_automap", 2, "custom model code"),
    ("info-config-unreadable", "info --model {r}/model", 2, "Permission denied", _unreadable_config),
    ("info-unsupported-family", "info --model {r}/m_gpt2", 2, "unsupported model family"),
    ("no-subcommand-args", "info", 2, "--model"),
    # -- eval: every loading failure is one line, and --json never lands on an input
    ("eval-missing-tensor", EVAL + " --model {r}/m_missing", 2, "has no tensor model.layers.0.mlp.up_proj.weight"),
    ("eval-extra-tensor", EVAL + " --model {r}/m_extra", 2, "model.layers.0.mlp.extra.weight"),
    ("eval-wrong-shape", EVAL + " --model {r}/m_shape", 2, "wrong shape: model.layers.0.mlp.up_proj.weight"),
    ("eval-truncated-safetensors", EVAL + " --model {r}/m_trunc", 2, "cannot load the weights"),
    ("eval-garbage-safetensors", EVAL + " --model {r}/m_garbage", 2, "cannot load the weights"),
    ("eval-weights-is-dir", EVAL + " --model {r}/m_weights_dir", 2, "missing or not a file"),
    ("eval-no-weights", EVAL + " --model {r}/m_no_weights", 2, "cannot load the weights"),
    ("eval-no-tokenizer", EVAL + " --model {r}/m_no_tokenizer", 2, "no usable tokenizer"),
    ("eval-json-in-model-dir", EVAL + " " + M + " --json {r}/model/eval.json", 2, "inside the input model directory"),
    ("eval-json-is-data", EVAL + " " + M + " --json {r}/data.txt", 2, "is an input"),
    ("eval-json-is-dir", EVAL + " " + M + " --json {r}/empty_dir", 2, "is a directory"),
    ("eval-json-parent-is-file", EVAL + " " + M + " --json {r}/notes.txt/eval.json", 2, "is a file"),
    ("eval-seq-len-past-context", "eval --data {r}/data.txt --seq-len 65 " + M, 2, "max_position_embeddings"),
    ("eval-seq-len-1", "eval --data {r}/data.txt --seq-len 1 " + M, 2, "seq_len"),
    ("eval-batch-size-0", "eval --data {r}/data.txt --seq-len 16 --batch-size 0 " + M, 2, "--batch-size"),
    ("eval-eval-blocks-0", "eval --data {r}/data.txt --seq-len 16 --eval-blocks 0 " + M, 2, "--eval-blocks"),
    ("eval-no-such-data", "eval --data {r}/nope.txt --seq-len 16 " + M, 2, "nope.txt"),
    ("eval-bad-split", EVAL + " " + M + " --split test", 2, "invalid choice"),
    # -- importance
    ("importance-out-png", IMP.replace(" --no-heatmap", "") + " " + M + " --out {r}/x.png", 2,
     "written over the scores"),
    ("importance-out-exists", IMP + " " + M + " --out {r}/out_scores.safetensors", 2, "already exists"),
    ("importance-out-is-data", IMP + " " + M + " --out {r}/data.txt", 2, "is an input"),
    ("importance-out-in-model", IMP + " " + M + " --out {r}/model/s.safetensors", 2, "inside the input model directory"),
    ("importance-out-is-dir", IMP + " " + M + " --out {r}/empty_dir", 2, "is a directory"),
    ("importance-heatmap-exists", IMP.replace(" --no-heatmap", "") + " " + M + " --out {r}/scores_new.safetensors",
     2, "already exists", lambda r, mp: shutil.copy2(r / "scores.png", r / "scores_new.png")),
    ("importance-samples-0", IMP + " " + M + " --out {r}/s.safetensors --samples 0", 2, "--samples"),
    ("importance-batch-size-0", IMP + " " + M + " --out {r}/s.safetensors --batch-size 0", 2, "--batch-size"),
    ("importance-seq-len-past-context", IMP + " " + M + " --out {r}/s.safetensors --seq-len 100", 2,
     "max_position_embeddings"),
    ("importance-device-cuda-without-cuda", IMP + " " + M + " --out {r}/s.safetensors --device cuda", 2,
     "CUDA is not available", _no_cuda),
    ("importance-device-bogus", IMP + " " + M + " --out {r}/s.safetensors --device tpu7", 2, "device"),
    ("importance-missing-tensor", IMP + " --model {r}/m_missing --out {r}/s.safetensors", 2, "has no tensor"),
    ("importance-wrong-shape", IMP + " --model {r}/m_shape --out {r}/s.safetensors", 2, "wrong shape"),
    ("importance-too-few-samples", IMP + " " + M + " --out {r}/s.safetensors --samples 100000", 2, "fewer than"),
    ("importance-depth-block-0", IMP + " " + M + " --out {r}/s.safetensors --depth-lm-loss --depth-block 0", 2,
     "--depth-block"),
    ("importance-bad-agg", IMP + " " + M + " --out {r}/s.safetensors --seq-agg max", 2, "invalid choice"),
    ("importance-disk-full", IMP + " " + M + " --out {r}/s.safetensors", 2, "no space left", _enospc_on_fsync),
    # -- prune
    ("prune-missing-tensor-in-memory", PRUNE + " --model {r}/m_missing --out {r}/p --no-streaming", 2, "has no tensor"),
    ("prune-missing-tensor-streaming", PRUNE + " --model {r}/m_missing --out {r}/p --streaming", 2, "has no tensor"),
    ("prune-extra-tensor-in-memory", PRUNE + " --model {r}/m_extra --out {r}/p --no-streaming", 2, "model.layers.0.mlp.extra"),
    ("prune-extra-tensor-streaming", PRUNE + " --model {r}/m_extra --out {r}/p --streaming", 2,
     "model.layers.0.mlp.extra"),
    ("prune-wrong-shape-in-memory", PRUNE + " --model {r}/m_shape --out {r}/p --no-streaming", 2,
     "model.layers.0.mlp.up_proj.weight"),
    ("prune-wrong-shape-streaming", PRUNE + " --model {r}/m_shape --out {r}/p --streaming", 2, "has shape"),
    ("prune-truncated-streaming", PRUNE + " --model {r}/m_trunc --out {r}/p --streaming", 2, "truncated"),
    ("prune-overwrite-holds-scores", "prune --model {r}/model --scores {r}/has_scores/scores.safetensors "
     "--target ffn=32 --out {r}/has_scores --overwrite", 2, "would delete that input"),
    ("prune-overwrite-not-ours", PRUNE + " --out {r}/not_mine --overwrite", 2, "not written by minitron_fast"),
    ("prune-out-exists", PRUNE + " --out {r}/not_mine", 2, "already exists"),
    ("prune-out-in-model", PRUNE + " --out {r}/model/pruned", 2, "inside the input model directory"),
    ("prune-out-is-file", PRUNE + " --out {r}/notes.txt", 2, "is a file"),
    ("prune-out-is-model", PRUNE + " --out {r}/model --overwrite", 2, "is an input"),
    ("prune-no-scores-no-plan", "prune " + M + " --out {r}/p", 2, "--scores"),
    ("prune-no-out", PRUNE, 2, "--out"),
    ("prune-scores-missing", "prune " + M + " --scores {r}/nope.safetensors --target ffn=32 --out {r}/p", 2,
     "does not exist"),
    ("prune-scores-garbage", "prune " + M + " --scores {r}/garbage.safetensors --target ffn=32 --out {r}/p", 2,
     "garbage.safetensors"),
    ("prune-plan-bad-json", "prune " + M + " --plan {r}/plan_bad.json --out {r}/p", 2, "plan_bad.json"),
    ("prune-plan-only-over-scores", PRUNE + " --plan-only --out {r}/scores.safetensors --overwrite", 2,
     "is an input"),
    ("prune-plan-only-over-plan", "prune " + M + " --plan {r}/plan.json --plan-only --out {r}/plan.json --overwrite",
     2, "is an input"),
    ("prune-plan-only-exists", PRUNE + " --plan-only --out {r}/notes.txt", 2, "already exists"),
    ("prune-plan-only-is-dir", PRUNE + " --plan-only --out {r}/empty_dir", 2, "is a directory"),
    ("prune-target-unknown-key", PRUNE.replace("ffn=32", "fnn=32") + " --out {r}/p", 2, "fnn"),
    ("prune-target-too-big", PRUNE.replace("ffn=32", "ffn=1000") + " --out {r}/p", 2, "ffn"),
    ("prune-model-auto-map", PRUNE + " --model {r}/m_automap --out {r}/p", 2, "custom model code"),
    ("prune-disk-full-in-memory", PRUNE + " --out {r}/p --no-streaming", 2, "no space left", _enospc_on_save),
    ("prune-plan-permission-denied", PRUNE + " --plan-only --out {r}/plan2.json", 2, "Permission denied",
     _eacces_on_mkstemp),
    ("prune-disk-full-plan", PRUNE + " --plan-only --out {r}/plan2.json", 2, "no space left", _enospc_on_fsync),
    # -- search
    ("search-max-candidates-0", SEARCH + " --out {r}/s --max-candidates 0", 2, "--max-candidates must be at least 1"),
    ("search-out-is-file", SEARCH + " --out {r}/notes.txt", 2, "is a file"),
    ("search-out-in-model", SEARCH + " --out {r}/model/search", 2, "inside the input model directory"),
    ("search-bad-budget", SEARCH.replace("0.9x", "lots") + " --out {r}/s", 2, "lots"),
    ("search-seq-len-past-context", SEARCH.replace("--seq-len 16", "--seq-len 128") + " --out {r}/s", 2,
     "max_position_embeddings"),
    ("search-lr-nan", SEARCH + " --out {r}/s --lr nan", 2, "--lr"),
    ("search-micro-batch-0", SEARCH + " --out {r}/s --micro-batch-size 0", 2, "--micro-batch-size"),
    ("search-tolerance-0", SEARCH + " --out {r}/s --tolerance 0", 2, "tolerance"),
    ("search-missing-tensor", SEARCH.replace("{r}/model", "{r}/m_missing").replace("0.9x", "0.97x")
     + " --out {r}/s --tolerance 0.5 --kinds width --max-candidates 1", 2, "has no tensor"),
    # -- distill: recipe values, the run directory, the lock
    ("distill-lr-nan", None, 2, "lr must be a finite number", None, lambda r: _d(r, "lr=.nan")),
    ("distill-temperature-nan", None, 2, "loss.temperature must be a finite", None,
     lambda r: _d(r, "loss.temperature=.nan")),
    ("distill-adam-betas", None, 2, "adam_betas[0] must be below 1", None, lambda r: _d(r, "adam_betas=[2,3]")),
    ("distill-min-lr-above-lr", None, 2, "min_lr", None, lambda r: _d(r, "lr=1e-4", "min_lr=1e-3")),
    ("distill-negative-weight-decay", None, 2, "weight_decay", None, lambda r: _d(r, "weight_decay=-0.1")),
    ("distill-lr-inf", None, 2, "lr must be a finite", None, lambda r: _d(r, "lr=.inf")),
    ("distill-steps-0", None, 2, "steps must be at least 1", None, lambda r: _d(r, "steps=0")),
    ("distill-batch-size-0", None, 2, "micro_batch_size must be at least 1", None,
     lambda r: _d(r, "micro_batch_size=0")),
    ("distill-beta-out-of-range", None, 2, "loss.beta", None, lambda r: _d(r, "loss.beta=2")),
    ("distill-negative-kd-weight", None, 2, "loss.kd_weight", None, lambda r: _d(r, "loss.kd_weight=-1")),
    ("distill-unknown-key", None, 2, "stepz", None, lambda r: _d(r, "stepz=3")),
    ("distill-seq-len-past-context", None, 2, "max_position_embeddings", None, lambda r: _d(r, "data.seq_len=65")),
    ("distill-teacher-auto-map", None, 2, "custom model code", None, lambda r: _d(r, f"teacher={r}/m_automap")),
    ("distill-config-missing", "distill --config {r}/nope.yaml", 2, "does not exist"),
    ("distill-config-bad-yaml", "distill --config {r}/recipe_bad.yaml", 2, "not valid YAML"),
    ("distill-config-not-utf8", "distill --config {r}/recipe_latin1.yaml", 2, "not UTF-8"),
    ("distill-config-list", "distill --config {r}/recipe_list.yaml", 2, "mapping"),
    ("distill-hostfile-missing", None, 2, "--hostfile", None, lambda r: _d(r, "--hostfile", f"{r}/nope_hosts")),
    ("distill-nproc-0", None, 2, "--nproc", None, lambda r: _d(r, "--nproc", "0")),
    ("distill-out-not-empty", None, 2, "is not empty", None, lambda r: _d(r, f"out={r}/not_mine")),
    ("distill-out-is-teacher", None, 2, "input model directory", None, lambda r: _d(r, f"out={r}/model")),
    ("distill-out-is-file", None, 2, "is a file", None, lambda r: _d(r, f"out={r}/notes.txt")),
    ("distill-resume-other-run", None, 2, "belongs to a different run", None,
     lambda r: _d(r, f"out={r}/run", "lr=1e-3", "--resume")),
    ("distill-resume-corrupt-latest", None, 2, "latest is corrupt", None,
     lambda r: _d(r, f"out={r}/run_bad_latest", "--resume")),
    ("distill-resume-latest-names-missing", None, 2, "names step9", None,
     lambda r: _d(r, f"out={r}/run_missing_step", "--resume")),
    ("distill-resume-corrupt-run-json", None, 2, "corrupt", None, lambda r: _d(r, f"out={r}/run_bad_json", "--resume")),
    ("distill-resume-other-world", None, 2, "ranks", None, lambda r: _d(r, f"out={r}/run_world", "--resume")),
    ("distill-resume-not-a-run", None, 2, "holds no run.json", None, lambda r: _d(r, f"out={r}/not_mine", "--resume")),
    ("distill-locked", None, 2, "in use by another minitron_fast run (PID", _hold_lock("run"),
     lambda r: _d(r, f"out={r}/run", "--resume")),
    # -- run / demo
    ("run-dir-as-recipe", "run {r}/run", 2, "is a directory"),
    ("run-missing-recipe", "run nope-recipe", 2, "not found"),
    ("run-recipe-bad-yaml", "run {r}/recipe_bad.yaml", 2, "not valid YAML"),
    ("run-recipe-not-utf8", "run {r}/recipe_latin1.yaml", 2, "not UTF-8"),
    ("run-unknown-override", "run {r}/pipeline.yaml --dry-run prune.tagret=ffn=32", 2, "tagret"),
    ("run-redo-bogus", "run {r}/pipeline.yaml --redo bogus", 2, "unknown stage"),
    ("run-search-max-candidates-0", "run {r}/pipeline.yaml search.enabled=true search.params=0.9x "
     "search.max_candidates=0", 2, "max_candidates"),
    ("run-distill-lr-nan", "run {r}/pipeline.yaml distill.lr=.nan", 2, "lr must be a finite"),
    ("run-seq-len-past-context", "run {r}/pipeline.yaml data.seq_len=65", 2, "max_position_embeddings"),
    ("run-out-in-teacher", "run {r}/pipeline.yaml --out {r}/model/run", 2, "inside the teacher"),
    ("run-out-is-file", "run {r}/pipeline.yaml --out {r}/notes.txt", 2, "is a file"),
    ("run-teacher-missing", "run {r}/pipeline.yaml teacher={r}/nope", 2, "does not exist"),
    ("run-locked", "run {r}/pipeline.yaml --out {r}/run", 2, "in use by another minitron_fast run (PID",
     _hold_lock("run")),
    ("memory-missing-recipe", "memory nope-recipe", 2, "not found"),
    ("memory-dir-as-recipe", "memory {r}/run", 2, "is a directory"),
    ("memory-world-0", "memory demo --world 0", 2, "--world must be at least 1"),
    ("memory-gpu-mem-garbage", "memory demo --gpu-mem lots", 2, "is not a size"),
    ("memory-json-is-recipe", "memory {r}/pipeline.yaml --json {r}/pipeline.yaml", 2, "is an input"),
    ("memory-json-is-dir", "memory demo --json {r}/empty_dir", 2, "is a directory"),
    ("memory-bad-override", "memory demo distill.micro_batch_size=0", 2, "micro_batch_size must be at least 1"),
    ("demo-max-tokens-0", "demo --max-tokens 0 --out {r}/demo", 2, "--max-tokens must be positive"),
    ("demo-redo-bogus", "demo --redo bogus --out {r}/demo", 2, "unknown stage"),
    ("teacher-logits-missing-model", TL + " --model {r}/nope --out {r}/tl", 2, "does not exist"),
    ("teacher-logits-top-k-0", TL + " " + M + " --out {r}/tl --top-k 0", 2, "top_k"),
    ("teacher-logits-out-in-model", TL + " " + M + " --out {r}/model/tl", 2, "refusing to write teacher logits into the input"),
    ("teacher-logits-out-is-data", TL + " " + M + " --out {r}/data.txt", 2, "data.txt"),
    ("teacher-logits-seq-len-past-context", TL + " " + M + " --out {r}/tl --seq-len 65", 2, "max_position_embeddings"),
    ("unknown-subcommand", "frobnicate", 2, "invalid choice"),
]


def _snapshot(root: Path, cache: dict) -> dict[str, str]:
    """path -> sha256 of every file (and '<dir>' for every directory) under ``root``."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, d), root)] = "<dir>"
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            key = (p, st.st_size, st.st_mtime_ns, st.st_ino)
            if key not in cache:
                cache[key] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            snap[os.path.relpath(p, root)] = cache[key]
    return snap


_HASH_CACHE: dict = {}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row, env, capsys, monkeypatch):
    from minitron_fast.cli import main
    from minitron_fast.io import LOCK

    name, argv, status, needle = row[:4]
    setup = row[4] if len(row) > 4 else None
    build = row[5] if len(row) > 5 else None
    argv = build(env) if build else [a.replace("{r}", str(env)) for a in argv.split()]
    monkeypatch.setenv("TQDM_DISABLE", "1")
    if setup:
        setup(env, monkeypatch)
    before = _snapshot(env, _HASH_CACHE)
    capsys.readouterr()
    try:
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code
        err = capsys.readouterr().err
    finally:
        monkeypatch.undo()
        while _HOLDERS:
            _HOLDERS.pop().release()
    assert rc == status, f"{name}: exit {rc}, stderr:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or ": error:" in ln]
    assert len(lines) == 1, f"{name}: want one error line, got:\n{err[-2000:]}"
    assert needle in lines[0], f"{name}: {needle!r} not in {lines[0]!r}"
    after = _snapshot(env, _HASH_CACHE)
    # a lock file a row's own run created and released is allowed to remain (empty): no record
    created = {k: v for k, v in after.items() if k not in before}
    allowed = {k for k in created if Path(k).name == LOCK and (env / k).stat().st_size == 0}
    changed = {k for k in before if after.get(k) != before[k] and not (Path(k).name == LOCK)}
    assert not changed, f"{name}: inputs changed or removed: {sorted(changed)[:5]}"
    extra = sorted(set(created) - allowed)
    # a run directory created just to hold the lock is allowed too, when it holds nothing else
    extra = [k for k in extra if not (before.get(k) is None and after[k] == "<dir>"
                                      and {p.name for p in (env / k).iterdir()} <= {LOCK})]
    assert not extra, f"{name}: left behind {extra[:5]}"


def test_suite_covers_every_subcommand_and_80_kinds():
    from minitron_fast.cli import COMMANDS

    assert len(ROWS) >= 80 and len({r[0] for r in ROWS}) == len(ROWS)
    seen = {(r[5](Path("/x"))[0] if len(r) > 5 and r[5] else r[1].split()[0]) for r in ROWS}
    assert set(COMMANDS) <= seen, set(COMMANDS) - seen
