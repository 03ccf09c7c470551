"""Test setup: Triton in the CPU interpreter when there is no GPU, seeded tests, poisoned
``torch.empty``, tiny random models of every supported family.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here,
before anything imports triton (torch itself does not).
"""
from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile

import torch

# Every test session starts from an empty minitron_fast cache, so the embedded model is converted
# and the demo text tokenized within the run: no test may depend on what an earlier run left in
# ~/.cache (a cache converted before the output marker existed once hid a fresh-machine bug).
# The directory is made once per session (pytest-xdist workers and the subprocesses tests start
# inherit it) and removed at the end. MINITRON_FAST_TEST_CACHE=DIR keeps one across runs instead:
# a developer's speed-up (about 30 s), never set by CI.
if "_MINITRON_FAST_SESSION_CACHE" not in os.environ:
    _keep = os.environ.get("MINITRON_FAST_TEST_CACHE")
    if _keep:
        _session_cache = os.path.abspath(_keep)
        os.makedirs(_session_cache, exist_ok=True)
    else:
        _session_cache = tempfile.mkdtemp(prefix="minitron_fast-test-cache-")
        atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)
    os.environ["_MINITRON_FAST_SESSION_CACHE"] = _session_cache
os.environ["MINITRON_FAST_CACHE"] = os.environ["_MINITRON_FAST_SESSION_CACHE"]
os.environ.pop("MINITRON_FAST_TOKEN_CACHE", None)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else os.environ.get("DS_ACCELERATOR", "cuda"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers.utils.logging  # noqa: E402

# transformers binds its log handler to the sys.stderr of the moment it first configures logging:
# bind it here, to the session's stream, not inside a capsys test whose stream is closed afterwards
# (every later transformers warning then prints a "--- Logging error ---" traceback into another
# test's stderr: test_bad_input's rows failed that way when tests/artifacts ran first)
transformers.utils.logging.get_logger()

torch.set_float32_matmul_precision("highest")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """torch on one thread for tests of tiny tensors: with 2 OpenMP threads on a loaded 2-core
    machine every small op waits on a barrier (measured: a [22, 64] x [64, 96] linear took 30 ms
    with 2 threads, 15 us with 1). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def poison_empty(monkeypatch):
    """Fills memory from ``torch.empty``/``empty_like`` with NaN (floats) or a sentinel (ints), so
    a kernel that forgets to write an element fails its comparison (as fla's conftest does)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7777 if t.dtype not in (torch.uint8,) else 77)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield


# -- tiny random models of each supported family, built offline from configs ------------------

def _tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _tiny_mistral(**kw):
    # Mistral-NeMo-like: head_dim (24) != hidden_size / heads (64 / 4 = 16)
    from transformers import MistralConfig, MistralForCausalLM

    cfg = dict(vocab_size=127, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, max_position_embeddings=128, sliding_window=None,
               tie_word_embeddings=False)
    cfg.update(kw)
    return MistralForCausalLM(MistralConfig(**cfg)).eval()


def _tiny_qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(vocab_size=129, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=3, max_position_embeddings=128, tie_word_embeddings=True)
    cfg.update(kw)
    m = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    with torch.no_grad():  # make the q/k/v biases non-zero so tests see them
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    return m


def _randomize_norms(m, std=0.1):
    """Non-trivial norm weights (Gemma's start at 0, i.e. (1 + 0); Llama's at 1), so that slicing the
    wrong entries of any norm changes the logits."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * std)
    return m


def _tiny_qwen3(**kw):
    # explicit head_dim (16) != hidden / heads (12); layer 0 full, layers 1-2 sliding (window 4)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = dict(vocab_size=133, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=128, use_sliding_window=True,
               sliding_window=4, max_window_layers=1, tie_word_embeddings=False)
    cfg.update(kw)
    return _randomize_norms(Qwen3ForCausalLM(Qwen3Config(**cfg)).eval())


def _tiny_gemma2(**kw):
    # sliding (window 4) / global layers alternate; both softcaps; query_pre_attn_scalar != head_dim
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = dict(vocab_size=137, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
               attn_logit_softcapping=5.0, final_logit_softcapping=3.0, max_position_embeddings=128,
               tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    cfg.update(kw)
    return _randomize_norms(Gemma2ForCausalLM(Gemma2Config(**cfg)).eval())


def _tiny_gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = dict(vocab_size=139, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=128,
               tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return _randomize_norms(Gemma3ForCausalLM(Gemma3TextConfig(**cfg)).eval())


def _tiny_phi3(**kw):
    # fused qkv_proj and gate_up_proj; no head_dim field in the config (64 / 4 = 16)
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = dict(vocab_size=131, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return _randomize_norms(Phi3ForCausalLM(Phi3Config(**cfg)).eval())


TINY_BUILDERS = {
    "llama": _tiny_llama,
    "llama_tied": lambda **kw: _tiny_llama(tie_word_embeddings=True, **kw),
    "llama_rope_scaled": lambda **kw: _tiny_llama(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, **kw),
    "mistral_nemo_like": _tiny_mistral,
    "qwen2_bias": _tiny_qwen2,
    "qwen3": _tiny_qwen3,
    "gemma2": _tiny_gemma2,
    "gemma3": _tiny_gemma3,
    "phi3": _tiny_phi3,
}


@pytest.fixture(params=sorted(TINY_BUILDERS), ids=sorted(TINY_BUILDERS))
def tiny_model(request):
    """A tiny random model of each supported family (and variant), in eval mode, fp32."""
    torch.manual_seed(0)
    return TINY_BUILDERS[request.param]()


@pytest.fixture
def tiny_builders():
    return TINY_BUILDERS


@pytest.fixture(scope="session")
def demo_model_dir():
    """The embedded SmolLM2-135M converted to an fp32 HF checkpoint (once per session, in the
    session's own cache)."""
    from minitron_fast.models.embedded import embedded_model_path

    return embedded_model_path()
