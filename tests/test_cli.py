"""The minitron-fast command: --help everywhere, `info`, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minitron_fast.cli import COMMANDS, build_parser, main

INFO_KEYS = ["family", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "num_hidden_layers", "vocab_size", "num_parameters"]


@pytest.fixture
def saved_tiny(tmp_path, tiny_builders):
    m = tiny_builders["mistral_nemo_like"]()
    m.save_pretrained(tmp_path / "m")
    return tmp_path / "m", m


def test_help_for_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for name in COMMANDS:
        assert name in top
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: minitron-fast " + name in capsys.readouterr().out


def test_info_json(saved_tiny, capsys):
    path, m = saved_tiny
    assert main(["info", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert list(info) == INFO_KEYS
    assert info["family"] == "mistral"
    assert info["head_dim"] == 24
    assert info["num_parameters"] == m.num_parameters()
    assert main(["info", "--model", str(path)]) == 0
    assert "num_key_value_heads" in capsys.readouterr().out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_model_dir(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_dir_without_config(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path)]) == 2
    assert "no config.json" in _one_line_error(capsys)


def test_unsupported_family(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "gpt2" in err.lower() and "LlamaForCausalLM" in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "minitron_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: minitron-fast" in out.stdout


def test_parser_builds_without_heavy_imports():
    # --help must not load transformers' models: parsing stays cheap
    parser = build_parser()
    assert parser.prog == "minitron-fast"
