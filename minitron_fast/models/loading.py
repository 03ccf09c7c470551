"""Resolving and loading models: a checkpoint directory, or ``demo`` for the embedded teacher."""
from __future__ import annotations

import contextlib
import json
import gc
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


# geometry fields that must be positive integers for every supported family
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings")


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers and safetensors write several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def read_config_json(path: Path) -> dict[str, Any]:
    """``path/config.json`` as a dict; unreadable or malformed files are one-line errors."""
    f = path / "config.json"
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MinitronError(f"cannot read {f}: {_one_line(exc)}; restore the checkpoint's config.json") from None
    if not isinstance(d, dict):
        raise MinitronError(f"{f} holds a JSON {type(d).__name__}, not an object; restore the checkpoint's config.json")
    return d


def load_config(model: str | os.PathLike) -> Any:
    """The HF config of ``model`` (a directory or ``demo``), checked to be a supported family.

    Never runs code from the directory: a config that names custom code (``auto_map``) is an
    error, and transformers is called with ``trust_remote_code=False``."""
    from transformers import AutoConfig

    path = resolve_model_path(model)
    raw = read_config_json(path)
    if raw.get("auto_map"):
        raise MinitronError(f"{path / 'config.json'} asks for custom model code (auto_map: "
                            f"{', '.join(sorted(raw['auto_map']))}); minitron_fast never runs code from a model "
                            "directory: use a checkpoint of a supported family without auto_map")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError, KeyError, strict-dataclass and OS errors here
        raise MinitronError(f"cannot read {path / 'config.json'}: {_one_line(exc)}") from None
    view_class_for_config(config)
    for k in _POSITIVE_INTS:
        v = getattr(config, k, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise MinitronError(f"{path / 'config.json'}: {k} must be a positive integer, got {v!r}")
    return config


def check_seq_len(config: Any, seq_len: int, what: str = "--seq-len") -> None:
    """``seq_len`` must be at least 2 and fit the model's context (``max_position_embeddings``)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise MinitronError(f"{what} must be an integer of at least 2, got {seq_len!r}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise MinitronError(f"{what} {seq_len} exceeds the model's context, max_position_embeddings ({max_pos}); "
                            f"use at most {max_pos}")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, checked to exist on this machine (one-line error otherwise)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MinitronError(f"--device {device!r} is not a device ({_one_line(exc)}); use cpu or cuda") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise MinitronError(f"--device {device} but CUDA is not available on this machine; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            from minitron_fast.configtools import cuda_devices_text

            raise MinitronError(f"--device {device} but this machine has {cuda_devices_text()}; pick one of them")
    elif d.type not in ("cpu", "meta"):
        raise MinitronError(f"--device {device}: only cpu and cuda are supported")
    return d


HALF_ONLY_ATTENTION = ("flash_attention_2", "flash_attention_3")


def check_attn_dtype(attn_implementation: str | None, dtype: torch.dtype, what: str = "--attn-implementation") -> None:
    """flash-attention runs fp16 and bf16 only: refuse fp32 in one line, before any weight loads
    (transformers would fail at the first forward: "only support fp16 and bf16")."""
    if attn_implementation in HALF_ONLY_ATTENTION and dtype not in (torch.float16, torch.bfloat16):
        raise MinitronError(f"{what} {attn_implementation} needs a bfloat16 or float16 model, but the dtype is "
                            f"{str(dtype).replace('torch.', '')}; set dtype to bfloat16 (or float16), or use "
                            "attn_implementation sdpa")


# non-persistent buffers some older checkpoints still carry; harmless when unexpected
IGNORED_UNEXPECTED = ("rotary_emb.inv_freq",)


def load_model(model: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, device_map: str | dict | None = None) -> torch.nn.Module:
    """Loads a supported causal LM for training or analysis (eval mode, no hub access).

    ``attn_implementation`` defaults to flash-attn 2 on CUDA when installed and ``dtype`` is bf16 or
    fp16, else SDPA; flash-attention with fp32 is refused in one line.
    ``device_map`` (e.g. ``"auto"``, through accelerate) spreads a model larger than one GPU over
    the visible devices; ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(model)
    path = resolve_model_path(model)
    device = check_device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if attn_implementation is None:
        attn_implementation = default_attn_implementation(device, config, dtype)
    check_attn_dtype(attn_implementation, dtype)
    check_tensor_shapes(path, config)
    if not device_map and _zero3_active():
        m = load_zero3_by_shard(path, config, dtype=dtype, attn_implementation=attn_implementation)
        if m is not None:
            return m.eval()
    kw = {"device_map": device_map} if device_map else {}
    try:
        m, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                       attn_implementation=attn_implementation,
                                                       trust_remote_code=False, output_loading_info=True, **kw)
    except Exception as exc:  # safetensors, OS and size-mismatch errors; each names the tensor or file
        raise MinitronError(f"cannot load the weights in {path}: {_one_line(exc)}") from None
    check_loading_info(info, path)
    if not device_map:
        m.to(device)
    m.eval()
    return m


