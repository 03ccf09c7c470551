"""Resolving and loading models: a checkpoint directory, or ``demo`` for the embedded teacher."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from minitron_fast.errors import MinitronError
from minitron_fast.models import ModelView, get_view, view_class_for_config

DEMO = "demo"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """``"demo"`` -> the embedded SmolLM2-135M checkpoint (converted on first use); else a
    directory holding an HF ``config.json``, checked to exist."""
    if str(model) == DEMO:
        from minitron_fast.models.embedded import embedded_model_path

        return embedded_model_path()
    p = Path(model).expanduser()
    if not p.exists():
        raise MinitronError(f"model directory {p} does not exist; pass a Hugging Face checkpoint directory or 'demo'")
    if not p.is_dir():
        raise MinitronError(f"--model {p} is a file; pass the checkpoint directory that holds config.json")
    if not (p / "config.json").is_file():
        raise MinitronError(f"{p} has no config.json; pass a Hugging Face checkpoint directory (save_pretrained layout)")
    return p


def load_config(model: str | os.PathLike) -> Any:
    """The HF config of ``model`` (a directory or ``demo``), checked to be a supported family."""
    from transformers import AutoConfig

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise MinitronError(f"cannot read {path / 'config.json'}: {exc}") from exc
    view_class_for_config(config)
    return config


def load_model(model: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, device_map: str | dict | None = None) -> torch.nn.Module:
    """Loads a supported causal LM for training or analysis (eval mode, no hub access).

    ``attn_implementation`` defaults to flash-attn 2 on CUDA when installed, else SDPA.
    ``device_map`` (e.g. ``"auto"``, through accelerate) spreads a model larger than one GPU over
    the visible devices; ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(model)
    path = resolve_model_path(model)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if attn_implementation is None:
        attn_implementation = default_attn_implementation(device, config)
    kw = {"device_map": device_map} if device_map else {}
    m = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn_implementation,
                                             **kw)
    if not device_map:
        m.to(device)
    m.eval()
    return m


def load_view(model: str | os.PathLike, **kw: Any) -> ModelView:
    return get_view(load_model(model, **kw))


def default_attn_implementation(device: str | torch.device, config: Any = None) -> str:
    """flash-attn 2 on CUDA when installed, else the family's own default (SDPA; Gemma 2: eager,
    since SDPA cannot softcap attention scores)."""
    if torch.device(device).type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return view_class_for_config(config).default_attn_implementation if config is not None else "sdpa"


def meta_model(config: Any) -> torch.nn.Module:
    """The model of ``config`` on the meta device: exact parameter shapes, no memory, instant."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(model: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise MinitronError(f"{path} has no usable tokenizer files ({exc}); copy the tokenizer next to the weights") from exc