def _zero3_active() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


def _safetensors_files(path: Path) -> list[Path] | None:
    """The checkpoint's safetensors files (from its index when sharded), or None when it has none;
    an unreadable index is a one-line error."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MinitronError(f"{index} is not a valid safetensors index ({_one_line(exc)})") from None
        return [path / f for f in shards]
    return [path / "model.safetensors"] if (path / "model.safetensors").exists() else None


def load_zero3_by_shard(path: Path, config, *, dtype: torch.dtype,
                        attn_implementation: str | None) -> torch.nn.Module | None:
    """Builds the model partitioned (``deepspeed.zero.Init`` through transformers, weights not
    initialized) and fills it one safetensors shard at a time: global rank 0 reads each tensor
    from the open shard into its module's gathered parameters (``GatheredParameters``,
    ``modifier_rank=0``, one module at a time) and closes the shard before opening the next, so
    no rank maps more than one shard file. (transformers' ZeRO-3 loader maps every shard at once
    on rank 0: in ``bench scale`` that put 2.0 GB of checkpoint pages in rank 0's resident size.)
    Shapes are checked against the partitioned parameters' full shapes (``ds_shape``).

    Only for checkpoints whose tensor names are the model's own parameter and buffer names
    (Llama, Qwen, Gemma, Mistral and the checkpoints this tool writes); None for others (a
    checkpoint transformers converts on load, e.g. per-expert MoE weights into fused ones), and
    the caller uses transformers' loader. Missing tensors are an error, as in ``load_model``."""
    files = _safetensors_files(path)
    shapes = safetensors_shapes(path) if files is not None else None
    if not shapes:
        return None
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    state = dict(model.named_parameters())  # tied weights once, under their first name
    full = {**{k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in model.named_parameters(remove_duplicate=False)},
            **{k: tuple(b.shape) for k, b in model.named_buffers()}}
    wanted = {k for k in shapes if not k.endswith(IGNORED_UNEXPECTED)}
    if not wanted <= set(full):
        del model
        return None  # names transformers would convert: its own loader
    check_loading_info({"missing_keys": [k for k in state if k not in wanted],
                        "mismatched_keys": [f"{k} {shapes[k]} (the config says {full[k]})" for k in sorted(wanted)
                                            if tuple(shapes[k]) != full[k]]}, path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    modules = dict(model.named_modules())
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            by_module: dict[str, list[str]] = {}
            for k in st.keys():
                if k in wanted:
                    by_module.setdefault(k.rpartition(".")[0], []).append(k)
            for mod_name, keys in by_module.items():
                leaves = [(k, getattr(modules[mod_name], k.rpartition(".")[2])) for k in keys]
                ps = [t for _, t in leaves if isinstance(t, torch.nn.Parameter)]
                gather = deepspeed.zero.GatheredParameters(ps, modifier_rank=0) if ps else contextlib.nullcontext()
                with gather, torch.no_grad():
                    for k, t in leaves:
                        if rank == 0 or not isinstance(t, torch.nn.Parameter):  # buffers: every rank reads
                            t.data.copy_(st.get_tensor(k))
    model.config._name_or_path = str(path)
    return model


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the safetensors headers of a checkpoint directory (no tensor
    data is read); None when it holds no safetensors. A missing shard or a corrupt/truncated
    header is a one-line error."""
    from safetensors import safe_open

    files = _safetensors_files(path)
    if files is None:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            raise MinitronError(f"checkpoint shard {f} is missing or not a file; restore the checkpoint")
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except Exception as exc:  # SafetensorError (truncated, corrupt header), OSError
            raise MinitronError(f"cannot load the weights in {path}: {f.name} is corrupt or truncated "
                                f"({_one_line(exc)}); restore the checkpoint") from None
    return shapes


def check_tensor_shapes(path: Path, config: Any) -> None:
    """Every tensor the safetensors headers share by name with the model ``config`` describes
    has that model's shape (names transformers would rename, and missing or extra tensors, are
    left to :func:`check_loading_info`)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    shapes = safetensors_shapes(path)
    if shapes is None or is_deepspeed_zero3_enabled():
        # under ZeRO-3 model building (zero.Init) a meta model cannot be built; transformers'
        # own size check (an error, caught by load_model) and check_loading_info still apply
        return
    meta = meta_model(config)
    want = {n: tuple(t.shape) for n, t in meta.state_dict(keep_vars=True).items()}
    bad = [f"{n} {tuple(s)} (the config says {want[n]})" for n, s in sorted(shapes.items())
           if n in want and tuple(s) != want[n]]
    if bad:
        raise MinitronError(f"checkpoint in {path} has tensors of the wrong shape: {', '.join(bad[:2])}"
                            + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
                            + "; the weights belong to another model")


def check_loading_info(info: dict[str, Any], path: Path) -> None:
    """Strict loading, as the streaming prune path: a tensor the model has but the checkpoint
    lacks (transformers would initialize it randomly), one the model does not have, or one of
    another shape is an error, never a silently different model."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith(IGNORED_UNEXPECTED))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    errors = [str(e) for e in info.get("error_msgs") or ()]

    def few(xs: list[str]) -> str:
        return ", ".join(xs[:3]) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")

    if missing:
        raise MinitronError(f"checkpoint in {path} has no tensor {few(missing)} (the config describes it); "
                            "the weights are incomplete or belong to another model")
    if unexpected:
        raise MinitronError(f"checkpoint in {path} holds tensor {few(unexpected)}, which the model its config "
                            "describes does not have; the weights belong to another model")
    if mismatched:
        raise MinitronError(f"checkpoint in {path} has tensors of the wrong shape ({few(mismatched)}); "
                            "the weights belong to another model")
    if errors:
        raise MinitronError(f"cannot load the weights in {path}: {_one_line(Exception(errors[0]))}")


def free_device_memory() -> None:
    """Collects unreachable models and, in a process that has used CUDA, hands the blocks torch's
    caching allocator keeps reserved back to the driver. The pipeline process calls it between
    its in-process stages and before it launches a trainer on the same GPUs: ``del`` and
    ``gc.collect()`` alone leave an 8B evaluation's ~58 GB reserved on cuda:0 while rank 0 trains
    there."""
    gc.collect()
    if torch.cuda.is_initialized():  # False on CPU-only builds and in processes that never used CUDA
        torch.cuda.empty_cache()


def load_view(model: str | os.PathLike, **kw: Any) -> ModelView:
    return get_view(load_model(model, **kw))


def default_attn_implementation(device: str | torch.device, config: Any = None,
                                dtype: torch.dtype | str | None = None) -> str:
    """flash-attn 2 on CUDA when installed and the model is bf16 or fp16 (it runs nothing else),
    else the family's own default (SDPA; Gemma 2: eager, since SDPA cannot softcap attention
    scores). ``dtype`` None means float32, every stage's default."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
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
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # OSError, ValueError, tokenizers' JSON errors, ...
        raise MinitronError(f"{path} has no usable tokenizer files ({_one_line(exc)}); copy the tokenizer next to "
                            "the weights") from None
